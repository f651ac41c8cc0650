"""Triton kernels of the bn_act family (see skipfast/ops/bn_act.py for the phases).

x is dense in NCHW or channels_last; it is addressed as [N, C, HW] with strides
(sN, sC, sHW), so one kernel serves both layouts. Elementwise kernels walk the flat
memory index i (the mask's bit index: byte i // 8, bit i % 8); reductions run one
program per channel with fp32 shifted sums (shift = the mean of the channel's first 16
values).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import layout_of
from ._launch import no_wrap

BLOCK = 1024  # elements per program (elementwise) / per step (reductions); a multiple of 8


@triton.jit
def _channel_offsets(k, c, HW, sN, sC, sHW):
    return (k // HW).to(tl.int64) * sN + c * sC + (k % HW).to(tl.int64) * sHW


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, var_ptr, NHW, HW, sN, sC, sHW, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    # the shift: the mean of the channel's first (up to) 16 values, close enough to the mean
    # that E[d^2] - E[d]^2 keeps its digits (the first value alone may lie far out)
    k = tl.arange(0, 16)
    first = tl.load(x_ptr + _channel_offsets(k, c, HW, sN, sC, sHW), mask=k < NHW, other=0.0).to(tl.float32)
    shift = tl.sum(first, 0) / tl.minimum(NHW, 16)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, NHW, BLOCK):
        k = start + tl.arange(0, BLOCK)
        m = k < NHW
        x = tl.load(x_ptr + _channel_offsets(k, c, HW, sN, sC, sHW), mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - shift, 0.0)
        s1 += d
        s2 += d * d
    t1 = tl.sum(s1, 0)
    t2 = tl.sum(s2, 0)
    d = t1 / NHW
    tl.store(mean_ptr + c, shift + d)
    tl.store(var_ptr + c, tl.maximum(t2 / NHW - d * d, 0.0))


@triton.jit
def _channel_of(i, C, HW, IS_CL: tl.constexpr):
    if IS_CL:
        return i % C
    else:
        return (i // HW) % C


@triton.jit
def _apply_kernel(x_ptr, r_ptr, out_ptr, mask_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, n, C, HW,
                  IS_CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
                  RELU: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c = _channel_of(i, C, HW, IS_CL)
    x = tl.load(x_ptr + i, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=m, other=0.0)
    scale = tl.load(invstd_ptr + c, mask=m, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=m, other=0.0)
    y = (x - mean) * scale
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=m, other=0.0)
    if HAS_R:
        y = y + tl.load(r_ptr + i, mask=m, other=0.0).to(tl.float32)
    if RELU:
        passes = tl.where(m & ~(y <= 0.0), 1, 0).to(tl.int32)
        weights = 1 << (tl.arange(0, BLOCK) % 8)
        bits = tl.sum(tl.reshape(passes * weights, [BLOCK // 8, 8]), 1)
        j = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + j, bits.to(tl.uint8), mask=j < (n + 7) // 8)
        y = tl.where(y < 0.0, 0.0, y)
    tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _masked_grad(g_ptr, mask_ptr, offs, m, RELU: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if RELU:
        byte = tl.load(mask_ptr + (offs >> 3), mask=m, other=0).to(tl.int32)
        g = tl.where(((byte >> (offs & 7).to(tl.int32)) & 1) != 0, g, 0.0)
    return g


@triton.jit
def _reduce_kernel(g_ptr, x_ptr, mask_ptr, mean_ptr, invstd_ptr, sdy_ptr, sdyx_ptr, NHW, HW, sN, sC, sHW,
                   RELU: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + c)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, NHW, BLOCK):
        k = start + tl.arange(0, BLOCK)
        m = k < NHW
        offs = _channel_offsets(k, c, HW, sN, sC, sHW)
        g = _masked_grad(g_ptr, mask_ptr, offs, m, RELU)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s1 += g
        s2 += g * tl.where(m, x - mean, 0.0)
    tl.store(sdy_ptr + c, tl.sum(s1, 0))
    tl.store(sdyx_ptr + c, tl.sum(s2, 0) * tl.load(invstd_ptr + c))


@triton.jit
def _elemt_kernel(g_ptr, x_ptr, mask_ptr, mean_ptr, invstd_ptr, w_ptr, sdy_ptr, sdyx_ptr, dx_ptr, dr_ptr, n, C, HW,
                  inv_count, IS_CL: tl.constexpr, HAS_W: tl.constexpr, HAS_SUMS: tl.constexpr,
                  RELU: tl.constexpr, GRAD_R: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c = _channel_of(i, C, HW, IS_CL)
    g = _masked_grad(g_ptr, mask_ptr, i, m, RELU)
    x = tl.load(x_ptr + i, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=m, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=m, other=0.0)
    k = invstd
    if HAS_W:
        k = k * tl.load(w_ptr + c, mask=m, other=0.0)
    dx = g * k
    if HAS_SUMS:
        sdy = tl.load(sdy_ptr + c, mask=m, other=0.0)
        sdyx = tl.load(sdyx_ptr + c, mask=m, other=0.0)
        dx = dx - k * invstd * sdyx * inv_count * (x - mean) - k * sdy * inv_count
    tl.store(dx_ptr + i, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if GRAD_R:
        tl.store(dr_ptr + i, g.to(dr_ptr.dtype.element_ty), mask=m)


def _geometry(x: torch.Tensor):
    fmt = layout_of(x)
    xc = x.contiguous(memory_format=fmt)
    N, C, H, W = xc.shape
    HW = H * W
    cl = fmt == torch.channels_last
    strides = (HW * C, 1, C) if cl else (C * HW, HW, 1)
    return xc, fmt, cl, N, C, HW, strides


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def stats(x: torch.Tensor, *, wrap=no_wrap):
    xc, _, _, N, C, HW, (sN, sC, sHW) = _geometry(x)
    mean = x.new_empty((C,), dtype=torch.float32)
    var = x.new_empty((C,), dtype=torch.float32)
    if xc.numel():
        wrap(_stats_kernel)[(C,)](xc, mean, var, N * HW, HW, sN, sC, sHW, BLOCK=BLOCK)
    return mean.to(_stat_dtype(x)), var.to(_stat_dtype(x))


def apply(x, mean, invstd, weight, bias, residual, relu: bool, *, wrap=no_wrap):
    xc, fmt, cl, N, C, HW, _ = _geometry(x)
    out = torch.empty_like(xc, memory_format=fmt)
    n = xc.numel()
    mask = x.new_empty(((n + 7) // 8 if relu else 0,), dtype=torch.uint8)
    r = residual.contiguous(memory_format=fmt) if residual is not None else xc
    f32 = lambda t: t.float().contiguous() if t is not None else mean  # noqa: E731  (placeholder pointer)
    if n:
        wrap(_apply_kernel)[(triton.cdiv(n, BLOCK),)](
            xc, r, out, mask if relu else out, f32(mean), f32(invstd), f32(weight), f32(bias), n, C, HW,
            IS_CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None, RELU=relu,
            BLOCK=BLOCK)
    return out, mask


def train(x, weight, bias, residual, eps: float, relu: bool, *, wrap=no_wrap):
    mean, var = stats(x, wrap=wrap)
    invstd = torch.rsqrt(var + eps)
    out, mask = apply(x, mean, invstd, weight, bias, residual, relu, wrap=wrap)
    return out, mean, var, invstd, mask


def backward_reduce(grad_out, x, mean, invstd, mask, *, wrap=no_wrap):
    xc, fmt, _, N, C, HW, (sN, sC, sHW) = _geometry(x)
    g = grad_out.contiguous(memory_format=fmt)
    sdy = x.new_empty((C,), dtype=torch.float32)
    sdyx = x.new_empty((C,), dtype=torch.float32)
    if xc.numel():
        wrap(_reduce_kernel)[(C,)](g, xc, mask if mask is not None else g, mean.float().contiguous(),
                                   invstd.float().contiguous(), sdy, sdyx, N * HW, HW, sN, sC, sHW,
                                   RELU=mask is not None, BLOCK=BLOCK)
    else:
        sdy.zero_(), sdyx.zero_()
    return sdy.to(_stat_dtype(x)), sdyx.to(_stat_dtype(x))


def backward_elemt(grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count: int, grad_residual: bool,
                   *, wrap=no_wrap):
    xc, fmt, cl, N, C, HW, _ = _geometry(x)
    g = grad_out.contiguous(memory_format=fmt)
    dx = torch.empty_like(xc, memory_format=fmt)
    dr = torch.empty_like(xc, memory_format=fmt) if grad_residual else x.new_empty((0,))
    n = xc.numel()
    f32 = lambda t: t.float().contiguous() if t is not None else mean.float()  # noqa: E731
    has_sums = sum_dy is not None
    if n:
        wrap(_elemt_kernel)[(triton.cdiv(n, BLOCK),)](
            g, xc, mask if mask is not None else g, f32(mean), f32(invstd), f32(weight), f32(sum_dy),
            f32(sum_dy_xhat), dx, dr if grad_residual else dx, n, C, HW, 1.0 / count if has_sums else 0.0,
            IS_CL=cl, HAS_W=weight is not None, HAS_SUMS=has_sums, RELU=mask is not None, GRAD_R=grad_residual,
            BLOCK=BLOCK)
    return dx, dr
