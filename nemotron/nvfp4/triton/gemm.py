"""Triton NVFP4 GEMM for Hopper: ``out[M, N] = x[M, K] @ dequantize(w)[N, K].T``.

Hopper has no FP4 MMA, but e2m1 * e4m3 is exact in bf16/fp16 (at most 6 significant bits, magnitudes
in [2^-10, 2688]). So each program loads packed codes (0.5 B/weight) and E4M3 block scales
(1/16 B/weight), expands ``value * block_scale`` to the MMA dtype in registers and feeds ``tl.dot``
(wgmma on Hopper) with fp32 accumulation; the global scale(s) multiply the accumulator once in the
epilogue. The result equals the fp32 reference up to accumulation order.

W4A16: x is bf16/fp16 (or fp32, then IEEE fp32 dot). W4A4: x arrives as NVFP4 codes + scales (from
the quantize kernel) and is expanded the same way: the numerics of a Blackwell NVFP4 GEMM.

Two shape classes share one kernel: few rows (M <= 64: a 16..64-row tile, split-K over programs so
every weight byte is read once and the GPU is filled; fp32 partials reduced in a fixed order), and
many rows (persistent: 2 programs per SM walk 128x128 output tiles in grouped order for L2 reuse,
software-pipelined K loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...dispatch import interpreting
from .quantize import _e2m1_decode, _e4m3_decode

# Launch configurations by shape class. Defaults, not yet tuned on a GPU: `python -m bench
# nvfp4_linear` measures them; the Nemotron shapes get entries here once measured.
# (max M, BM, BN, BK, num_warps, num_stages)
CONFIGS = [
    (16, 16, 64, 128, 4, 4),
    (32, 32, 64, 128, 4, 4),
    (64, 64, 64, 128, 4, 4),
    (512, 64, 128, 64, 4, 3),
    (None, 128, 128, 64, 8, 3),
]
GROUP_M = 8


@triton.jit
def _fp4_tile(p_codes, p_scales, o_r, m_r, o_k, K, ROWS: tl.constexpr, BK: tl.constexpr):
    """Rows ``o_r`` x K-block ``o_k`` of an NVFP4 matrix as fp32 ``value * block_scale`` [ROWS, BK]."""
    o_c = o_k // 2 + tl.arange(0, BK // 2)
    b_c = tl.load(p_codes + o_r[:, None] * (K // 2) + o_c[None, :],
                  mask=m_r[:, None] & (o_c < K // 2)[None, :], other=0).to(tl.int32)        # [ROWS, BK/2]
    b_v = tl.reshape(tl.join(_e2m1_decode(b_c & 15), _e2m1_decode(b_c >> 4)), (ROWS, BK))
    o_s = o_k // 16 + tl.arange(0, BK // 16)
    b_s = tl.load(p_scales + o_r[:, None] * (K // 16) + o_s[None, :],
                  mask=m_r[:, None] & (o_s < K // 16)[None, :], other=0).to(tl.int32)       # [ROWS, BK/16]
    b_s = _e4m3_decode(b_s)
    b_s = tl.reshape(tl.broadcast_to(b_s[:, :, None], (ROWS, BK // 16, 16)), (ROWS, BK))
    return b_v * b_s


@triton.jit
def _nvfp4_gemm_fwd_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, gs_ptr, xgs_ptr, bias_ptr, out_ptr,
                           M, N, K, stride_xm, stride_om, k_per_split,
                           X_FP4: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    i_p, i_s = tl.program_id(0), tl.program_id(1)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_lo = i_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # persistent: each program walks output tiles with a stride of the grid size
    for t in range(i_p, n_m * n_n, tl.num_programs(0)):
        # grouped order: GROUP_M row tiles walk the N tiles together, so weight tiles hit L2
        i_g = t // (GROUP_M * n_n)
        first_m = i_g * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        i_m = first_m + (t % (GROUP_M * n_n)) % size_m
        i_n = (t % (GROUP_M * n_n)) // size_m

        o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_m, m_n = o_m < M, o_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_lo, k_hi, BK):
            if X_FP4:
                b_x = _fp4_tile(x_ptr, xs_ptr, o_m, m_m, k, K, BM, BK).to(DOT_DTYPE)            # [BM, BK]
            else:
                o_k = k + tl.arange(0, BK)
                b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_k[None, :],
                              mask=m_m[:, None] & (o_k < K)[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
            b_w = _fp4_tile(w_ptr, ws_ptr, o_n, m_n, k, K, BN, BK).to(DOT_DTYPE)                 # [BN, BK]
            if IEEE:
                acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision="ieee")
            else:
                acc = tl.dot(b_x, tl.trans(b_w), acc)

        if SPLIT_K == 1:
            acc = acc * tl.load(gs_ptr)
            if X_FP4:
                acc = acc * tl.load(xgs_ptr)
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
            p_o = out_ptr + o_m[:, None] * stride_om + o_n[None, :]
            tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])
        else:
            # fp32 partial sums [SPLIT_K, M, N], reduced by the launcher in a fixed order
            p_o = out_ptr + i_s * M * N + o_m[:, None] * N + o_n[None, :]
            tl.store(p_o, acc, mask=m_m[:, None] & m_n[None, :])


def _pick_config(m: int):
    for max_m, bm, bn, bk, warps, stages in CONFIGS:
        if max_m is None or m <= max_m:
            return bm, bn, bk, warps, stages
    raise AssertionError("CONFIGS ends with a catch-all")


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _split_k(m_tiles: int, n_tiles: int, k: int, bk: int, device: torch.device) -> int:
    """Split K until the grid covers the GPU twice, keeping >= 4 K-steps per split."""
    if m_tiles > 1:
        return 1
    sms = _num_sms(device)
    steps = triton.cdiv(k, bk)
    split = 1
    while n_tiles * split * 2 <= 2 * sms and steps // (split * 2) >= 4:
        split *= 2
    return split


def gemm(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor, w_gs: torch.Tensor,
         bias: torch.Tensor | None = None, *, x_scales: torch.Tensor | None = None,
         x_gs: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ (e2m1(w_codes) * w_scales * w_gs).T (+ bias)`` -> [M, N].

    ``x_scales`` given: x is NVFP4 codes [M, K/2] with E4M3 scales [M, K/16] and global ``x_gs``.
    Scales travel as uint8 bytes. The public boundary (ops.py) has validated shapes and dtypes.
    """
    fp4_x = x_scales is not None
    m = x.shape[0]
    n, k = w_codes.shape[0], w_codes.shape[1] * 2
    assert x.stride(-1) == 1 and w_codes.is_contiguous() and w_scales.is_contiguous()
    out_dtype = out_dtype or x.dtype
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bm, bn, bk, warps, stages = _pick_config(m)
    if interpreting() or x.dtype == torch.float32:
        dot_dtype = tl.float32     # interpreter: tl.dot on bf16 multiplies raw bits (upstream bug)
    else:
        dot_dtype = tl.float16 if (not fp4_x and x.dtype == torch.float16) else tl.bfloat16
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    split = _split_k(m_tiles, n_tiles, k, bk, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    dummy = w_gs
    programs = m_tiles * n_tiles if split > 1 else min(m_tiles * n_tiles, 2 * _num_sms(x.device))
    _nvfp4_gemm_fwd_kernel[(programs, split)](
        x, x_scales if fp4_x else dummy, w_codes, w_scales, w_gs, x_gs if fp4_x else dummy,
        bias if bias is not None else dummy, target,
        m, n, k, x.stride(0), out.stride(0), k_per_split,
        X_FP4=fp4_x, HAS_BIAS=bias is not None, SPLIT_K=split, DOT_DTYPE=dot_dtype,
        IEEE=dot_dtype == tl.float32, BM=bm, BN=bn, BK=bk, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages)
    if split > 1:
        acc = target.sum(0) * w_gs
        if fp4_x:
            acc = acc * x_gs
        if bias is not None:
            acc = acc + bias.float()
        out.copy_(acc)
    return out
