"""Triton kernels: both NVFP4 copies a training backward reads, from one read of each tile.

``quantize_row_col(x)`` for x ``[M, K]`` writes the rowwise copy (1x16 blocks along K, for the fprop /
dgrad GEMMs) and the columnwise copy of ``x^T`` (1x16 blocks along M, optionally after the 16-point
RHT along M, for the wgrad GEMM), in two launches:

1. ``_row_col_amax_fwd_kernel`` reads x once for both global amaxes: max |x| and, with the RHT, max
   |RHT_M(x)| rounded to x's dtype (the columnwise copy's scale is taken after the transform).
2. ``_row_col_quantize_fwd_kernel`` loads each ``[BM, BK]`` tile once, quantizes it as
   ``[BM, BK/16, 16]`` along K, transposes it on chip (``tl.trans``; on sm_90 the layout change goes
   through 16 KiB of shared memory at 64x64) to ``[BK, BM/16, 16]``, applies the RHT along M with the
   butterfly of ``quantize._rht`` and quantizes that along M.

The arithmetic is ``quantize._quantize_fwd_kernel``'s (its helpers are reused), so each copy equals
``reference.quantize_reference`` of x, resp. of ``x.t().contiguous()``, byte for byte.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import dispatch
from .quantize import FLT_MAX, _block_scale, _nearest_code, _rht, _round_to, _sr_uniform, _stochastic_code, _store_fp4

# Tile sizes: BM rows (tokens) x BK columns of x, both multiples of 16; BM/16 blocks per columnwise row.
BM, BK, NUM_WARPS = 64, 64, 4


@triton.jit
def _global_scales(b_v):
    """(S_enc, S_dec) from a tensor amax, as in reference.global_scales (divisors of 0 are swapped for 1
    and fixed up after, which keeps the interpreter's numpy quiet and changes no value)."""
    s_enc = tl.minimum(tl.div_rn(2688.0 + 0.0 * b_v, tl.where(b_v == 0.0, 1.0, b_v)), FLT_MAX)
    s_enc = tl.where((b_v == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    return s_enc, tl.div_rn(1.0 + 0.0 * s_enc, s_enc)


@triton.jit
def _finite_amax(b_x):
    b_a = tl.abs(b_x)
    b_a = tl.where(b_a < float("inf"), b_a, 0.0)                        # finite only (NaN < inf is False)
    return tl.max(tl.max(tl.max(b_a, axis=2), axis=1), axis=0)


@triton.jit
def _quantize_store(b_x, s_enc, s_dec, seed, codes_ptr, scales_ptr, o_row, m_r, o_b, N,
                    STOCHASTIC: tl.constexpr, R: tl.constexpr, NB: tl.constexpr):
    """Quantize b_x [R, NB, 16] (rows o_row of an [*, N] tensor, 16-blocks o_b of N) and store it."""
    b_nan = b_x != b_x
    b_bmax = tl.max(tl.where(b_nan, 0.0, tl.abs(b_x)), axis=2)          # [R, NB]
    b_bnan = tl.max(b_nan.to(tl.int32), axis=2)                         # [R, NB]
    b_s, b_inv = _block_scale(b_bmax, b_bnan, s_enc, s_dec, R, NB)      # [R, NB]
    b_y = tl.abs(b_x * b_inv[:, :, None])                               # [R, NB, 16]
    if STOCHASTIC:
        o_e = tl.arange(0, 16)
        o_idx = o_row[:, None, None] * N + (o_b[None, :, None] * 16 + o_e[None, None, :])   # index in [*, N]
        b_c = _stochastic_code(b_y, _sr_uniform(seed, o_idx))
    else:
        b_c = _nearest_code(b_y)
    _store_fp4(b_c, b_s, b_x, b_bnan, codes_ptr, scales_ptr, o_row, m_r, o_b, N, R, NB)


@triton.jit
def _load_rows_cols(x_ptr, i_m, i_k, M, K, BM: tl.constexpr, BK: tl.constexpr):
    """The [BM, BK] tile (i_m, i_k) of x as fp32, its row and column indices (int64) and masks;
    M and K are multiples of 16, so a 16-block is wholly in or out."""
    o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    o_k = (i_k * BK + tl.arange(0, BK)).to(tl.int64)
    m_m, m_k = o_m < M, o_k < K
    p_x = x_ptr + o_m[:, None] * K + o_k[None, :]
    b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0).to(tl.float32)   # [BM, BK]
    return b_x, o_m, o_k, m_m, m_k


@triton.jit
def _col_tile(b_x, DTYPE: tl.constexpr, HADAMARD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """x^T of the tile as [BK, BM/16, 16] fp32: 16-blocks along M, RHT'd and rounded to DTYPE when asked."""
    b_t = tl.reshape(tl.trans(b_x), (BK, BM // 16, 16))
    if HADAMARD:
        b_t = _round_to(_rht(b_t, BK, BM // 16, False), DTYPE).to(tl.float32)
    return b_t


@triton.jit
def _row_col_amax_fwd_kernel(x_ptr, amax_ptr, M, K, HADAMARD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    b_x, o_m, o_k, m_m, m_k = _load_rows_cols(x_ptr, i_m, i_k, M, K, BM, BK)
    tl.atomic_max(amax_ptr, _finite_amax(tl.reshape(b_x, (BM, BK // 16, 16))))
    if HADAMARD:
        tl.atomic_max(amax_ptr + 1, _finite_amax(_col_tile(b_x, x_ptr.dtype.element_ty, True, BM, BK)))


@triton.jit
def _row_col_quantize_fwd_kernel(x_ptr, row_codes_ptr, row_scales_ptr, col_codes_ptr, col_scales_ptr,
                                 row_gs_ptr, col_gs_ptr, amax_ptr, seed_row, seed_col, M, K,
                                 HADAMARD: tl.constexpr, STOCHASTIC: tl.constexpr,
                                 BM: tl.constexpr, BK: tl.constexpr):
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    b_ar = tl.load(amax_ptr)
    b_ac = b_ar                                 # without the RHT, x^T has x's amax
    if HADAMARD:
        b_ac = tl.load(amax_ptr + 1)
    s_enc_r, s_dec_r = _global_scales(b_ar)
    s_enc_c, s_dec_c = _global_scales(b_ac)
    if (i_m == 0) & (i_k == 0):
        tl.store(row_gs_ptr, s_dec_r)
        tl.store(col_gs_ptr, s_dec_c)

    b_x, o_m, o_k, m_m, m_k = _load_rows_cols(x_ptr, i_m, i_k, M, K, BM, BK)   # [BM, BK]
    # rowwise: rows o_m of [M, K], blocks along K
    o_bk = i_k * (BK // 16) + tl.arange(0, BK // 16)
    _quantize_store(tl.reshape(b_x, (BM, BK // 16, 16)), s_enc_r, s_dec_r, seed_row, row_codes_ptr, row_scales_ptr,
                    o_m, m_m, o_bk, K, STOCHASTIC, BM, BK // 16)
    # columnwise: rows o_k of [K, M], blocks along M
    o_bm = i_m * (BM // 16) + tl.arange(0, BM // 16)
    _quantize_store(_col_tile(b_x, x_ptr.dtype.element_ty, HADAMARD, BM, BK), s_enc_c, s_dec_c, seed_col,
                    col_codes_ptr, col_scales_ptr, o_k, m_k, o_bm, M, STOCHASTIC, BK, BM // 16)


# ---- launcher ------------------------------------------------------------------------------------

def _check(x, hadamard_col, stochastic, seed_row, seed_col) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dispatch.FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if m == 0 or m % 16 or k == 0 or k % 16:
        raise ValueError(f"x: expected M and K positive multiples of 16 (the block size along both), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous tensor, got strides {x.stride()}; call .contiguous() first")
    if x.device.type == "cuda" and dispatch.interpreting():
        raise ValueError("x: Triton runs interpreted (TRITON_INTERPRET=1), so the kernel takes CPU tensors, "
                         "not CUDA ones")
    if x.device.type not in ("cuda", "cpu") or (x.device.type == "cpu" and not dispatch.interpreting()):
        raise ValueError(f"x: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device {x.device}")
    dispatch.check_bool("hadamard_col", hadamard_col)
    dispatch.check_bool("stochastic", stochastic)
    dispatch.check_int("seed_row", seed_row, lo=0, hi=2**63 - 1)
    dispatch.check_int("seed_col", seed_col, lo=0, hi=2**63 - 1)


def quantize_row_col(x: torch.Tensor, *, hadamard_col: bool, stochastic: bool, seed_row: int, seed_col: int):
    """Both NVFP4 copies of x ``[M, K]`` (contiguous fp32/fp16/bf16, M and K positive multiples of 16).

    Returns ``(row_codes uint8 [M, K/2], row_scales float8_e4m3fn [M, K/16], row_gs fp32 [],
    col_codes uint8 [K, M/2], col_scales float8_e4m3fn [K, M/16], col_gs fp32 [])``, byte-identical to::

        reference.quantize_reference(x, stochastic=stochastic, seed=seed_row)
        reference.quantize_reference(x.t().contiguous(), hadamard=hadamard_col, stochastic=stochastic, seed=seed_col)

    (the columnwise RHT mixes 16 consecutive tokens, is rounded to x's dtype, and its global amax is
    taken after it; stochastic rounding indexes each copy's elements in its own ``[M, K]`` / ``[K, M]``
    layout). Seeds are ints in ``[0, 2**63 - 1]``.

    Example::

        >>> rc, rs, rg, cc, cs, cg = quantize_row_col(dy, hadamard_col=True, stochastic=True, seed_row=1, seed_col=2)
        >>> cc.shape == (dy.shape[1], dy.shape[0] // 2)
        True
    """
    _check(x, hadamard_col, stochastic, seed_row, seed_col)
    m, k = x.shape
    dev = x.device
    row_codes = torch.empty(m, k // 2, dtype=torch.uint8, device=dev)
    row_scales = torch.empty(m, k // 16, dtype=torch.uint8, device=dev)
    col_codes = torch.empty(k, m // 2, dtype=torch.uint8, device=dev)
    col_scales = torch.empty(k, m // 16, dtype=torch.uint8, device=dev)
    row_gs = torch.empty((), dtype=torch.float32, device=dev)
    col_gs = torch.empty((), dtype=torch.float32, device=dev)
    amax = torch.zeros(2, dtype=torch.float32, device=dev)         # [row, post-RHT col]; atomic max from 0
    grid = (triton.cdiv(m, BM), triton.cdiv(k, BK))
    _row_col_amax_fwd_kernel[grid](x, amax, m, k, HADAMARD=hadamard_col, BM=BM, BK=BK, num_warps=NUM_WARPS)
    _row_col_quantize_fwd_kernel[grid](
        x, row_codes, row_scales, col_codes, col_scales, row_gs, col_gs, amax, seed_row, seed_col, m, k,
        HADAMARD=hadamard_col, STOCHASTIC=stochastic, BM=BM, BK=BK, num_warps=NUM_WARPS)
    return (row_codes, row_scales.view(torch.float8_e4m3fn), row_gs,
            col_codes, col_scales.view(torch.float8_e4m3fn), col_gs)
