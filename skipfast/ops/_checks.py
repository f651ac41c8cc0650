"""Input validation at the op boundary: every message names the op, the argument,
what was expected and what came."""
from __future__ import annotations

import torch


def tensor(op: str, name: str, t, *, dims=None, floating=True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{op}: {name} must be {want}, got {t.dim()}-D tensor of shape {tuple(t.shape)}")


def like(op: str, name: str, t, ref: torch.Tensor, ref_name: str = "x") -> None:
    """`t` must match `ref` in shape, dtype and device."""
    tensor(op, name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def channels(op: str, name: str, x: torch.Tensor, expected: int) -> None:
    if x.shape[1] != expected:
        raise ValueError(f"{op}: {name} must have {expected} channels (dim 1), got {x.shape[1]} in shape {tuple(x.shape)}")
