"""conv2d_bias_act: ``act(conv2d(x, weight) + bias + residual)`` for inference.

- schema ``skipfast::conv2d_bias_act`` in csrc/skipfast.cpp;
- CPU (csrc/cpu/conv.cpp): oneDNN convolution with fused post-ops (bias, add, ReLU) for
  float32/bfloat16, the weight optionally prepacked once (``prepack_weight``); other dtypes:
  ATen convolution + one fused epilogue pass; float32 3x3 stride-1 convolutions given a
  prepacked ``Winograd`` weight: Winograd F(2x2, 3x3) (csrc/cpu/winograd.cpp) with the
  epilogue fused into its output transform;
- CUDA (csrc/cuda/conv.cu): cuDNN convolution + one fused epilogue pass;
- Triton (``skipfast::conv2d_bias_act_triton``, skipfast/kernels/conv.py): implicit GEMM
  with the epilogue fused before the store, groups=1.

On CUDA the priority list (skipfast/_backend.py, family ``conv``) tries Triton first for
groups=1, since its epilogue saves a full read and write of the output that the cuDNN
path pays; groups>1 always takes the cuDNN path. This op is for inference: it has no
autograd formula, and calling it on tensors that require grad raises.
"""
from __future__ import annotations

import os

import torch

from .. import _backend, _layout
from . import _checks

OP = "skipfast.conv2d_bias_act"


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{OP}: {name} must be an int or a pair of ints, got {v!r}")
    return v


def conv2d_bias_act_reference(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, residual=None,
                              activation="relu"):
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def _validate(x, weight, bias, stride, padding, dilation, groups, residual, activation):
    _checks.tensor(OP, "x", x, dims=4)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be a 4-D tensor [K, C/groups, R, S], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: weight must have the dtype of x ({x.dtype}), got {weight.dtype} "
                        "(under autocast, cast both or run the module under autocast)")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"{OP}: x has {x.shape[1]} channels but weight {tuple(weight.shape)} with groups={groups!r} "
                         f"expects {weight.shape[1] * groups if isinstance(groups, int) else '?'}")
    if bias is not None:
        _checks.tensor(OP, "bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != x.dtype:
            raise ValueError(f"{OP}: bias must be [{weight.shape[0]}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if activation not in ("relu", None):
        raise ValueError(f"{OP}: activation must be 'relu' or None, got {activation!r}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    out = list(_layout.conv_output_shape(x.shape, weight.shape, stride, padding, dilation))
    if min(out[2:]) <= 0:
        raise ValueError(f"{OP}: the kernel {tuple(weight.shape[2:])} does not fit x {tuple(x.shape)} with padding {padding}")
    if residual is not None:
        _checks.tensor(OP, "residual", residual)
        if list(residual.shape) != out:
            raise ValueError(f"{OP}: residual must have the output's shape {tuple(out)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"{OP}: residual must have dtype {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}")
    return stride, padding, dilation, out


def conv2d_bias_act(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, residual=None,
                    activation="relu"):
    """``act(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)``, one
    pass over the output. ``weight`` may be a prepacked weight from ``prepack_weight``."""
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (x, weight, bias, residual)):
        raise RuntimeError(f"{OP} is an inference op with no backward: call it under torch.no_grad() or "
                           "torch.inference_mode(), or use the training path (conv -> skipfast.ops.batch_norm_act)")
    if isinstance(weight, Winograd):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                and all(t is None or (t.device == x.device and t.dtype == x.dtype) for t in (bias, residual))
                and (residual is None or residual.shape == (x.shape[0], weight.u.shape[2], *x.shape[2:]))):
            return torch.ops.skipfast.conv3x3_winograd(x, weight.u, bias, residual, activation == "relu")
        weight = weight.weight  # other inputs take (and are checked by) the direct path
    if weight.is_mkldnn:
        stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    else:
        stride, padding, dilation, _ = _validate(x, weight, bias, stride, padding, dilation, groups, residual, activation)
    backend = _backend.select("conv", x.device)
    if backend == "triton" and groups == 1 and x.device.type == "cuda":
        return torch.ops.skipfast.conv2d_bias_act_triton(x, weight, bias, stride, padding, dilation, residual, activation)
    if backend in ("cpp", "triton") and _backend.has_extension():
        return torch.ops.skipfast.conv2d_bias_act(x, weight, bias, stride, padding, dilation, groups, residual, activation)
    return conv2d_bias_act_reference(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                     residual=residual, activation=activation)


class Winograd:
    """A 3x3 weight prepared for ``skipfast::conv3x3_winograd`` (Winograd F(2x2, 3x3),
    csrc/cpu/winograd.cpp): ``u[4 * i + j, c, k] = (G w[k, c] G^T)[i, j]``, made in float64
    (elementwise, so that a FLOP counter sees only the convolution) and rounded once. Keeps
    the plain weight for inputs the transform does not serve."""

    def __init__(self, weight: torch.Tensor):
        def by_g(t, dim):  # G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1] applied along dim
            a, b, c = t.unbind(dim)
            return torch.stack([a, (a + b + c) / 2, (a - b + c) / 2, c], dim)

        u = by_g(by_g(weight.detach().double(), 2), 3)  # [K, C, 4, 4]
        self.u = u.permute(2, 3, 1, 0).reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()
        self.weight = weight


def winograd_applies(weight, *, stride, padding, dilation, groups, input_size=None) -> bool:
    """CPU float32 3x3 convolutions with stride 1, padding 1, groups 1 and channel counts
    that are multiples of 8 (the 3x3 stride-1 convolutions of torchvision's ResNets), with
    at least 16 output tiles (2x2 pixels) per thread when the input size is known: with
    fewer, each thread's GEMMs read the whole transformed weight for a few tiles and lose
    (batch 1 at 7x7 with 512 channels: 0.4-0.5x oneDNN's direct convolution). Measured
    1.2-2.1x faster than the direct convolution elsewhere at ResNet shapes, batch 1 and 8,
    on a 2-core AVX2 CPU. Its rounding differs from the direct sum (errors of the same size,
    tests/test_conv.py). SKIPFAST_WINOGRAD=0 turns it off."""
    if input_size is not None:
        n, _, h, w = input_size
        if n * ((h + 1) // 2) * ((w + 1) // 2) < 16 * torch.get_num_threads():
            return False
    return (os.environ.get("SKIPFAST_WINOGRAD", "1") != "0" and _backend.has_extension()
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and tuple(weight.shape[2:]) == (3, 3)
            and weight.shape[0] % 8 == 0 and weight.shape[1] % 8 == 0 and groups == 1
            and _pair(stride, "stride") == [1, 1] and _pair(padding, "padding") == [1, 1]
            and _pair(dilation, "dilation") == [1, 1])


def prepack_weight(weight, *, stride, padding, dilation, groups, input_size=None):
    """The weight in the form its CPU kernel reads, computed once and reused by every call:
    the Winograd transform where ``winograd_applies``, else oneDNN's blocked layout of a
    float32/bfloat16 weight (what torch's CPU compiler does when it freezes weights). Other
    weights are returned unchanged."""
    if winograd_applies(weight, stride=stride, padding=padding, dilation=dilation, groups=groups, input_size=input_size):
        return Winograd(weight)
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or not _backend.has_extension()
            or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled):
        return weight
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return weight  # this CPU's oneDNN has no bfloat16 convolution
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.detach(), _pair(padding, "padding"), _pair(stride, "stride"), _pair(dilation, "dilation"), groups, input_size)


if _backend.has_extension():

    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    @register_flop_formula(torch.ops.skipfast.conv2d_bias_act)
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    @register_flop_formula(torch.ops.skipfast.conv3x3_winograd)
    def _(x_shape, u_shape, *args, out_shape=None, **kwargs):
        # counted as the direct 3x3 convolution it computes, as torch counts every conv algorithm
        return conv_flop_count(x_shape, [u_shape[2], u_shape[1], 3, 3], out_shape, transposed=False)

    @torch.library.register_fake("skipfast::conv3x3_winograd")
    def _(x, u, bias, residual, relu):
        return x.new_empty((x.shape[0], u.shape[2], x.shape[2], x.shape[3])).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("skipfast::conv2d_bias_act")
    def _(x, weight, bias, stride, padding, dilation, groups, residual, activation):
        sizes = _layout.conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
        return x.new_empty(sizes).contiguous(memory_format=_layout.layout_of(x))


if _backend.has_triton():
    from ..kernels import conv as _kernels

    @torch.library.triton_op("skipfast::conv2d_bias_act_triton", mutates_args=())
    def _conv2d_bias_act_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                                padding: list[int], dilation: list[int], residual: torch.Tensor | None,
                                activation: str | None) -> torch.Tensor:
        return _kernels.conv2d_bias_act(x, weight, bias, stride, padding, dilation, residual, activation == "relu",
                                        wrap=torch.library.wrap_triton)
