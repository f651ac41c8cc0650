"""Triton add_relu forward and backward over flat, densely laid-out tensors."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import layout_of
from ._launch import no_wrap

BLOCK = 4096


@triton.jit
def _add_relu_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
    y = x + r
    y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_backward_kernel(g_ptr, y_ptr, gx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(gx_ptr + offs, tl.where(y > 0, g, tl.zeros_like(g)), mask=mask)


def _elementwise(kernel, a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, wrap) -> torch.Tensor:
    fmt = layout_of(ref)
    a = a.contiguous(memory_format=fmt)
    b = b.contiguous(memory_format=fmt)
    out = torch.empty_like(a, memory_format=fmt)
    n = out.numel()
    if n:
        wrap(kernel)[(triton.cdiv(n, BLOCK),)](a, b, out, n, BLOCK=BLOCK)
    return out


def add_relu(x: torch.Tensor, residual: torch.Tensor, *, wrap=no_wrap) -> torch.Tensor:
    return _elementwise(_add_relu_kernel, x, residual, x, wrap)


def relu_backward(grad_out: torch.Tensor, out: torch.Tensor, *, wrap=no_wrap) -> torch.Tensor:
    return _elementwise(_relu_backward_kernel, grad_out, out, out, wrap)
