"""Triton implicit-GEMM convolution (groups=1) with the epilogue fused before the store:
``y = act(conv(x, w) + bias[k] + residual)``.

GEMM view: M = N*P*Q output pixels, N_gemm = K output channels, reduction over
R*S*C. Tiles read channels innermost, so channels_last (NHWC) inputs give contiguous
loads; any strides work. fp32 accumulation; fp16/bf16 inputs, fp32 with TF32 allowed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._layout import conv_output_shape, layout_of
from ._launch import no_wrap

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter runs one config; big blocks keep the Python-level loop short.
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
            (128, 128, 64, 8, 3), (256, 64, 32, 8, 3), (64, 256, 32, 8, 3), (32, 64, 64, 4, 4),
        ]
    ]


@triton.autotune(configs=_CONFIGS, key=["N", "C", "H", "W", "K", "R", "S", "stride_h", "stride_w"])
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    N, C, H, W, K, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    syn, syk, syp, syq,
    srn, srk, srp, srq,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    M = N * P * Q
    m_ok = rm < M
    n_ok = rn < K
    n_idx = rm // (P * Q)
    pq = rm % (P * Q)
    p = pq // Q
    q = pq % Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, R):
        h = p * stride_h - pad_h + r * dil_h
        for s in range(0, S):
            w_ = q * stride_w - pad_w + s * dil_w
            pix_ok = m_ok & (h >= 0) & (h < H) & (w_ >= 0) & (w_ < W)
            x_base = n_idx.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w_.to(tl.int64) * sxw
            for c0 in range(0, C, BLOCK_K):
                rc = c0 + tl.arange(0, BLOCK_K)
                c_ok = rc < C
                a = tl.load(x_ptr + x_base[:, None] + rc[None, :] * sxc, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_ptr + rn[None, :] * swk + rc[:, None] * swc + r * swr + s * sws,
                            mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                if ALLOW_TF32:
                    acc += tl.dot(a, b, input_precision="tf32")
                else:
                    acc += tl.dot(a, b, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        r_off = n_idx.to(tl.int64) * srn + p.to(tl.int64) * srp + q.to(tl.int64) * srq
        acc += tl.load(r_ptr + r_off[:, None] + rn[None, :] * srk, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    y_off = n_idx.to(tl.int64) * syn + p.to(tl.int64) * syp + q.to(tl.int64) * syq
    tl.store(y_ptr + y_off[:, None] + rn[None, :] * syk, acc.to(y_ptr.dtype.element_ty), mask=mask)


def conv2d_bias_act(x, weight, bias, stride, padding, dilation, residual, relu: bool, *, wrap=no_wrap) -> torch.Tensor:
    """Launch the fused convolution (groups=1). Output in layout_of(x)."""
    n, k, p, q = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    y = torch.empty((n, k, p, q), device=x.device, dtype=x.dtype, memory_format=layout_of(x))
    if y.numel() == 0:
        return y
    _, c, h, w = x.shape
    _, _, r, s = weight.shape
    res = residual if residual is not None else y  # never read when HAS_RES is False
    b = bias if bias is not None else y
    allow_tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and x.is_cuda

    def grid(meta):
        return (triton.cdiv(n * p * q, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))

    wrap(_conv_kernel)[grid](
        x, weight, b, res, y,
        n, c, h, w, k, p, q, r, s,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), *y.stride(), *res.stride(),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu, ALLOW_TF32=allow_tf32,
    )
    return y
