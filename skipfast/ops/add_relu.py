"""add_relu: ``relu(x + residual)`` in one pass.

- schema: ``skipfast::add_relu`` / ``skipfast::add_relu_backward`` in csrc/skipfast.cpp,
  kernels in csrc/cpu/add_relu.cpp and csrc/cuda/add_relu.cu;
- Triton: ``skipfast::add_relu_triton`` (a triton_op over skipfast/kernels/add_relu.py);
- backward needs only the output: grad_x = grad_residual = grad * (out > 0).
"""
from __future__ import annotations

import torch

from .. import _backend, _layout
from . import _checks

OP = "skipfast.add_relu"


def add_relu_reference(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The eager PyTorch sequence this op replaces (test oracle and fallback)."""
    return torch.relu(x + residual)


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``relu(x + residual)``; output in the memory format of ``x``."""
    _checks.tensor(OP, "x", x)
    _checks.like(OP, "residual", residual, x)
    backend = _backend.select("add_relu", x.device)
    if backend == "cpp":
        return torch.ops.skipfast.add_relu(x, residual)
    if backend == "triton":
        return torch.ops.skipfast.add_relu_triton(x, residual)
    return add_relu_reference(x, residual)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _make_backward(backward_op):
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        g = backward_op(grad, out)
        return g, g

    return backward


if _backend.has_extension():

    @torch.library.register_fake("skipfast::add_relu")
    def _(x, residual):
        return _layout.empty_like(x)

    @torch.library.register_fake("skipfast::add_relu_backward")
    def _(grad_out, out):
        return _layout.empty_like(out)

    torch.library.register_autograd(
        "skipfast::add_relu", _make_backward(torch.ops.skipfast.add_relu_backward), setup_context=_setup_context
    )


if _backend.has_triton():
    from ..kernels import add_relu as _kernels

    @torch.library.triton_op("skipfast::add_relu_triton", mutates_args=())
    def _add_relu_triton(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return _kernels.add_relu(x, residual, wrap=torch.library.wrap_triton)

    @torch.library.triton_op("skipfast::add_relu_backward_triton", mutates_args=())
    def _add_relu_backward_triton(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return _kernels.relu_backward(grad_out, out, wrap=torch.library.wrap_triton)

    torch.library.register_autograd(
        "skipfast::add_relu_triton",
        _make_backward(torch.ops.skipfast.add_relu_backward_triton),
        setup_context=_setup_context,
    )
