"""The memory format skipfast's kernels write, torch's batch norm's: contiguous for a
contiguous input; channels_last for a dense channels_last one; otherwise torch's
``Tensor.suggest_memory_format()``, channels_last when the strides are ordered as
channels_last's (C innermost, then W, H, N) and contiguous when they are not. Where a
size-1 dimension makes a dense tensor both, it is contiguous. The C++ kernels
(csrc/common.h ``layout_of``) and the fake kernels use the same rule, so a compiled
graph sees the strides the kernels produce. Also the shape a 2-D convolution writes, for
the checks, the fake kernels and the launchers alike."""
from __future__ import annotations

import torch


def _strides_like_channels_last(sizes, strides) -> bool:
    """c10's is_channels_last_strides_2d: strides that do not decrease in the order C, W,
    H, N, each at least the extent of the one before, with torch's tie-breaks for size-1
    dimensions (N111 and the like stay contiguous)."""
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least:
            return False
        if d == 0 and least == strides[1]:
            return False
        least = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last) or _strides_like_channels_last(t.shape, t.stride()):
        return torch.channels_last
    return torch.contiguous_format


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new dense tensor shaped like `t` in layout_of(t)."""
    return torch.empty_like(t, dtype=dtype, memory_format=layout_of(t))


def conv_output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple:
    """[N, K, P, Q] of a convolution of x [N, C, H, W] with weight [K, C/groups, R, S]
    (stride, padding, dilation: pairs), as torch's conv2d."""
    n, _, h, w = x_shape
    k, _, r, s = weight_shape
    return (n, k, *((size + 2 * padding[d] - dilation[d] * (kernel - 1) - 1) // stride[d] + 1
                    for d, (size, kernel) in enumerate(((h, r), (w, s)))))
