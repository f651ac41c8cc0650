"""highway: ``y = h * t + x * (1 - t)`` with ``t = sigmoid(gate)``, in one pass.

- schema: ``skipfast::highway`` / ``skipfast::highway_backward`` in csrc/skipfast.cpp,
  kernels in csrc/cpu/highway.cpp and csrc/cuda/highway.cu (math in csrc/highway.h);
- Triton: ``skipfast::highway_triton`` (a triton_op over skipfast/kernels/highway.py);
- backward saves only the three inputs ``h, gate, x`` (not ``t``, ``1 - t`` or ``y``, as
  eager does) and produces ``dh, dgate, dx`` in one pass, recomputing ``t``.
"""
from __future__ import annotations

import torch

from .. import _backend, _layout
from . import _checks

OP = "skipfast.highway"


def highway_reference(h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The eager PyTorch sequence this op replaces (test oracle and fallback)."""
    t = torch.sigmoid(gate)
    return h * t + x * (1 - t)


def highway(h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Combine transform ``h`` and carry ``x`` with gate logits ``gate`` (all the same
    shape, dtype and device); output in the memory format of ``x``."""
    _checks.tensor(OP, "x", x)
    _checks.like(OP, "h", h, x)
    _checks.like(OP, "gate", gate, x)
    backend = _backend.select("highway", x.device)
    if backend == "cpp":
        return torch.ops.skipfast.highway(h, gate, x)
    if backend == "triton":
        return torch.ops.skipfast.highway_triton(h, gate, x)
    return highway_reference(h, gate, x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # h, gate, x


def _make_backward(backward_op):
    def backward(ctx, grad):
        h, gate, x = ctx.saved_tensors
        return tuple(backward_op(grad, h, gate, x))

    return backward


if _backend.has_extension():

    @torch.library.register_fake("skipfast::highway")
    def _(h, gate, x):
        return _layout.empty_like(x)

    @torch.library.register_fake("skipfast::highway_backward")
    def _(grad, h, gate, x):
        return _layout.empty_like(x), _layout.empty_like(x), _layout.empty_like(x)

    torch.library.register_autograd(
        "skipfast::highway", _make_backward(torch.ops.skipfast.highway_backward), setup_context=_setup_context
    )


if _backend.has_triton():
    from ..kernels import highway as _kernels

    @torch.library.triton_op("skipfast::highway_triton", mutates_args=())
    def _highway_triton(h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _kernels.highway(h, gate, x, wrap=torch.library.wrap_triton)

    @torch.library.triton_op("skipfast::highway_backward_triton", mutates_args=())
    def _highway_backward_triton(
        grad: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _kernels.highway_backward(grad, h, gate, x, wrap=torch.library.wrap_triton)

    torch.library.register_autograd(
        "skipfast::highway_triton",
        _make_backward(torch.ops.skipfast.highway_backward_triton),
        setup_context=_setup_context,
    )
