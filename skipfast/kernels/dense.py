"""Triton kernel of the dense family: ``conv1x1(relu(x * scale + shift))`` as a GEMM over
channels_last rows whose input tile is normalized while it is loaded.

``x`` may be a channel prefix of a channels_last block buffer: rows of ``C`` contiguous
channels, ``ld`` elements apart; it is read in place. The output is channels_last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import no_wrap


@triton.jit
def _bn_relu_mm_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr, M, C, COUT, ldx,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < COUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < C
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * ldx + rk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(shift_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        a = a * s[None, :] + b[None, :]
        a = tl.where(a < 0.0, 0.0, a)  # keeps NaN, as torch.relu
        # weight is [COUT, C]; the tile is its transpose [BLOCK_K, BLOCK_N]
        wt = tl.load(w_ptr + rn[None, :].to(tl.int64) * C + rk[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a.to(wt.dtype), wt, input_precision="ieee")
        else:
            acc += tl.dot(a.to(wt.dtype), wt)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * COUT + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _rows(x: torch.Tensor):
    """(tensor, row stride): x itself when it is evenly spaced rows of contiguous channels."""
    n, c, h, w = x.shape
    ld = x.stride(3) if w > 1 else x.stride(2) if h > 1 else x.stride(0) if n > 1 else c
    ok = (c == 1 or x.stride(1) == 1) and ld >= c
    ok = ok and (h == 1 or x.stride(2) == w * ld) and (n == 1 or x.stride(0) == h * w * ld)
    if ok:
        return x, ld
    return x.contiguous(memory_format=torch.channels_last), c


def bn_relu_conv1x1(x, scale, shift, weight, *, wrap=no_wrap):
    n, c, h, w = x.shape
    cout = weight.shape[0]
    x, ld = _rows(x)
    out = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    m = n * h * w
    if m == 0 or cout == 0:
        return out
    if c == 0:
        return out.zero_()
    bm, bn, bk, warps = (64, 64, 32, 4) if x.is_cuda else (32, 32, 32, 1)
    # float32 uses TF32 only where torch's matmuls may (torch.backends.cuda.matmul.allow_tf32)
    ieee = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    grid = (triton.cdiv(m, bm), triton.cdiv(cout, bn))
    wrap(_bn_relu_mm_kernel)[grid](x, scale.contiguous(), shift.contiguous(), weight.reshape(cout, c).contiguous(),
                                   out, m, c, cout, ld, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out
