"""highway: ``y = h * t + x * (1 - t)`` with ``t = sigmoid(gate)``.

Reference implementation; the fused kernels plug in behind the same function.
"""
from __future__ import annotations

import torch

from . import _checks

OP = "skipfast.highway"


def highway_reference(h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.sigmoid(gate)
    return h * t + x * (1 - t)


def highway(h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Combine transform ``h`` and carry ``x`` with the gate logits ``gate``."""
    _checks.tensor(OP, "x", x)
    _checks.like(OP, "h", h, x)
    _checks.like(OP, "gate", gate, x)
    return highway_reference(h, gate, x)
