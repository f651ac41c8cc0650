"""Triton highway gate: forward ``y = x + t * (h - x)`` and a one-pass backward
(dh, dgate, dx) over flat, densely laid-out tensors; ``t = sigmoid(gate)`` is
recomputed in the backward, never stored."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import layout_of
from ._launch import no_wrap

BLOCK = 2048


@triton.jit
def _gate(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _highway_kernel(h_ptr, g_ptr, x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    t = _gate(g)
    tl.store(y_ptr + offs, (h * t + x * (1.0 - t)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _highway_backward_kernel(r_ptr, h_ptr, g_ptr, x_ptr, dh_ptr, dg_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    t = _gate(g)
    carry = 1.0 - t
    ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + offs, (r * t).to(ty), mask=mask)
    tl.store(dg_ptr + offs, (r * (h - x) * t * carry).to(ty), mask=mask)
    tl.store(dx_ptr + offs, (r * carry).to(ty), mask=mask)


def _dense(ts, fmt):
    return [t.contiguous(memory_format=fmt) for t in ts]


def highway(h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, *, wrap=no_wrap) -> torch.Tensor:
    fmt = layout_of(x)
    h, gate, x = _dense((h, gate, x), fmt)
    y = torch.empty_like(x, memory_format=fmt)
    n = y.numel()
    if n:
        wrap(_highway_kernel)[(triton.cdiv(n, BLOCK),)](h, gate, x, y, n, BLOCK=BLOCK)
    return y


def highway_backward(grad: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, *, wrap=no_wrap):
    fmt = layout_of(x)
    grad, h, gate, x = _dense((grad, h, gate, x), fmt)
    dh, dg, dx = (torch.empty_like(x, memory_format=fmt) for _ in range(3))
    n = x.numel()
    if n:
        wrap(_highway_backward_kernel)[(triton.cdiv(n, BLOCK),)](grad, h, gate, x, dh, dg, dx, n, BLOCK=BLOCK)
    return dh, dg, dx
