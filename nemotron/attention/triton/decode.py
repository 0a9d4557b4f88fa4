"""Triton split-KV flash decoding over the live KV prefix (FlashDecoding: partial softmax per split,
then a log-sum-exp reduction).

Kernel 1, grid ``(Hkv * M blocks, B, S)``: a program owns one kv head, all of its Hq / Hkv query heads
for the T new tokens (the rows of one ``[BM, D]`` tile), and split ``i_s`` of the row's live length:
the length is read from the device tensor and cut into S ranges of whole ``BN`` tiles, so every
split works at any length while the grid depends only on max_len (CUDA-graph safe). Tiles past the
length are never loaded; splits past it write ``lse = -inf``. FP8 K and V are widened in registers
(E4M3 is exact in bf16 / fp16), their per-tensor scales folded into the softmax scale and the
partial output. Partial outputs (normalized) and log2-sum-exps are written in fp32.

Kernel 2, grid ``(T * Hq, B)``: combines the splits that held keys into the output, in q's dtype.

The split count S is a fixed function of (max_len, B, Hkv, query blocks, SM count): :func:`num_splits`.
A program's causal end (its block's last query) trims its range, so T > 1 (prefill over the cache)
reads no key only masked queries would see.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...dispatch import interpreting
from ..reference import LOG2E

BLOCK_N = 64              # keys per tile (K + V of a bf16 tile at D = 128: 32 KiB)
MAX_BLOCK_M = 64          # query rows (T x Hq/Hkv) per program; more rows take more programs
CTAS_PER_SM = 2           # kernel-1 programs per SM the split count aims for
MAX_SPLITS = 256
DEFAULT_SMS = 132         # H100 / H200 SXM: the split count of meta tensors and of the interpreter
NUM_WARPS = 4
NUM_STAGES = 3

_NEG_INF = tl.constexpr(float("-inf"))


def num_splits(max_len: int, batch: int, kv_heads: int, sms: int = DEFAULT_SMS, *, block_n: int = BLOCK_N,
               m_blocks: int = 1) -> int:
    """Splits per (row, kv head, block of query rows): enough programs for ``CTAS_PER_SM`` per SM, at
    least one tile each at max_len, at most ``MAX_SPLITS``. Super at batch 1, T <= 4 (Hkv = 2, 132
    SMs): 132 splits; many new tokens (prefill) fill the machine with query blocks and take one."""
    want = triton.cdiv(CTAS_PER_SM * sms, max(1, batch * kv_heads * m_blocks))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(max(max_len, 1), block_n)))


def device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


@triton.jit
def _split_range(n, i_s, S, BN: tl.constexpr):
    """The keys ``[start, end)`` of split i_s of a row of live length n: S ranges of whole tiles."""
    chunk = tl.cdiv(tl.cdiv(n, S), BN) * BN
    start = i_s * chunk
    return start, tl.minimum(start + chunk, n)


@triton.jit(do_not_specialize=["T", "L"])
def _decode_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, len_ptr, ks_ptr, vs_ptr, mo_ptr, ml_ptr,
                                 T, L, HQ, D, G, M_BLOCKS, qk_scale,
                                 sq_b, sq_t, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                 smo_b, smo_t, smo_h, smo_s, sml_b, sml_t, sml_h,
                                 HAS_KS: tl.constexpr, HAS_VS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                 IEEE: tl.constexpr, Q_TO_FP16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                 BD: tl.constexpr):
    i_hm, i_b, i_s = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    S = tl.num_programs(2)
    i_h, i_m = i_hm // M_BLOCKS, i_hm % M_BLOCKS
    n = tl.minimum(tl.maximum(tl.load(len_ptr + i_b).to(tl.int32), 0), L)     # clamped: never past the buffer
    start, end = _split_range(n, i_s, S, BN)
    end = tl.minimum(end, n - T + tl.minimum((i_m * BM + BM - 1) // G, T - 1) + 1)    # the block's last query

    o_r = i_m * BM + tl.arange(0, BM)                  # query rows: token t, head hq = i_h * G + g
    o_t, o_g = o_r // G, o_r % G
    m_r = o_r < T * G
    o_hq = i_h * G + o_g
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_pos = n - T + o_t                                 # the last key each row sees
    p_q = q_ptr + i_b * sq_b + o_t[:, None].to(tl.int64) * sq_t + o_hq[:, None] * sq_h + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)          # [BM, BD]
    if HAS_KS:
        qk_scale = qk_scale * tl.load(ks_ptr)
    b_qk = tl.full((BM,), 1.0, tl.float32) * qk_scale
    if Q_TO_FP16:        # bf16 q into fp16 MMAs: a power of two per row brings max |q| into [2^13, 2^14]
        b_amax = tl.max(tl.abs(b_q), 1)
        b_e = tl.where(b_amax > 0.0, tl.ceil(tl.log2(tl.where(b_amax > 0.0, b_amax, 1.0))) - 14.0, 0.0)
        b_q = b_q * tl.exp2(-b_e)[:, None]
        b_qk = b_qk * tl.exp2(b_e)
    b_q = b_q.to(DOT_DTYPE)
    o_n0 = start + tl.arange(0, BN)
    p_k = k_ptr + i_b * sk_b + i_h.to(tl.int64) * sk_h + o_n0[:, None].to(tl.int64) * sk_n + o_d[None, :]
    p_v = v_ptr + i_b * sv_b + i_h.to(tl.int64) * sv_h + o_n0[:, None].to(tl.int64) * sv_n + o_d[None, :]

    b_m = tl.full((BM,), _NEG_INF, tl.float32)
    b_l = tl.zeros((BM,), tl.float32)
    b_acc = tl.zeros((BM, BD), tl.float32)
    for n0 in range(start, end, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < end
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k, mask=m_nd, other=0.0)                                                 # [BN, BD]
        b_v = tl.load(p_v, mask=m_nd, other=0.0)                                                 # [BN, BD]
        p_k += BN * sk_n.to(tl.int64)          # pointers advance: no 64-bit products per element
        p_v += BN * sv_n.to(tl.int64)
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k.to(DOT_DTYPE)), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k.to(DOT_DTYPE)))
        b_s = b_s * b_qk[:, None]                                                                 # [BM, BN]
        b_s = tl.where(m_n[None, :] & (o_n[None, :] <= b_pos[:, None]), b_s, _NEG_INF)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn == _NEG_INF, 0.0, b_mn)     # a row that has seen nothing yet stays at 0
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if IEEE:
            b_pv = tl.dot(b_p.to(DOT_DTYPE), b_v.to(DOT_DTYPE), input_precision="ieee")
        else:
            b_pv = tl.dot(b_p.to(DOT_DTYPE), b_v.to(DOT_DTYPE))
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_mn

    b_seen = b_l > 0.0
    b_o = b_acc / tl.where(b_seen, b_l, 1.0)[:, None]
    if HAS_VS:
        b_o = b_o * tl.load(vs_ptr)
    b_lse = tl.where(b_seen, b_m + tl.log2(tl.where(b_seen, b_l, 1.0)), _NEG_INF)
    o_row = i_b * sml_b + o_t.to(tl.int64) * sml_t + o_hq * sml_h
    tl.store(ml_ptr + o_row + i_s, b_lse, mask=m_r)                                              # [BM]
    if start < end:                  # the reduction reads only the splits that held keys
        p_mo = mo_ptr + i_b * smo_b + o_t[:, None].to(tl.int64) * smo_t + o_hq[:, None] * smo_h + i_s * smo_s
        tl.store(p_mo + o_d[None, :], b_o, mask=m_r[:, None] & m_d[None, :])                   # [BM, BD]


@triton.jit(do_not_specialize=["L"])
def _decode_attention_reduce_fwd_kernel(mo_ptr, ml_ptr, len_ptr, o_ptr, L, HQ, D, S,
                                        smo_b, smo_t, smo_h, smo_s, sml_b, sml_t, sml_h, so_b, so_t, so_h,
                                        BN: tl.constexpr, BD: tl.constexpr):
    i_th, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_t, i_h = i_th // HQ, i_th % HQ
    n = tl.minimum(tl.maximum(tl.load(len_ptr + i_b).to(tl.int32), 0), L)
    chunk = tl.cdiv(tl.cdiv(n, S), BN) * BN
    n_active = tl.cdiv(n, tl.maximum(chunk, 1))
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_ml = ml_ptr + i_b * sml_b + i_t * sml_t + i_h * sml_h
    p_mo = mo_ptr + i_b * smo_b + i_t * smo_t + i_h * smo_h + o_d
    b_m = tl.full((1,), _NEG_INF, tl.float32)
    b_l = tl.zeros((1,), tl.float32)
    b_acc = tl.zeros((BD,), tl.float32)
    for i_s in range(0, n_active):
        b_lse = tl.load(p_ml + i_s + tl.zeros((1,), tl.int32))                                  # [1]
        b_mn = tl.maximum(b_m, b_lse)
        b_ms = tl.where(b_mn == _NEG_INF, 0.0, b_mn)
        b_alpha = tl.exp2(b_m - b_ms)
        b_w = tl.exp2(b_lse - b_ms)
        b_part = tl.load(p_mo + i_s * smo_s, mask=m_d & (b_w > 0.0), other=0.0)                # [BD]
        b_acc = b_acc * b_alpha + b_w * b_part
        b_l = b_l * b_alpha + b_w
        b_m = b_mn
    b_o = b_acc / tl.where(b_l > 0.0, b_l, 1.0)
    tl.store(o_ptr + i_b * so_b + i_t * so_t + i_h * so_h + o_d, b_o.to(o_ptr.dtype.element_ty), mask=m_d)


def _dot_dtype(q: torch.Tensor, cache: torch.Tensor):
    """The MMA operand type: fp32 for fp32 q or cache; fp16 for fp16 q and for an FP8 cache (E4M3 widens
    to fp16 in one instruction per pair, to bf16 only through fp32; P in [0, 1] keeps 3 more bits); else
    bf16, or fp32 under the interpreter (tl.dot on bf16 multiplies raw bits there, an upstream bug)."""
    if q.dtype == torch.float32 or cache.dtype == torch.float32:
        return tl.float32
    if q.dtype == torch.float16 or cache.dtype == torch.float8_e4m3fn:
        return tl.float16
    return tl.float32 if interpreting() else tl.bfloat16


def decode_attention(q, k_cache, v_cache, lengths, *, scale, k_scale=None, v_scale=None, splits=None,
                     block_n=BLOCK_N):
    """Kernel twin of ``reference.decode_attention_reference`` (validated arguments; see
    ops.decode_attention). q ``[B, T, Hq, D]``, caches ``[B, Hkv, L, D]`` with any strides but a
    contiguous last dim; k_scale / v_scale 1-element fp32 tensors or None. ``splits`` and
    ``block_n`` override the launch configuration (tests of the split boundaries)."""
    b, t, hq, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(3) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "the head dim must be contiguous"
    out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    g = hq // hkv
    bm = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(t * g)))
    m_blocks = triton.cdiv(t * g, bm)
    s = splits or num_splits(max_len, b, hkv, device_sms(q.device), block_n=block_n, m_blocks=m_blocks)
    bd = max(16, triton.next_power_of_2(d))
    mo = torch.empty(b, t, hq, s, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b, t, hq, s, dtype=torch.float32, device=q.device)
    dot = _dot_dtype(q, k_cache)
    dummy = ml
    _decode_attention_fwd_kernel[(hkv * m_blocks, b, s)](     # the unbounded grid dim takes the query blocks
        q, k_cache, v_cache, lengths, k_scale if k_scale is not None else dummy,
        v_scale if v_scale is not None else dummy, mo, ml,
        t, max_len, hq, d, g, m_blocks, float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mo.stride(0), mo.stride(1), mo.stride(2), mo.stride(3), ml.stride(0), ml.stride(1), ml.stride(2),
        HAS_KS=k_scale is not None, HAS_VS=v_scale is not None, DOT_DTYPE=dot, IEEE=dot == tl.float32,
        Q_TO_FP16=dot == tl.float16 and q.dtype == torch.bfloat16, BM=bm, BN=block_n, BD=bd, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _decode_attention_reduce_fwd_kernel[(t * hq, b)](
        mo, ml, lengths, out, max_len, hq, d, s,
        mo.stride(0), mo.stride(1), mo.stride(2), mo.stride(3), ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1), out.stride(2), BN=block_n, BD=bd, num_warps=1)
    return out
