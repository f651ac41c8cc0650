"""dense: concat-free dense blocks on one shared block buffer.

A dense block allocates one buffer ``[N, C0 + L*k, H, W]`` (channels_last, so a channel
prefix is a strided slice of every pixel's row), writes its input into the head and has
layer ``l`` write its ``k`` new channels into its own slice. Layer ``l`` reads the first
``C0 + l*k`` channels in place.

- ``bn_relu_conv1x1(x, scale, shift, weight)``: ``conv1x1(relu(x * scale + shift))`` with the
  BN scale/shift and ReLU applied while the GEMM's input tile is loaded; the normalized
  tensor is never materialized. Schema in csrc/skipfast.cpp, CPU kernel in
  csrc/cpu/dense.cpp, Triton kernel in skipfast/kernels/dense.py.
- ``bn_relu_conv1x1_backward_``: recomputes BN + ReLU per tile, accumulates the input
  gradient in place into the shared gradient buffer and returns the per-channel sums the
  BN parameters' gradients need, in float64.
- ``channel_stats``: per-channel mean and biased variance of one segment. A channel's batch
  statistics do not change as the block grows, so each segment's are computed once, when
  it is written, and reused by every later layer.
- ``dense_block``: the block itself (an autograd.Function). It saves the block buffer, each
  bottleneck layer's conv1 output (needed by norm2's backward), per-channel statistics and
  the parameters; backward recomputes BN + ReLU. The batch-statistics part of BN's input
  gradient is linear in the upstream gradient, so per channel it is accumulated over every
  layer that reads the channel and applied once per segment (``_finalize_segment``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from . import _checks

OP = "skipfast.bn_relu_conv1x1"
_CL = torch.channels_last


# ---------------------------------------------------------------- references (oracles)


def _c(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def bn_relu_conv1x1_reference(x, scale, shift, weight):
    """The eager sequence the fused op replaces."""
    return F.conv2d(torch.relu(x * _c(scale) + _c(shift)), weight)


def bn_relu_backward_accumulate_reference_(grad_h, x, scale, shift, grad_x):
    """Given d loss / d relu(x*scale+shift): grad_x += g * scale; returns (sum g*x, sum g),
    summed in float64 (see ``_DenseBlockFunction.backward``)."""
    g = grad_h * (x * _c(scale) + _c(shift) > 0)
    grad_x.add_(g * _c(scale))
    return (g * x).sum((0, 2, 3), dtype=torch.float64), g.sum((0, 2, 3), dtype=torch.float64)


def bn_relu_conv1x1_backward_reference_(grad_out, x, scale, shift, weight, grad_x):
    h = torch.relu(x * _c(scale) + _c(shift))
    grad_h, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, h, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    gscale, gshift = bn_relu_backward_accumulate_reference_(grad_h, x, scale, shift, grad_x)
    return gscale, gshift, grad_w


def channel_stats_reference(x):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return mean, var


# ---------------------------------------------------------------- backend choice


def _impl(device: torch.device, dtype: torch.dtype) -> str:
    """cpp on CPU (fp32/fp64), triton for the forward GEMM on CUDA, else the references.
    The dense family has no CUDA C++ kernels, so a ``cpp`` choice on CUDA goes to Triton."""
    backend = _backend.select("dense", device)
    if backend == "cpp" and (device.type != "cpu" or dtype not in (torch.float32, torch.float64)):
        backend = "triton" if device.type == "cuda" and _backend.has_triton() else "reference"
    return backend


# ---------------------------------------------------------------- public ops


def _check_op_args(op, x, scale, shift, weight):
    _checks.tensor(op, "x", x, dims=4)
    for name, v in (("scale", scale), ("shift", shift)):
        _checks.tensor(op, name, v, dims=1)
        if v.shape[0] != x.shape[1] or v.dtype != x.dtype or v.device != x.device:
            raise ValueError(f"{op}: {name} must be a [{x.shape[1]}] {x.dtype} tensor on {x.device} "
                             f"(one value per channel of x), got {tuple(v.shape)} {v.dtype} on {v.device}")
    _checks.tensor(op, "weight", weight, dims=4)
    if tuple(weight.shape[1:]) != (x.shape[1], 1, 1) or weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight must be a {x.dtype} tensor of shape [C_out, {x.shape[1]}, 1, 1], "
                         f"got {weight.dtype} {tuple(weight.shape)}")


def bn_relu_conv1x1(x, scale, shift, weight):
    """``conv1x1(relu(x * scale[c] + shift[c]), weight)``; output channels_last.
    ``x`` may be a channel prefix of a channels_last buffer: it is read in place."""
    _check_op_args(OP, x, scale, shift, weight)
    backend = _impl(x.device, x.dtype)
    if backend == "cpp":
        return torch.ops.skipfast.dense_bn_relu_conv1x1(x, scale, shift, weight)
    if backend == "triton":
        return torch.ops.skipfast.dense_bn_relu_conv1x1_triton(x, scale, shift, weight)
    return bn_relu_conv1x1_reference(x, scale, shift, weight)


def bn_relu_conv1x1_backward_(grad_out, x, scale, shift, weight, grad_x):
    """Accumulates the input gradient into ``grad_x`` in place; returns
    ``(sum g*x, sum g, grad_weight)`` with ``g`` the gradient at ``x*scale+shift``."""
    if _impl(x.device, x.dtype) == "cpp":
        return torch.ops.skipfast.dense_bn_relu_conv1x1_backward_(grad_out, x, scale, shift, weight, grad_x)
    return bn_relu_conv1x1_backward_reference_(grad_out, x, scale, shift, weight, grad_x)


def channel_stats(x):
    """Per-channel ``(mean, biased variance)`` over N, H, W."""
    if _impl(x.device, x.dtype) == "cpp":
        return torch.ops.skipfast.dense_channel_stats(x)
    return channel_stats_reference(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, scale, shift, weight = ctx.saved_tensors
    grad_x = torch.zeros_like(x, memory_format=_CL)
    gscale, gshift, grad_w = bn_relu_conv1x1_backward_(grad, x, scale, shift, weight, grad_x)
    return grad_x, gscale.to(scale.dtype), gshift.to(shift.dtype), grad_w


if _backend.has_extension():

    @torch.library.register_fake("skipfast::dense_bn_relu_conv1x1")
    def _(x, scale, shift, weight):
        n, _c_in, h, w = x.shape
        return torch.empty((n, weight.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=_CL)

    @torch.library.register_fake("skipfast::dense_bn_relu_conv1x1_backward_")
    def _(grad_out, x, scale, shift, weight, grad_x):
        f64 = torch.float64
        return scale.new_empty(scale.shape, dtype=f64), shift.new_empty(shift.shape, dtype=f64), weight.new_empty(weight.shape)

    @torch.library.register_fake("skipfast::dense_channel_stats")
    def _(x):
        return x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))

    torch.library.register_autograd("skipfast::dense_bn_relu_conv1x1", _backward, setup_context=_setup_context)


if _backend.has_triton():
    from ..kernels import dense as _kernels

    @torch.library.triton_op("skipfast::dense_bn_relu_conv1x1_triton", mutates_args=())
    def _bn_relu_conv1x1_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                weight: torch.Tensor) -> torch.Tensor:
        return _kernels.bn_relu_conv1x1(x, scale, shift, weight, wrap=torch.library.wrap_triton)

    torch.library.register_autograd("skipfast::dense_bn_relu_conv1x1_triton", _backward,
                                    setup_context=_setup_context)


# ---------------------------------------------------------------- the dense block


def _bn_relu(x, scale, shift):
    return torch.relu_(torch.addcmul(_c(shift), x, _c(scale)))


def _uses_batch_stats(bn) -> bool:
    return bn.training or bn.running_mean is None


def _norm_stats(bn, batch_mean, batch_var, count):
    """(mean, invstd) that ``bn`` normalizes with; updates its running statistics exactly
    as ``nn.BatchNorm2d.forward`` does (momentum, ``momentum=None``, num_batches_tracked)."""
    if not _uses_batch_stats(bn):
        return bn.running_mean.clone(), torch.rsqrt(bn.running_var + bn.eps)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        if bn.running_mean is not None:
            bn.running_mean.mul_(1 - factor).add_(batch_mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(batch_var, alpha=factor * count / (count - 1))
    return batch_mean, torch.rsqrt(batch_var + bn.eps)


def _layer_params(layer):
    if layer.bn_size is None:
        return [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    return [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
            layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]


_PER_LAYER = 6  # saved per layer: mean1, invstd1, y1, mean2, invstd2, dropout noise


def _block_forward(layers, growth_rate, x, params, keep, out=None):
    n, c0, h, w = x.shape
    k, count = growth_rate, n * h * w
    total = c0 + len(layers) * k
    if out is None:
        buf = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=_CL)
    else:
        buf = out.narrow(1, 0, total)
    buf[:, :c0].copy_(x)
    batch = any(_uses_batch_stats(ly.norm1) for ly in layers)
    seg_mean = seg_var = None
    if batch:
        seg_mean, seg_var = x.new_empty(total), x.new_empty(total)
        seg_mean[:c0], seg_var[:c0] = channel_stats(buf[:, :c0])
    saved, p = [], 0
    for i, layer in enumerate(layers):
        cl = c0 + i * k
        xin = buf[:, :cl]
        nparams = 3 if layer.bn_size is None else 6
        lp = params[p:p + nparams]
        p += nparams
        mean1, invstd1 = _norm_stats(layer.norm1, seg_mean[:cl] if batch else None, seg_var[:cl] if batch else None, count)
        scale1 = lp[0] * invstd1
        shift1 = lp[1] - mean1 * scale1
        y1 = mean2 = invstd2 = noise = None
        if layer.bn_size is None:
            new = F.conv2d(_bn_relu(xin, scale1, shift1), lp[2], padding=1)
        else:
            y1 = bn_relu_conv1x1(xin, scale1, shift1, lp[2])
            m2, v2 = channel_stats(y1) if _uses_batch_stats(layer.norm2) else (None, None)
            mean2, invstd2 = _norm_stats(layer.norm2, m2, v2, count)
            scale2 = lp[3] * invstd2
            new = F.conv2d(_bn_relu(y1, scale2, lp[4] - mean2 * scale2), lp[5], padding=1)
        if layer.drop_rate > 0 and layer.training:
            # Drawn in NCHW order, as F.dropout on torchvision's (contiguous) feature maps.
            noise = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device)
            noise.bernoulli_(1 - layer.drop_rate).div_(1 - layer.drop_rate)
            new = new * noise
        seg = buf[:, cl:cl + k]
        seg.copy_(new)
        if batch:
            seg_mean[cl:cl + k], seg_var[cl:cl + k] = channel_stats(new)
        if keep:
            saved += [mean1, invstd1, y1, mean2, invstd2, noise]
        else:
            del y1
    return buf, saved, seg_mean


def _finalize_segment(gbuf, buf, lo, hi, acc_a, acc_b, seg_mean, count):
    """Apply the batch-statistics part of BN's input gradient to channels [lo, hi), once for
    every layer that read them: grad -= alpha + beta * x (see the module docstring)."""
    beta = acc_b[lo:hi] / count
    alpha = acc_a[lo:hi] / count - seg_mean[lo:hi] * beta
    gseg = gbuf[:, lo:hi]
    gseg.sub_(torch.addcmul(_c(alpha), buf[:, lo:hi], _c(beta)))


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layers, growth_rate, out_holder, x, *params):
        buf, saved, seg_mean = _block_forward(layers, growth_rate, x, params, keep=True, out=out_holder[0])
        ctx.layers, ctx.growth_rate, ctx.c0 = layers, growth_rate, x.shape[1]
        ctx.batch = [_uses_batch_stats(ly.norm1) for ly in layers]
        ctx.batch2 = [ly.bn_size is not None and _uses_batch_stats(ly.norm2) for ly in layers]
        ctx.eps = [(ly.norm1.eps, ly.norm2.eps if ly.bn_size is not None else None) for ly in layers]
        ctx.drop = [ly.drop_rate for ly in layers]
        ctx.save_for_backward(buf, seg_mean, *saved, *params)
        ctx.nsaved = len(saved)
        return buf

    @staticmethod
    def backward(ctx, grad_out):
        buf, seg_mean, *rest = ctx.saved_tensors
        saved, params = rest[:ctx.nsaved], rest[ctx.nsaved:]
        layers, k, c0 = ctx.layers, ctx.growth_rate, ctx.c0
        n, total, h, w = buf.shape
        count = n * h * w
        gbuf = torch.empty_like(buf, memory_format=_CL)
        gbuf.copy_(grad_out)
        acc_a = buf.new_zeros(total)  # sum over layers of invstd * w * dL/db, per channel
        acc_b = buf.new_zeros(total)  # sum over layers of invstd^2 * w * dL/dw, per channel
        offsets, p = [], 0
        for ly in layers:
            offsets.append(p)
            p += 3 if ly.bn_size is None else 6
        grads = [None] * len(params)
        any_batch = any(ctx.batch)
        for i in reversed(range(len(layers))):
            cl = c0 + i * k
            if any_batch:
                _finalize_segment(gbuf, buf, cl, cl + k, acc_a, acc_b, seg_mean, count)
            mean1, invstd1, y1, mean2, invstd2, noise = saved[_PER_LAYER * i:_PER_LAYER * (i + 1)]
            o = offsets[i]
            w1, b1, conv1 = params[o:o + 3]
            g_new = gbuf[:, cl:cl + k]
            g_new = (g_new * noise if noise is not None else g_new).contiguous(memory_format=_CL)
            xin, gxin = buf[:, :cl], gbuf[:, :cl]
            scale1 = w1 * invstd1
            shift1 = b1 - mean1 * scale1
            if layers[i].bn_size is None:
                hin = _bn_relu(xin, scale1, shift1)
                g_h, grads[o + 2], _ = torch.ops.aten.convolution_backward(
                    g_new, hin, conv1, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
                del hin
                gscale, gshift = bn_relu_backward_accumulate_reference_(g_h, xin, scale1, shift1, gxin)
            else:
                w2, b2, conv2 = params[o + 3:o + 6]
                scale2 = w2 * invstd2
                z = _bn_relu(y1, scale2, b2 - mean2 * scale2)
                g_z, grads[o + 5], _ = torch.ops.aten.convolution_backward(
                    g_new, z, conv2, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
                g_z = torch.ops.aten.threshold_backward(g_z, z, 0)
                del z
                if ctx.batch2[i]:
                    g_y1, grads[o + 3], grads[o + 4] = torch.ops.aten.native_batch_norm_backward(
                        g_z, y1, w2, None, None, mean2, invstd2, True, ctx.eps[i][1], [True, True, True])
                else:
                    grads[o + 4] = g_z.sum((0, 2, 3))
                    grads[o + 3] = ((g_z * y1).sum((0, 2, 3), dtype=torch.float64).sub_(mean2 * grads[o + 4])
                                    .mul_(invstd2).to(w2.dtype))
                    g_y1 = g_z * _c(scale2)
                del g_z
                gscale, gshift, grads[o + 2] = bn_relu_conv1x1_backward_(g_y1, xin, scale1, shift1, conv1, gxin)
            # float64 sums: sum g*x - mean * sum g cancels most digits when the mean is large
            grads[o] = ((gscale - mean1 * gshift) * invstd1).to(w1.dtype)
            grads[o + 1] = gshift.to(b1.dtype)
            if ctx.batch[i]:
                acc_a[:cl].addcmul_(w1 * invstd1, grads[o + 1])
                acc_b[:cl].addcmul_(w1 * invstd1 * invstd1, grads[o])
        if any_batch:
            _finalize_segment(gbuf, buf, 0, c0, acc_a, acc_b, seg_mean, count)
        return (None, None, None, gbuf[:, :c0], *grads)


BLOCK_OP = "skipfast.dense_block"


def check_block_args(layers, growth_rate, x, out):
    """dense_block's argument checks (also run by DenseBlock before its reference path)."""
    _checks.tensor(BLOCK_OP, "x", x, dims=4)
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate <= 0:
        raise ValueError(f"{BLOCK_OP}: growth_rate must be a positive integer, got {growth_rate!r}")
    if len(layers) == 0:
        raise ValueError(f"{BLOCK_OP}: num_layers must be a positive integer, got 0 layers")
    n, c0, h, w = x.shape
    for i, ly in enumerate(layers):
        want = c0 + i * growth_rate
        if ly.norm1.num_features != want or ly.conv1.in_channels != want:
            raise ValueError(f"{BLOCK_OP}: layer {i + 1} must read {want} channels (x has {c0}, growth_rate "
                             f"{growth_rate}), got a layer built for {ly.norm1.num_features}")
        last = ly.conv1 if ly.bn_size is None else ly.conv2
        if last.out_channels != growth_rate:
            raise ValueError(f"{BLOCK_OP}: layer {i + 1} must produce growth_rate={growth_rate} channels, "
                             f"got {last.out_channels}")
    if any(_uses_batch_stats(ly.norm1) for ly in layers) and n * h * w <= 1:
        raise ValueError(f"{BLOCK_OP}: expected more than 1 value per channel when training, "
                         f"got input size {tuple(x.shape)}")
    if out is not None:
        total = c0 + len(layers) * growth_rate
        _checks.tensor(BLOCK_OP, "out", out, dims=4)
        if out.shape[1] < total:
            raise ValueError(f"{BLOCK_OP}: out (the block buffer) is too small: {len(layers)} layers of growth "
                             f"{growth_rate} on {c0} input channels need at least {total} channels, "
                             f"got {out.shape[1]} in shape {tuple(out.shape)}")
        if (out.shape[0], out.shape[2], out.shape[3]) != (n, h, w) or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"{BLOCK_OP}: out must be a {x.dtype} tensor [{n}, >= {total}, {h}, {w}] on "
                             f"{x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if out.shape[1] > 1 and out.stride(1) != 1:
            raise ValueError(f"{BLOCK_OP}: out must be channels_last (channel stride 1), got strides {out.stride()}")


def dense_block(layers, growth_rate: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run dense ``layers`` (DenseLayer-like: norm1, conv1[, norm2, conv2], bn_size, drop_rate)
    on ``x`` through one shared block buffer; returns the buffer, ``[N, C0 + L*k, H, W]``
    channels_last, equal to torchvision's ``torch.cat`` of every feature map. ``out``: a
    preallocated channels_last buffer with at least ``C0 + L*k`` channels to write into."""
    check_block_args(layers, growth_rate, x, out)
    params = [t for ly in layers for t in _layer_params(ly)]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
        return _DenseBlockFunction.apply(layers, growth_rate, [out], x, *params)
    return _block_forward(layers, growth_rate, x, params, keep=False, out=out)[0]


def dense_block_reference(layers, x: torch.Tensor) -> torch.Tensor:
    """Eager torchvision-style block: every layer reads ``torch.cat`` of all earlier maps."""
    features = [x]
    for layer in layers:
        features.append(layer(torch.cat(features, 1)))
    return torch.cat(features, 1)


__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_reference", "bn_relu_conv1x1_backward_", "channel_stats",
           "channel_stats_reference", "dense_block", "dense_block_reference"]
