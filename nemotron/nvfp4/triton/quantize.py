"""Triton kernels: global amax, NVFP4 quantize (1x16 / 16x16, nearest / stochastic, optional fused
RHT), dequantize, and the standalone 16-point RHT.

Every kernel works on tiles ``[BM, NB, 16]``: BM rows, NB 16-element blocks of K. The arithmetic
repeats ``nemotron/nvfp4/reference.py`` operation for operation in fp32 (``div_rn`` where the
reference divides; E4M3 and E2M1 rounding in integer arithmetic, because the interpreter's fp8 cast
is not round-to-nearest), so kernel and reference agree byte for byte.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ..reference import global_scales

# globals a kernel reads must be constexpr
FLT_MAX = tl.constexpr(ref.FLT_MAX)
HADAMARD_SIGN_MASK = tl.constexpr(ref.HADAMARD_SIGN_MASK)
SR_MUL1, SR_MUL2 = tl.constexpr(ref.SR_MUL1), tl.constexpr(ref.SR_MUL2)
SR_HI_MUL, SR_KEY_SALT = tl.constexpr(ref.SR_HI_MUL), tl.constexpr(ref.SR_KEY_SALT)

# Tile sizes: BM rows x NB blocks of 16. BM is a multiple of 16 so a 16x16 tile never straddles programs.
BM, NB, NUM_WARPS = 32, 8, 4


@triton.jit
def _mix32(v, k):
    """reference.mix on uint32 v and k (uint32 products wrap mod 2^32; shifts are logical)."""
    v = v ^ (v >> 16)
    v = v * SR_MUL1
    v = v ^ k
    v = v ^ (v >> 15)
    v = v * SR_MUL2
    return v ^ (v >> 15)


@triton.jit
def _sr_uniform(seed, idx):
    """reference.sr_uniform: the stochastic-rounding u in [0, 1) (fp32, 24 bits) of element indices idx
    (int64, >= 0) under an integer ``seed`` (taken as 64 bits)."""
    # (+ 0: the interpreter holds an int in [2^31, 2^32) as a numpy uint32 under an int64 type)
    s = tl.cast(seed, tl.int64) + 0
    s_lo, s_hi = s.to(tl.uint32), (s >> 32).to(tl.uint32)
    k0 = _mix32(s_lo, s_hi)
    k1 = _mix32(k0 ^ SR_KEY_SALT, s_hi)
    idx = tl.cast(idx, tl.int64)
    v = idx.to(tl.uint32) ^ ((idx >> 32).to(tl.uint32) * SR_HI_MUL) ^ k0
    return (_mix32(v, k1) >> 8).to(tl.float32) * 5.9604644775390625e-08      # 2^-24


@triton.jit
def _bfly2(x, R: tl.constexpr):
    e, o = tl.split(x)                                                  # [R]
    return tl.join(e + o, e - o)                                        # [R, 2]


@triton.jit
def _bfly4(x, R: tl.constexpr):
    e, o = tl.split(tl.reshape(x, (R, 2, 2)))                           # [R, 2]
    return tl.reshape(tl.join(_bfly2(e + o, R), _bfly2(e - o, R)), (R, 4))


@triton.jit
def _bfly8(x, R: tl.constexpr):
    e, o = tl.split(tl.reshape(x, (R, 4, 2)))                           # [R, 4]
    return tl.reshape(tl.join(_bfly4(e + o, R), _bfly4(e - o, R)), (R, 8))


@triton.jit
def _bfly16(x, R: tl.constexpr):
    """Unnormalized Sylvester-Hadamard transform of x [R, 16]: y = interleave(H8(e + o), H8(e - o))."""
    e, o = tl.split(tl.reshape(x, (R, 8, 2)))                           # [R, 8]
    return tl.reshape(tl.join(_bfly8(e + o, R), _bfly8(e - o, R)), (R, 16))


@triton.jit
def _rht(b_x, BM: tl.constexpr, NB: tl.constexpr, INVERSE: tl.constexpr):
    """diag(s) @ H16 / 4 (or its transpose) applied to each 16-block of b_x [BM, NB, 16], fp32."""
    o_e = tl.arange(0, 16)
    b_sg = 1.0 - 2.0 * ((tl.full((16,), HADAMARD_SIGN_MASK, tl.int32) >> o_e) & 1).to(tl.float32)   # [16]
    b_x = tl.reshape(b_x, (BM * NB, 16))
    if not INVERSE:
        b_x = b_x * b_sg[None, :]
    b_y = _bfly16(b_x, BM * NB) * 0.25
    if INVERSE:
        b_y = b_y * b_sg[None, :]
    return tl.reshape(b_y, (BM, NB, 16))


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to-nearest-even to DTYPE, as DTYPE. bf16 is rounded by hand: the interpreter's
    fp32 -> bf16 cast truncates, and the kernels must match torch's rounding byte for byte."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536            # -65536 == 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)       # exact: already a bf16 value
    else:
        return x.to(DTYPE)


@triton.jit
def _e4m3_encode(v):
    """E4M3 code (int32) of fp32 v >= 0 (not NaN): round-to-nearest-even, saturating at 448."""
    bits = v.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    man = (bits & 0x7FFFFF) | 0x800000
    shift = tl.minimum(20 + tl.maximum(-6 - e, 0), 30)                  # 20 for normals, more below 2^-6
    q = (man + (1 << (shift - 1)) - 1 + ((man >> shift) & 1)) >> shift
    return tl.minimum(tl.maximum(e + 6, 0) * 8 + q, 126)


@triton.jit
def _e4m3_decode(c):
    """fp32 value of E4M3 codes c (int32, 0..127); 0x7F is NaN."""
    ex = c >> 3
    m = c & 7
    normal = (((ex + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(ex == 0, m.to(tl.float32) * 0.001953125, normal)       # subnormal step 2^-9
    return tl.where(c == 0x7F, (c * 0 + 0x7FC00000).to(tl.float32, bitcast=True), v)


@triton.jit
def _e2m1_decode(c):
    """fp32 value of 4-bit E2M1 codes c (int32)."""
    m = c & 7
    ex = m >> 1
    normal = (((ex + 126) << 23) | ((m & 1) << 22)).to(tl.float32, bitcast=True)
    v = tl.where(ex == 0, (m & 1).to(tl.float32) * 0.5, normal)
    # OR in the sign bit: Triton's negation is 0 - v, which would turn code 8 (-0) into +0
    return (v.to(tl.int32, bitcast=True) | ((c >> 3) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _block_scale(b_bmax, b_bnan, s_enc, s_dec, BM: tl.constexpr, NB: tl.constexpr):
    """E4M3 block-scale codes and the fp32 reciprocals of their decoded values times s_dec, [BM, NB]."""
    b_s = _e4m3_encode(b_bmax * (s_enc * 0.1666666716337204))          # fp32(1/6)
    b_s = tl.where(b_bnan > 0, 0x7F, b_s)
    b_den = _e4m3_decode(b_s) * s_dec
    b_inv = tl.minimum(tl.div_rn(tl.full((BM, NB), 1.0, tl.float32), tl.where(b_den == 0.0, 1.0, b_den)), FLT_MAX)
    return b_s, tl.where(b_den == 0.0, FLT_MAX, b_inv)                  # 1/0 = inf, clamped


@triton.jit
def _nearest_code(b_y):
    """E2M1 magnitude index of |y| rounded to nearest, ties to even (the midpoints' comparisons)."""
    return ((b_y > 0.25).to(tl.int32) + (b_y >= 0.75).to(tl.int32) + (b_y > 1.25).to(tl.int32)
            + (b_y >= 1.75).to(tl.int32) + (b_y > 2.5).to(tl.int32) + (b_y >= 3.5).to(tl.int32)
            + (b_y > 5.0).to(tl.int32))


@triton.jit
def _stochastic_code(b_y, b_u):
    """3-bit E2M1 magnitude code of b_y >= 0 rounded up with probability (y - lo) / (hi - lo), for
    uniforms b_u in [0, 1) (reference.e2m1_magnitude_stochastic)."""
    b_y = tl.minimum(b_y, 6.0)
    b_step = tl.where(b_y < 2.0, 0.5, tl.where(b_y < 4.0, 1.0, 2.0))
    b_q = tl.minimum(tl.floor((b_y + b_u * b_step) * (1.0 / b_step)) * b_step, 6.0)
    return ((b_q >= 0.5).to(tl.int32) + (b_q >= 1.0).to(tl.int32) + (b_q >= 1.5).to(tl.int32)
            + (b_q >= 2.0).to(tl.int32) + (b_q >= 3.0).to(tl.int32) + (b_q >= 4.0).to(tl.int32)
            + (b_q >= 6.0).to(tl.int32))


@triton.jit
def _store_fp4(b_c, b_s, b_x, b_bnan, codes_ptr, scales_ptr, o_row, m_r, o_b, K,
               BM: tl.constexpr, NB: tl.constexpr):
    """Add x's sign bit to the magnitude codes, zero NaN blocks, pack two codes per byte, store."""
    b_c = b_c + 8 * (b_x.to(tl.int32, bitcast=True) < 0).to(tl.int32)   # sign bit, so -0.1 -> -0
    b_c = tl.where(b_bnan[:, :, None] > 0, 0, b_c)
    b_lo, b_hi = tl.split(tl.reshape(b_c, (BM, NB, 8, 2)))              # [BM, NB, 8]
    m_b = m_r[:, None] & (o_b < K // 16)[None, :]                       # [BM, NB]
    o_c = tl.arange(0, 8)
    p_c = codes_ptr + o_row[:, None, None] * (K // 2) + (o_b[None, :, None] * 8 + o_c[None, None, :])
    tl.store(p_c, (b_lo | (b_hi << 4)).to(tl.uint8), mask=m_b[:, :, None])
    p_s = scales_ptr + o_row[:, None] * (K // 16) + o_b[None, :]
    tl.store(p_s, b_s.to(tl.uint8), mask=m_b)


@triton.jit
def _load_tile(x_ptr, o_row, m_row, stride_xm, i_k, K, NB: tl.constexpr):
    """x[o_row, i_k*NB*16 : ...] as fp32 [BM, NB, 16]; masked rows/blocks read 0."""
    o_b = i_k * NB + tl.arange(0, NB)
    o_e = tl.arange(0, 16)
    p_x = x_ptr + o_row[:, None, None] * stride_xm + (o_b[None, :, None] * 16 + o_e[None, None, :])
    m_x = m_row[:, None, None] & (o_b < K // 16)[None, :, None]
    return tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)              # [BM, NB, 16]


@triton.jit
def _amax_fwd_kernel(x_ptr, amax_ptr, M, K, stride_xm,
                     HADAMARD: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr):
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    o_row = i_m * BM + tl.arange(0, BM)
    b_x = _load_tile(x_ptr, o_row.to(tl.int64), o_row < M, stride_xm, i_k, K, NB)
    if HADAMARD:
        # The fused path quantizes the RHT output rounded to x's dtype, so its amax is taken there too.
        b_x = _round_to(_rht(b_x, BM, NB, False), x_ptr.dtype.element_ty).to(tl.float32)
    b_a = tl.abs(b_x)
    b_a = tl.where(b_a < float("inf"), b_a, 0.0)                        # finite only (NaN < inf is False)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.max(b_a, axis=2), axis=1), axis=0))


@triton.jit
def _quantize_fwd_kernel(x_ptr, codes_ptr, scales_ptr, gs_out_ptr, scale_src_ptr, seed,
                         R, K, n_rb, stride_xm,
                         TILE_M: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
                         HADAMARD: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr):
    i_p, i_k = tl.program_id(0), tl.program_id(1)
    i_l, i_r = i_p // n_rb, i_p % n_rb
    o_r = i_r * BM + tl.arange(0, BM)                                   # row within its matrix
    m_r = o_r < R
    o_row = i_l.to(tl.int64) * R + o_r                                  # row of the [L*R, K] view

    # global scales, as in reference.global_scales
    b_v = tl.load(scale_src_ptr)
    if HAS_GLOBAL_SCALE:
        s_dec = b_v
        s_enc = tl.div_rn(1.0 + 0.0 * b_v, b_v)
    else:
        # (divisors of 0 are swapped for 1 and the result fixed up after, which keeps the
        # interpreter's numpy quiet and changes no value)
        s_enc = tl.minimum(tl.div_rn(2688.0 + 0.0 * b_v, tl.where(b_v == 0.0, 1.0, b_v)), FLT_MAX)
        s_enc = tl.where((b_v == 0.0) | (s_enc == 0.0), 1.0, s_enc)
        s_dec = tl.div_rn(1.0 + 0.0 * s_enc, s_enc)
    if (i_p == 0) & (i_k == 0):
        tl.store(gs_out_ptr, s_dec)

    b_x = _load_tile(x_ptr, o_row, m_r, stride_xm, i_k, K, NB)          # [BM, NB, 16]
    if HADAMARD:
        b_x = _round_to(_rht(b_x, BM, NB, False), x_ptr.dtype.element_ty).to(tl.float32)
    b_nan = b_x != b_x
    b_bmax = tl.max(tl.where(b_nan, 0.0, tl.abs(b_x)), axis=2)          # [BM, NB]
    b_bnan = tl.max(b_nan.to(tl.int32), axis=2)                         # [BM, NB]
    if TILE_M > 1:
        # one amax per TILE_M x 16 tile, replicated over its rows
        b_bmax = tl.max(tl.reshape(b_bmax, (BM // TILE_M, TILE_M, NB)), axis=1)
        b_bmax = tl.reshape(tl.broadcast_to(b_bmax[:, None, :], (BM // TILE_M, TILE_M, NB)), (BM, NB))
        b_bnan = tl.max(tl.reshape(b_bnan, (BM // TILE_M, TILE_M, NB)), axis=1)
        b_bnan = tl.reshape(tl.broadcast_to(b_bnan[:, None, :], (BM // TILE_M, TILE_M, NB)), (BM, NB))

    b_s, b_inv = _block_scale(b_bmax, b_bnan, s_enc, s_dec, BM, NB)     # [BM, NB]
    b_y = tl.abs(b_x * b_inv[:, :, None])                               # [BM, NB, 16]

    o_b = i_k * NB + tl.arange(0, NB)
    o_e = tl.arange(0, 16)
    if STOCHASTIC:
        o_idx = o_row[:, None, None] * K + (o_b[None, :, None] * 16 + o_e[None, None, :])
        b_c = _stochastic_code(b_y, _sr_uniform(seed, o_idx))
    else:
        b_c = _nearest_code(b_y)
    _store_fp4(b_c, b_s, b_x, b_bnan, codes_ptr, scales_ptr, o_row, m_r, o_b, K, BM, NB)


@triton.jit
def _dequantize_fwd_kernel(codes_ptr, scales_ptr, gs_ptr, y_ptr, M, K,
                           BM: tl.constexpr, NB: tl.constexpr):
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    o_row = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    o_b = i_k * NB + tl.arange(0, NB)
    m_b = (o_row < M)[:, None] & (o_b < K // 16)[None, :]               # [BM, NB]
    o_c = tl.arange(0, 8)
    p_c = codes_ptr + o_row[:, None, None] * (K // 2) + (o_b[None, :, None] * 8 + o_c[None, None, :])
    b_c = tl.load(p_c, mask=m_b[:, :, None], other=0).to(tl.int32)      # [BM, NB, 8]
    b_v = tl.reshape(tl.join(_e2m1_decode(b_c & 15), _e2m1_decode(b_c >> 4)), (BM, NB, 16))
    p_s = scales_ptr + o_row[:, None] * (K // 16) + o_b[None, :]
    b_s = _e4m3_decode(tl.load(p_s, mask=m_b, other=0).to(tl.int32)) * tl.load(gs_ptr)   # [BM, NB]
    o_e = tl.arange(0, 16)
    p_y = y_ptr + o_row[:, None, None] * K + (o_b[None, :, None] * 16 + o_e[None, None, :])
    tl.store(p_y, _round_to(b_v * b_s[:, :, None], y_ptr.dtype.element_ty), mask=m_b[:, :, None])


@triton.jit
def _hadamard_fwd_kernel(x_ptr, y_ptr, M, K, stride_xm, INVERSE: tl.constexpr,
                         BM: tl.constexpr, NB: tl.constexpr):
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    o_row = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    m_row = o_row < M
    b_y = _rht(_load_tile(x_ptr, o_row, m_row, stride_xm, i_k, K, NB), BM, NB, INVERSE)
    o_b = i_k * NB + tl.arange(0, NB)
    o_e = tl.arange(0, 16)
    p_y = y_ptr + o_row[:, None, None] * K + (o_b[None, :, None] * 16 + o_e[None, None, :])
    m_y = m_row[:, None, None] & (o_b < K // 16)[None, :, None]
    tl.store(p_y, _round_to(b_y, y_ptr.dtype.element_ty), mask=m_y)


# ---- launchers: the public boundary (ops.py) has validated; these assert the layout they need ----

def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.view(-1, x.shape[-1])
    assert x2.stride(-1) == 1
    return x2


def amax(x: torch.Tensor, *, hadamard: bool = False) -> torch.Tensor:
    """max |x| over finite elements (of the RHT output rounded to x.dtype when ``hadamard``), fp32 []."""
    x2 = _rows(x)
    out = torch.zeros((), dtype=torch.float32, device=x.device)
    m, k = x2.shape
    if x2.numel():
        grid = (triton.cdiv(m, BM), triton.cdiv(k // 16, NB))
        _amax_fwd_kernel[grid](x2, out, m, k, x2.stride(0), HADAMARD=hadamard, BM=BM, NB=NB,
                               num_warps=NUM_WARPS)
    return out


def quantize(x: torch.Tensor, *, tile_rows: int, global_scale: torch.Tensor | None,
             stochastic: bool, seed: int, hadamard: bool):
    """Kernel twin of ``reference.quantize_reference``; same arguments and returns."""
    k = x.shape[-1]
    x2 = _rows(x)
    codes = torch.empty(*x.shape[:-1], k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*x.shape[:-1], k // 16, dtype=torch.uint8, device=x.device)
    if x.numel() == 0:
        return codes, scales.view(torch.float8_e4m3fn), global_scales(x.new_zeros((), dtype=torch.float32), global_scale)[1]
    gs = torch.empty((), dtype=torch.float32, device=x.device)
    src = global_scale.float().reshape(()) if global_scale is not None else amax(x, hadamard=hadamard)
    rows = x.shape[-2] if tile_rows > 1 else x2.shape[0]
    n_rb = triton.cdiv(rows, BM)
    grid = (x2.shape[0] // rows * n_rb, triton.cdiv(k // 16, NB))
    _quantize_fwd_kernel[grid](
        x2, codes, scales, gs, src, seed, rows, k, n_rb, x2.stride(0),
        TILE_M=tile_rows, HAS_GLOBAL_SCALE=global_scale is not None, STOCHASTIC=stochastic,
        HADAMARD=hadamard, BM=BM, NB=NB, num_warps=NUM_WARPS)
    return codes, scales.view(torch.float8_e4m3fn), gs


def dequantize(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    k = codes.shape[-1] * 2
    c2 = codes.reshape(-1, k // 2)
    assert c2.is_contiguous() and block_scales.is_contiguous()
    y = torch.empty(*codes.shape[:-1], k, dtype=dtype, device=codes.device)
    m = c2.shape[0]
    if m and k:
        grid = (triton.cdiv(m, BM), triton.cdiv(k // 16, NB))
        _dequantize_fwd_kernel[grid](c2, block_scales.view(torch.uint8), global_scale.float().reshape(()),
                                     y, m, k, BM=BM, NB=NB, num_warps=NUM_WARPS)
    return y


def hadamard(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m, k = x2.shape
    if m and k:
        grid = (triton.cdiv(m, BM), triton.cdiv(k // 16, NB))
        _hadamard_fwd_kernel[grid](x2, y, m, k, x2.stride(0), INVERSE=inverse, BM=BM, NB=NB,
                                   num_warps=NUM_WARPS)
    return y
