"""Triton two-source convolution: ``conv2d(cat([a, e], 1), weight) + bias`` without the
concatenation. An implicit GEMM: output pixels (N*Ho*Wo) x output channels, reduced over
the kernel window and over the channels of ``a`` then of ``e``, each read in place with
its own strides (NCHW or channels_last, no copies). Stride 1, zero padding, groups 1;
fp32 accumulation (fp64 for fp64 inputs)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import layout_of
from ._launch import no_wrap

BLOCK_M, BLOCK_N, BLOCK_K = 64, 32, 32


@triton.jit
def _accumulate(acc, src_ptr, s_n, s_c, s_h, s_w, C, c0, w_ptr, w_co, w_ci, w_kh, w_kw, kh, kw,
                n, ih, iw, valid, offs_n, mask_n, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += src[n, c, ih, iw] @ weight[co, c0 + c, kh, kw] over the C channels of one source."""
    base = n * s_n + ih * s_h + iw * s_w
    for k in range(0, C, BLOCK_K):
        ck = k + tl.arange(0, BLOCK_K)
        mask_k = ck < C
        x = tl.load(src_ptr + base[:, None] + ck[None, :].to(tl.int64) * s_c,
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * w_co + (c0 + ck)[:, None] * w_ci + kh * w_kh + kw * w_kw,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    return acc


@triton.jit
def _concat_conv2d_kernel(
    a_ptr, e_ptr, w_ptr, b_ptr, out_ptr,
    N, H, W, Ca, Ce, Cout, Ho, Wo, pad,
    a_n, a_c, a_h, a_w, e_n, e_c, e_h, e_w,
    w_co, w_ci, w_kh, w_kw, o_n, o_c, o_h, o_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N * Ho * Wo
    mask_n = offs_n < Cout
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh + kh - pad
            iw = ow + kw - pad
            valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            acc = _accumulate(acc, a_ptr, a_n, a_c, a_h, a_w, Ca, 0, w_ptr, w_co, w_ci, w_kh, w_kw, kh, kw,
                              n, ih, iw, valid, offs_n, mask_n, IEEE, BLOCK_K)
            acc = _accumulate(acc, e_ptr, e_n, e_c, e_h, e_w, Ce, Ca, w_ptr, w_co, w_ci, w_kh, w_kw, kh, kw,
                              n, ih, iw, valid, offs_n, mask_n, IEEE, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    out = out_ptr + n[:, None] * o_n + offs_n[None, :] * o_c + oh[:, None] * o_h + ow[:, None] * o_w
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def output_shape(a: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[int, int, int, int]:
    n, _, h, w = a.shape
    cout, _, kh, kw = weight.shape
    return n, cout, h + 2 * padding - kh + 1, w + 2 * padding - kw + 1


def concat_conv2d(a: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  padding: int = 0, *, wrap=no_wrap) -> torch.Tensor:
    """Output in the memory format of ``a`` (channels_last in, channels_last out)."""
    n, cout, ho, wo = output_shape(a, weight, padding)
    out = torch.empty((n, cout, ho, wo), device=a.device, dtype=a.dtype, memory_format=layout_of(a))
    if out.numel() == 0:
        return out
    _, ca, h, w = a.shape
    kh, kw = weight.shape[2:]
    grid = (triton.cdiv(n * ho * wo, BLOCK_M), triton.cdiv(cout, BLOCK_N))
    wrap(_concat_conv2d_kernel)[grid](
        a, e, weight, bias if bias is not None else weight, out,
        n, h, w, ca, e.shape[1], cout, ho, wo, padding,
        *a.stride(), *e.stride(), *weight.stride(), *out.stride(),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
        ACC=tl.float64 if a.dtype == torch.float64 else tl.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out
