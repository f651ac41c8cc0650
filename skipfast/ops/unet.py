"""concat_conv2d: the U-Net decoder convolution over ``cat([a, e], 1)`` without
materializing the concatenation.

Convolution is linear in its input channels, so with the weight split along its input
channels, ``conv(cat(a, e), W) = conv(a, W[:, :Ca]) + conv(e, W[:, Ca:])``:

- ``cpp`` backend (CPU and CUDA): that ATen composition (two convolutions into one
  output, oneDNN / cuDNN underneath). Autograd is ATen's: backward saves ``a``, ``e`` and
  the weight, never a concatenated copy.
- ``triton`` backend: ``skipfast::concat_conv2d_triton``, one implicit-GEMM kernel that
  reads channels from ``a`` and from ``e`` in place (skipfast/kernels/unet.py); its
  backward is ATen's ``convolution_backward`` per source with the split weights.
- ``reference``: the eager ``conv2d(cat([a, e]))`` it replaces (test oracle).

Stride 1, dilation 1, groups 1, zero padding: the decoder's 3x3 / padding 1 convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from . import _checks

OP = "skipfast.concat_conv2d"


def concat_conv2d_reference(a: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            padding: int = 0) -> torch.Tensor:
    """The eager PyTorch sequence this op replaces (test oracle and fallback)."""
    return F.conv2d(torch.cat([a, e], 1), weight, bias, padding=padding)


def _split(a, e, weight, bias, padding):
    ca = a.shape[1]
    y = F.conv2d(a, weight[:, :ca], bias, padding=padding)
    return y.add_(F.conv2d(e, weight[:, ca:], None, padding=padding))


def _check(a, e, weight, bias, padding) -> None:
    _checks.tensor(OP, "a", a, dims=4)
    _checks.tensor(OP, "e", e, dims=4)
    _checks.tensor(OP, "weight", weight, dims=4)
    for name, t in (("e", e), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        _checks.tensor(OP, name, t)
        if t.dtype != a.dtype or t.device != a.device:
            raise TypeError(f"{OP}: {name} must have the dtype and device of a ({a.dtype}, {a.device}), "
                            f"got ({t.dtype}, {t.device})")
    if e.shape[0] != a.shape[0] or e.shape[2:] != a.shape[2:]:
        raise ValueError(f"{OP}: e must have the batch size and spatial size of a {tuple(a.shape)}, got {tuple(e.shape)}")
    cin = a.shape[1] + e.shape[1]
    if weight.shape[1] != cin:
        raise ValueError(f"{OP}: weight must have {cin} input channels (a's {a.shape[1]} + e's {e.shape[1]}), "
                         f"got weight of shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{OP}: padding must be a non-negative int, got {padding!r}")
    kh, kw = weight.shape[2:]
    if a.shape[2] + 2 * padding < kh or a.shape[3] + 2 * padding < kw:
        raise ValueError(f"{OP}: the {kh}x{kw} kernel does not fit the padded {tuple(a.shape[2:])} input "
                         f"(padding {padding})")


def concat_conv2d(a: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  padding: int = 0) -> torch.Tensor:
    """``conv2d(cat([a, e], 1), weight, bias, padding=padding)`` without the concatenation.
    ``weight`` is ``[Cout, Ca + Ce, KH, KW]`` (one tensor over both sources). Under
    autocast every input is cast to the autocast dtype, as ``conv2d`` does."""
    if isinstance(a, torch.Tensor) and torch.is_autocast_enabled(a.device.type):
        dtype = torch.get_autocast_dtype(a.device.type)
        a, e, weight, bias = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                              for t in (a, e, weight, bias))
    _check(a, e, weight, bias, padding)
    backend = _backend.select("unet", a.device)
    if backend == "triton":
        return torch.ops.skipfast.concat_conv2d_triton(a, e, weight, bias, padding)
    if backend == "cpp":
        return _split(a, e, weight, bias, padding)
    return concat_conv2d_reference(a, e, weight, bias, padding)


if _backend.has_triton():
    from ..kernels import unet as _kernels

    @torch.library.triton_op("skipfast::concat_conv2d_triton", mutates_args=())
    def _concat_conv2d_triton(a: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              padding: int) -> torch.Tensor:
        return _kernels.concat_conv2d(a, e, weight, bias, padding, wrap=torch.library.wrap_triton)

    def _setup_context(ctx, inputs, output):
        a, e, weight, bias, padding = inputs
        ctx.save_for_backward(a, e, weight)
        ctx.has_bias, ctx.padding = bias is not None, padding

    def _backward(ctx, grad):
        a, e, weight = ctx.saved_tensors
        ca = a.shape[1]
        pad, need = [ctx.padding] * 2, ctx.needs_input_grad
        grads = []
        for src, w, want in ((a, weight[:, :ca], need[0]), (e, weight[:, ca:], need[1])):
            grads.append(torch.ops.aten.convolution_backward(
                grad, src, w, None, [1, 1], pad, [1, 1], False, [0, 0], 1, [want, need[2], False]))
        dweight = torch.cat([grads[0][1], grads[1][1]], 1) if need[2] else None
        dbias = grad.sum((0, 2, 3)) if ctx.has_bias and need[3] else None
        return grads[0][0], grads[1][0], dweight, dbias, None

    torch.library.register_autograd("skipfast::concat_conv2d_triton", _backward, setup_context=_setup_context)
