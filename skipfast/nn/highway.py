"""Highway layers: ``y = H(x) * T(x) + x * (1 - T(x))``, ``T = sigmoid(gate(x))``."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from . import _checks


class Highway(nn.Module):
    """Highway layer for vectors ``[..., features]``: ``H = relu(Linear)``, gate ``Linear``.
    The gate bias starts at ``gate_bias`` (negative: a fresh layer mostly carries x)."""

    def __init__(self, features: int, gate_bias: float = -2.0):
        super().__init__()
        _checks.positive_int("Highway", "features", features)
        self.features = features
        self.transform = nn.Linear(features, features)
        self.gate = nn.Linear(features, features)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.features:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Highway: x must be a tensor [..., {self.features}], got {got}")
        if not x.is_floating_point():
            raise TypeError(f"Highway: x must be a floating-point tensor, got dtype {x.dtype}")
        return ops.highway(torch.relu(self.transform(x)), self.gate(x), x)


class Highway2d(nn.Module):
    """Highway layer for feature maps ``[N, C, H, W]``: ``H = relu(conv3x3)``, gate ``conv1x1``."""

    def __init__(self, channels: int, gate_bias: float = -2.0):
        super().__init__()
        _checks.positive_int("Highway2d", "channels", channels)
        self.channels = channels
        self.transform = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate = nn.Conv2d(channels, channels, 1)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.feature_map(self, x, self.channels)
        return ops.highway(torch.relu(self.transform(x)), self.gate(x), x)
