"""The memory format skipfast's kernels write: channels_last when the input's
channels are its innermost dimension, else contiguous. The C++ kernels
(csrc/common.h ``layout_of``) and the fake kernels use the same rule, so a compiled
graph sees the strides the kernels produce."""
from __future__ import annotations

import torch


def layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.stride(1) == 1 and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new dense tensor shaped like `t` in layout_of(t)."""
    return torch.empty_like(t, dtype=dtype, memory_format=layout_of(t))
