"""Input checks for modules: errors name the module, what it expected and what came."""
from __future__ import annotations

import torch


def feature_map(module: torch.nn.Module, x, channels: int, *, name: str = "x") -> None:
    where = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: {name} must be a 4-D tensor [N, C, H, W], got {x.dim()}-D of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"{where}: {name} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")


def positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value
