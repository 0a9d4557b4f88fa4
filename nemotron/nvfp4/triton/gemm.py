"""Triton NVFP4 GEMM for Hopper: ``out[M, N] = x[M, K] @ dequantize(w)[N, K].T``.

Hopper has no FP4 MMA, but e2m1 * e4m3 is exact in bf16/fp16 (at most 6 significant bits, magnitudes
in [2^-10, 2688]). So each program loads packed codes as 32-bit words (0.5 B/weight) and E4M3 block
scales (1/16 B/weight), expands ``value * block_scale * 2^-7`` to the MMA dtype in registers (bit
placement and one paired multiply per two weights, see ``_FP4_ASM_BF16``) and feeds ``tl.dot`` (wgmma
or mma.sync) with fp32 accumulation; the global scale(s) times 2^7 multiply the accumulator once in the
epilogue. The result equals the fp32 reference up to accumulation order.

W4A16: x is bf16/fp16 (or fp32, then IEEE fp32 dot). W4A4: x arrives as NVFP4 codes + scales (from
the quantize kernel) and is expanded the same way: the numerics of a Blackwell NVFP4 GEMM.

Two shape classes share one kernel: few rows (M <= 64: a 16..64-row tile, 64/32/16 weight rows wide,
split-K over programs so every weight byte is read once and the GPU is filled with >= 2 CTAs per SM;
the fp32 partials reduced in split order, scaled and cast by one small kernel), and many rows
(persistent: as many programs per SM as are resident walk the output tiles in grouped order for L2
reuse, software-pipelined K loop). The launch shapes are data: CONFIGS by M bucket, TUNED per
Nemotron linear (see pick_config).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...dispatch import interpreting

# Launch configurations by M bucket: (max M, BM, BN, BK, num_warps, num_stages, occupancy). Occupancy:
# resident CTAs per SM on sm_90 as `python -m bench.static` measures them (registers, shared memory);
# the persistent grid of the many-rows class holds exactly that many programs per SM. The few-rows
# buckets (M <= 64, split-K) take their BN and split from TUNED, or from _decode_shape for other shapes.
CONFIGS = [
    (16, 16, 64, 128, 4, 4, 3),
    (32, 32, 64, 128, 4, 4, 2),
    (64, 64, 64, 128, 4, 4, 2),
    (512, 64, 128, 64, 4, 3, 3),
    (None, 128, 128, 128, 8, 3, 1),
]
SPLIT_K_MAX_M = 64
# The 65..512-row bucket when its 128-wide tiles give fewer than 2 per SM (e.g. q_proj at M=256: 128):
# (BN, BK) 64 x 128, 4.94 SASS instructions per weight (4.64 at 128 x 64), occupancy 3 as well.
NARROW_BN, NARROW_BK = 64, 128
GROUP_M = 8
WGMMA_MIN_BN = 32
# The few-rows launch shapes of the Nemotron linears on a 132-SM Hopper (H100 / H200 SXM), chosen with
# the static report (bench.static): (N, K, max M of the bucket) -> (BN, split). Each reaches >= 2 CTAs
# per SM with the per-SM share of CTAs within 10% of the mean where the shape allows, >= 2 K steps per
# split (any for 64-row tiles), and the expansion at <= 6 SASS instructions per weight. The 17..32-row bucket runs 64-row wgmma
# tiles at BN >= WGMMA_MIN_BN (see pick_config), so its entries are the 64-row bucket's but for k/v_proj,
# whose 16-wide mma.sync tiles give twice the CTAs of 32-wide wgmma ones.
TUNED_SMS = 132
TUNED = {
    (18560, 4096, 16): (64, 4), (18560, 4096, 32): (64, 4), (18560, 4096, 64): (64, 4),   # super in_proj
    (4096, 8192, 16): (64, 8), (4096, 8192, 32): (64, 8), (4096, 8192, 64): (64, 8),   # super out_proj
    (4096, 4096, 16): (64, 8), (4096, 4096, 32): (64, 8), (4096, 4096, 64): (64, 8),   # super q_proj, super o_proj
    (256, 4096, 16): (16, 32), (256, 4096, 32): (16, 32), (256, 4096, 64): (32, 32),   # super kv_proj
    (5376, 4096, 16): (64, 16), (5376, 4096, 32): (64, 16), (5376, 4096, 64): (64, 16),   # super shared_up
    (4096, 5376, 16): (64, 6), (4096, 5376, 32): (64, 6), (4096, 5376, 64): (64, 6),   # super shared_down
    (131072, 4096, 16): (64, 1), (131072, 4096, 32): (64, 1), (131072, 4096, 64): (64, 1),   # super lm_head
    (1024, 4096, 16): (32, 16), (1024, 4096, 32): (64, 32), (1024, 4096, 64): (64, 32),   # super fc1_latent
    (4096, 1024, 16): (32, 4), (4096, 1024, 32): (64, 8), (4096, 1024, 64): (64, 8),   # super fc2_latent
    (10304, 2688, 16): (64, 3), (10304, 2688, 32): (64, 3), (10304, 2688, 64): (64, 3),   # nano in_proj
    (2688, 4096, 16): (32, 16), (2688, 4096, 32): (64, 32), (2688, 4096, 64): (64, 32),   # nano out_proj, nano o_proj
    (4096, 2688, 16): (64, 6), (4096, 2688, 32): (64, 21), (4096, 2688, 64): (64, 21),   # nano q_proj
    (256, 2688, 16): (16, 21), (256, 2688, 32): (16, 21), (256, 2688, 64): (32, 21),   # nano kv_proj
    (3712, 2688, 16): (64, 11), (3712, 2688, 32): (64, 21), (3712, 2688, 64): (64, 21),   # nano shared_up
    (2688, 3712, 16): (64, 15), (2688, 3712, 32): (64, 29), (2688, 3712, 64): (64, 29),   # nano shared_down
    (131072, 2688, 16): (64, 1), (131072, 2688, 32): (64, 1), (131072, 2688, 64): (64, 1),   # nano lm_head
}
# Expanded tiles hold ``value * block_scale * TILE_SCALE`` (exact in bf16/fp16, see _FP4_ASM_BF16); the
# epilogue multiplies the global scale by 1 / TILE_SCALE, a power of two, so the result is unchanged.
TILE_SCALE = 2.0 ** -7

# One 32-bit word (8 codes, element 0 in the low nibble) -> 8 values in 16-bit registers, per MMA dtype.
# Each 32-bit result holds codes 2j, 2j + 1 (byte j), the K-adjacent pair the MMA operand registers and
# the shared-memory stores take, so no repacking follows. a / b: the low / high nibbles of the 4 bytes;
# prmt puts byte j's two nibbles 16 bits apart (selector nibbles 8: a sign-replicated byte of a, 0).
# bf16: nibbles at bits 0..3 / 16..19; one multiply by 2^6 + 2^12 places two copies, disjoint, so the
# sum is their OR; the mask keeps the sign (-> bit 15) and the magnitude e1 e0 m (-> bits 8..6): bf16
# exponent field e1e0, mantissa msb m, i.e. 2^-126 * e2m1 value, subnormal codes (0, +-0.5) included.
# The bf16x2 multiply by s * 2^119 (s = the E4M3 block scale; 448 * 2^119 < bf16 max) gives
# value * s * 2^-7: at most 6 significant bits, magnitude >= 2^-17, so exact, as are the signs of zero
# and a NaN scale. fp16: nibbles at bits 9..12 / 25..28 (a, b pre-shifted); OR with itself << 3 and the
# mask keep the magnitude at 11..9 and the sign at 15, i.e. 2^-14 * value (subnormals included); the
# f16x2 multiply by s * 2^7 (<= 57344) gives value * s * 2^-7, a multiple of 2^-17 with at most 6
# significant bits, below 2^5: exact. $0..$7: codes 0..7; $8: the word; $9: the fp32 multiplier.
_FP4_ASM_BF16 = tl.constexpr("""{
.reg .b32 a, b, t, s;
cvt.rn.bf16x2.f32 s, $9, $9;
and.b32 a, $8, 0x0F0F0F0F;
shr.b32 b, $8, 4;
and.b32 b, b, 0x0F0F0F0F;
""" + "".join(f"""prmt.b32 t, a, b, {0x8480 + 0x101 * j:#x};
mul.lo.u32 t, t, 4160;
and.b32 t, t, 0x81C081C0;
mul.rn.bf16x2 t, t, s;
mov.b32 {{${2 * j}, ${2 * j + 1}}}, t;
""" for j in range(4)) + "}")
_FP4_ASM_FP16 = tl.constexpr("""{
.reg .b32 a, b, t, u, s;
cvt.rn.f16x2.f32 s, $9, $9;
shl.b32 a, $8, 1;
and.b32 a, a, 0x1E1E1E1E;
shr.b32 b, $8, 3;
and.b32 b, b, 0x1E1E1E1E;
""" + "".join(f"""prmt.b32 t, a, b, {0x4808 + 0x1010 * j:#x};
shl.b32 u, t, 3;
or.b32 t, t, u;
and.b32 t, t, 0x8E008E00;
mul.rn.f16x2 t, t, s;
mov.b32 {{${2 * j}, ${2 * j + 1}}}, t;
""" for j in range(4)) + "}")


@triton.jit
def _e4m3_value(c):
    """fp32 value of E4M3 bytes c (int32, 0..255): the sign in bit 7, 0x7F / 0xFF NaN."""
    ex = (c >> 3) & 15
    m = c & 7
    normal = (((ex + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(ex == 0, m.to(tl.float32) * 0.001953125, normal)       # subnormal step 2^-9
    v = tl.where((c & 0x7F) == 0x7F, float("nan"), v)
    # OR in the sign bit: Triton's negation is 0 - v, which would turn -0 into +0
    return (v.to(tl.int32, bitcast=True) | ((c >> 7) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_pair_plain(a, b, b_s, J: tl.constexpr):
    """Codes 2J, 2J + 1 of each word, as _FP4_ASM_BF16 computes them, as fp32 values."""
    t = ((a >> (8 * J)) & 0xFF) | (((b >> (8 * J)) & 0xFF) << 16)         # the prmt: bytes J of a and b
    t = (t * 4160) & 0x81C081C0
    # each bf16 half as the fp32 of the same value (its bits in the high half), times s * 2^119: exact
    return (t << 16).to(tl.float32, bitcast=True) * b_s, (t & 0xFFFF0000).to(tl.float32, bitcast=True) * b_s


@triton.jit
def _fp4_words_plain(b_w, b_s):
    """The asm's expansion in plain Triton (the interpreter cannot run asm), in fp32: the same values.

    ``b_w`` uint32 words, ``b_s`` fp32 block scales; returns the values of codes 0..7 of each word."""
    a = b_w & 0x0F0F0F0F
    b = (b_w >> 4) & 0x0F0F0F0F
    b_s = b_s * 6.646139978924579e35                                          # 2^119
    v0, v1 = _fp4_pair_plain(a, b, b_s, 0)
    v2, v3 = _fp4_pair_plain(a, b, b_s, 1)
    v4, v5 = _fp4_pair_plain(a, b, b_s, 2)
    v6, v7 = _fp4_pair_plain(a, b, b_s, 3)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _fp4_tile(p_codes, p_scales, o_r, m_r, o_k, K, ROWS: tl.constexpr, BK: tl.constexpr,
              DOT_DTYPE: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows ``o_r`` x K-block ``o_k`` of an NVFP4 matrix as ``value * block_scale * TILE_SCALE`` [ROWS, BK]
    in DOT_DTYPE. The codes are read as 32-bit words (8 codes each; the launchers keep them 4-byte
    aligned). bf16 / fp16 (compiled only: the launchers pick fp32 under the interpreter) expand them
    with the inline asm; fp32 uses its plain-Triton twin, the same values. EVEN_K: the block lies
    inside K (no K mask)."""
    p_w = p_codes.to(tl.pointer_type(tl.uint32))
    o_c = o_k // 8 + tl.arange(0, BK // 8)
    o_s = o_k // 16 + tl.arange(0, BK // 16)
    # (EVEN_K != 0): a constant True folds the K masks away (and a caller compiling EVEN_K as a runtime
    # integer still gets one mask type)
    m_c = m_r[:, None] & ((o_c < K // 8) | (EVEN_K != 0))[None, :]
    m_s = m_r[:, None] & ((o_s < K // 16) | (EVEN_K != 0))[None, :]
    b_w = tl.load(p_w + o_r[:, None] * (K // 8) + o_c[None, :], mask=m_c, other=0)          # [ROWS, BK/8]
    b_s = tl.load(p_scales + o_r[:, None] * (K // 16) + o_s[None, :], mask=m_s, other=0)    # [ROWS, BK/16]
    if DOT_DTYPE != tl.float32:
        # E4M3 -> fp16 by the hardware cvt (exact, NaN kept), to fp32; the asm multiplies by s * 2^119 (bf16)
        # or s * 2^7 (fp16), converted to the MMA dtype (exact)
        b_s = b_s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        b_s = b_s * (6.646139978924579e35 if DOT_DTYPE == tl.bfloat16 else 128.0)
    else:
        b_s = _e4m3_value(b_s.to(tl.int32))
    b_s = tl.reshape(tl.broadcast_to(b_s[:, :, None], (ROWS, BK // 16, 2)), (ROWS, BK // 8))  # per word
    if DOT_DTYPE == tl.bfloat16:
        v = tl.inline_asm_elementwise(_FP4_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,f", [b_w, b_s],
                                      dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    elif DOT_DTYPE == tl.float16:
        v = tl.inline_asm_elementwise(_FP4_ASM_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,f", [b_w, b_s],
                                      dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        v = _fp4_words_plain(b_w, b_s)
    # a join's new axis is the minor one: the innermost joins pair codes 4 apart, the outermost adjacent ones
    b_v = tl.join(tl.join(tl.join(v[0], v[4]), tl.join(v[2], v[6])),
                  tl.join(tl.join(v[1], v[5]), tl.join(v[3], v[7])))                          # [ROWS, BK/8, 2, 2, 2]
    return tl.reshape(b_v, (ROWS, BK)).to(DOT_DTYPE)


@triton.jit
def _nvfp4_gemm_fwd_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, gs_ptr, xgs_ptr, bias_ptr, out_ptr,
                           M, N, K, stride_xm, stride_om, k_per_split,
                           X_FP4: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
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
                b_x = _fp4_tile(x_ptr, xs_ptr, o_m, m_m, k, K, BM, BK, DOT_DTYPE, EVEN_K)  # [BM, BK]
            else:
                o_k = k + tl.arange(0, BK)
                m_x = m_m[:, None] & ((o_k < K) | (EVEN_K != 0))[None, :]
                b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_k[None, :], mask=m_x,
                              other=0.0).to(DOT_DTYPE)                                          # [BM, BK]
            b_w = _fp4_tile(w_ptr, ws_ptr, o_n, m_n, k, K, BN, BK, DOT_DTYPE, EVEN_K)       # [BN, BK]
            if IEEE:
                acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision="ieee")
            else:
                acc = tl.dot(b_x, tl.trans(b_w), acc)

        if not IS_SPLIT:
            acc = acc * (tl.load(gs_ptr) * 128.0)                 # 1 / TILE_SCALE
            if X_FP4:
                acc = acc * (tl.load(xgs_ptr) * 128.0)
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
            p_o = out_ptr + o_m[:, None] * stride_om + o_n[None, :]
            tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])
        else:
            # fp32 partial sums [splits, M, N], reduced in split order by _splitk_reduce_fwd_kernel
            p_o = out_ptr + i_s.to(tl.int64) * M * N + o_m[:, None] * N + o_n[None, :]
            tl.store(p_o, acc, mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["SPLITS"])
def _splitk_reduce_fwd_kernel(part_ptr, gs_ptr, xgs_ptr, bias_ptr, out_ptr, M, N, stride_om,
                              SPLITS, X_FP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr):
    """out = (sum of the fp32 partials [SPLITS, M, N], in split order) * scales (+ bias): the split-K
    epilogue in one launch (SPLITS a runtime count: one compile for every split)."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_o = (o_m < M)[:, None] & (o_n < N)[None, :]
    p_p = part_ptr + o_m[:, None] * N + o_n[None, :]
    mn = tl.cast(M, tl.int64) * N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i_s in range(SPLITS):
        acc += tl.load(p_p + i_s * mn, mask=m_o, other=0.0)                                    # [BM, BN]
    acc = acc * (tl.load(gs_ptr) * 128.0)                     # 1 / TILE_SCALE
    if X_FP4:
        acc = acc * (tl.load(xgs_ptr) * 128.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + o_n, mask=o_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + o_m[:, None] * stride_om + o_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_o)


def word_aligned(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` itself, or a copy where its first byte is not 4-byte aligned (the kernels read words)."""
    return codes if codes.data_ptr() % 4 == 0 else codes.clone()


class LaunchConfig(NamedTuple):
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int          # K splits (fp32 partials reduced in a fixed order); 1: no split
    programs: int       # grid dim 0: one program per output tile, or the persistent grid


def _bucket(m: int):
    for max_m, bm, bn, bk, warps, stages, occ in CONFIGS:
        if max_m is None or m <= max_m:
            return max_m, bm, bn, bk, warps, stages, occ
    raise AssertionError("CONFIGS ends with a catch-all")


def _imbalance(ctas: int, sms: int) -> float:
    """Largest per-SM share of equal CTAs over the mean share."""
    return triton.cdiv(ctas, sms) * sms / ctas


def _decode_shape(n: int, k: int, m_tiles: int, bm: int, bk: int, sms: int) -> tuple[int, int]:
    """(BN, split) for few rows. Candidates: BN 64 / 32 / 16 (64 / 32 for BM 64, whose wgmma tiles cost
    twice the instructions per weight when narrower) and every split that leaves no split empty.
    Preferred: >= 2 CTAs per SM, the per-SM share within 10% of the mean, >= 2 K steps per split (any
    for BM 64); among those the widest BN, then splits of equal length, then the fewest. Failing that,
    the same with 1 K step allowed; failing that, >= 2 CTAs per SM however balanced; failing that, the
    most CTAs."""
    steps = triton.cdiv(k, bk)
    cands = []
    for bn in (64, 32) if bm >= 64 else (64, 32, 16):
        for split in range(1, steps + 1):
            per = triton.cdiv(steps, split)
            if (split - 1) * per < steps:
                cands.append((bn, split, per, m_tiles * triton.cdiv(n, bn) * split))
    min_steps = 1 if bm >= 64 else 2
    rank = lambda c: (-c[0], steps % c[1] != 0, c[1])  # noqa: E731
    balanced = lambda c: c[3] >= 2 * sms and _imbalance(c[3], sms) <= 1.1  # noqa: E731
    for accept in (lambda c: balanced(c) and c[2] >= min_steps, balanced, lambda c: c[3] >= 2 * sms):
        ok = [c for c in cands if accept(c)]
        if ok:
            best = min(ok, key=rank)
            return best[0], best[1]
    best = max(cands, key=lambda c: (c[3], c[0]))
    return best[0], best[1]


def pick_config(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    """The launch of ``[m, k] @ [n, k].T`` on a GPU with ``sms`` SMs: the M bucket of CONFIGS; for few
    rows the tuned (or derived) BN and K split (17..32 rows on one 64-row wgmma tile when BN >= 32);
    for many rows a persistent grid of occupancy x SMs, 64 wide in the 65..512-row bucket when
    128-wide tiles would give fewer than 2 per SM."""
    max_m, bm, bn, bk, warps, stages, occ = _bucket(m)
    m_tiles = triton.cdiv(m, bm)
    if m <= SPLIT_K_MAX_M:
        tuned = TUNED.get((n, k, max_m)) if sms == TUNED_SMS else None
        bn, split = tuned or _decode_shape(n, k, m_tiles, bm, bk, sms)
        if bm == 32 and bn >= WGMMA_MIN_BN:
            # 17..32 rows: one 64-row wgmma tile (half its rows masked) expands each weight for fewer
            # instructions than two 16-row mma.sync steps (static sm_90: 4.92 vs 6.55 SASS per weight at
            # BN 64); a 16-wide wgmma tile would double them, so BN 16 keeps mma.sync
            bm, m_tiles = 64, triton.cdiv(m, 64)
        if bm <= 32:
            # mma.sync tiles: narrower BN, fewer warps, so each thread keeps the words of the 64-wide tile
            # over which the loop's fixed cost (addresses, masks, barriers) is spread
            warps = max(1, warps * bn // 64)
        return LaunchConfig(bm, bn, bk, warps, stages, split, m_tiles * triton.cdiv(n, bn))
    tiles = m_tiles * triton.cdiv(n, bn)
    if max_m is not None and tiles < 2 * sms:
        bn, bk = NARROW_BN, NARROW_BK
        tiles = m_tiles * triton.cdiv(n, bn)
    return LaunchConfig(bm, bn, bk, warps, stages, 1, min(tiles, occ * sms))


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


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
    assert not fp4_x or (x.is_contiguous() and x_scales.is_contiguous())   # NVFP4 rows are read at stride K/2
    out_dtype = out_dtype or x.dtype
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    w_codes = word_aligned(w_codes)
    if fp4_x:
        x = word_aligned(x)
    bm, bn, bk, warps, stages, split, programs = pick_config(m, n, k, _num_sms(x.device))
    if interpreting() or x.dtype == torch.float32:
        dot_dtype = tl.float32     # interpreter: tl.dot on bf16 multiplies raw bits (upstream bug)
    else:
        dot_dtype = tl.float16 if (not fp4_x and x.dtype == torch.float16) else tl.bfloat16
    k_per_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    dummy = w_gs
    _nvfp4_gemm_fwd_kernel[(programs, split)](
        x, x_scales if fp4_x else dummy, w_codes, w_scales, w_gs, x_gs if fp4_x else dummy,
        bias if bias is not None else dummy, target,
        m, n, k, x.stride(0), out.stride(0), k_per_split,
        X_FP4=fp4_x, HAS_BIAS=bias is not None, IS_SPLIT=split > 1, DOT_DTYPE=dot_dtype,
        IEEE=dot_dtype == tl.float32, EVEN_K=k % bk == 0, BM=bm, BN=bn, BK=bk, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages)
    if split > 1:
        rbm = min(16, triton.next_power_of_2(m))
        rbn = 256 if rbm <= 4 else 128          # a few hundred outputs per program: many programs at decode
        _splitk_reduce_fwd_kernel[(triton.cdiv(m, rbm), triton.cdiv(n, rbn))](
            target, w_gs, x_gs if fp4_x else dummy, bias if bias is not None else dummy, out, m, n, out.stride(0),
            split, X_FP4=fp4_x, HAS_BIAS=bias is not None, BM=rbm, BN=rbn, num_warps=4)
    return out
