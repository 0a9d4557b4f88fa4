"""SSD stages 1-3: the chunk cumsum of dt * A, each chunk's own state, and the state pass over chunks.

Chunks are the units of parallelism (see ``ssd.py``). A chunk is ``(batch row, first token, end
token)``: chunk ``c`` of batch row ``b`` covers tokens ``[c Q, min((c+1) Q, T))``; with cu_seqlens
(batch 1) the launcher numbers the chunks of all sequences, each sequence's first chunk starting at
its own first token, in a table (so no chunk mixes two sequences). The per-chunk buffers are fp32:
``dt`` and ``cs`` ``[rows, H, K, Q]`` (the processed dt and the inclusive cumsum of the floored log2
decay, both 0-extended / constant past the chunk's end), and ``states`` ``[rows, K, H, P, N]``.

Numerics (DESIGN): fp32 dt, cumsums and states; every exp of a cumsum difference is clamped to
<= 0; the per-token log decay dt * A is floored as in ``reference.log_decay``, with A = -inf read
as -FLT_MAX (finite output for any dt >= 0 and A <= 0). All addresses are int64.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ..reference import FLT_MAX, LOG_DECAY_MIN

LOG2E = tl.constexpr(1.4426950408889634)   # kernels may read only constexpr globals
A_MIN = tl.constexpr(-FLT_MAX)              # A * log2(e) of A = -inf: finite, so a zero dt is no step
LOG2_DECAY_MIN = tl.constexpr(LOG_DECAY_MIN * 1.4426950408889634)
INF = tl.constexpr(math.inf)
NAN = tl.constexpr(math.nan)


@triton.jit
def _sequence(cu_ptr, i_s, T, IS_VARLEN: tl.constexpr):
    """(batch row, first token, end token) of program row i_s: a batch row, or packed sequence i_s."""
    if IS_VARLEN:
        return 0, tl.load(cu_ptr + i_s).to(tl.int64), tl.load(cu_ptr + i_s + 1).to(tl.int64)
    else:
        return i_s, 0, T


@triton.jit
def _chunk(tab_ptr, i_c, i_b, T, Q: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(batch row, first token, end token) of chunk i_c of batch row i_b (int64). Varlen: row 0 and
    the chunk table's entry ``[sequence, first, end]`` (an unused entry has first = end)."""
    if IS_VARLEN:
        p_tab = tab_ptr + i_c.to(tl.int64) * 3
        return i_b.to(tl.int64), tl.load(p_tab + 1), tl.load(p_tab + 2)     # i_b = 0: the grid has one row
    else:
        bos = i_c.to(tl.int64) * Q
        return i_b.to(tl.int64), bos, tl.minimum(bos + Q, T)


@triton.jit
def _softplus(v):
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


@triton.jit(do_not_specialize=["T", "K"])  # one compile for every sequence length
def _ssd_cumsum_fwd_kernel(dt_ptr, a_ptr, dtb_ptr, tab_ptr, dto_ptr, cs_ptr,
                           T, H, K, sdt_b, sdt_t, dt_lo, dt_hi,
                           HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP_DT: tl.constexpr,
                           IS_VARLEN: tl.constexpr, Q: tl.constexpr, BH: tl.constexpr):
    """Per (chunk, block of heads): dt processed, and the cumsum of its floored log2 decay."""
    i_bc, i_hb = tl.program_id(0), tl.program_id(1)                     # batch rows and chunks on axis 0
    i_b, i_c = i_bc // K, i_bc % K
    i_r, bos, eos = _chunk(tab_ptr, i_c, i_b, T, Q, IS_VARLEN)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    o_q = tl.arange(0, Q)
    o_t = bos + o_q
    m_t = o_t < eos
    p_dt = dt_ptr + i_r * sdt_b + o_t[:, None] * sdt_t + o_h[None, :]
    b_dt = tl.load(p_dt, mask=m_t[:, None] & m_h[None, :], other=0.0).to(tl.float32)             # [Q, BH]
    if HAS_DTB:
        b_dt = b_dt + tl.load(dtb_ptr + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        b_dt = _softplus(b_dt)
    if CLAMP_DT:
        b_dt = tl.clamp(b_dt, dt_lo, dt_hi, propagate_nan=tl.PropagateNan.ALL)             # NaN stays NaN
    b_dt = tl.where(m_t[:, None] & m_h[None, :], b_dt, 0.0)               # past the end: no decay, no input
    b_a = tl.load(a_ptr + o_h, mask=m_h, other=0.0).to(tl.float32) * LOG2E                # A in log2 units
    b_a = tl.where(b_a < A_MIN, A_MIN, b_a)
    b_la = b_dt * b_a[None, :]
    b_cs = tl.cumsum(tl.where(b_la < LOG2_DECAY_MIN, LOG2_DECAY_MIN, b_la), axis=0)          # [Q, BH]
    p_o = ((i_r * H + o_h[None, :]) * K + i_c) * Q + o_q[:, None]
    tl.store(dto_ptr + p_o, b_dt, mask=m_h[None, :])                                          # [Q, BH]
    tl.store(cs_ptr + p_o, b_cs, mask=m_h[None, :])


@triton.jit(do_not_specialize=["T", "K"])
def _ssd_chunk_state_fwd_kernel(x_ptr, b_ptr, dt_ptr, cs_ptr, tab_ptr, st_ptr,
                                T, H, P, N, K, HG, sx_b, sx_t, sx_h, sb_b, sb_t, sb_g,
                                IS_VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                                Q: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Per (chunk, head, P block, N block): the state the chunk alone leaves,
    sum_t x_t (dt_t exp2(min(cs_last - cs_t, 0))) B_t^T, fp32 [BP, BN]."""
    i_bc, i_hpn = tl.program_id(0), tl.program_id(1)
    i_b, i_c = i_bc // K, i_bc % K
    n_p, n_n = tl.cdiv(P, BP), tl.cdiv(N, BN)
    i_h, i_p, i_n = i_hpn // (n_p * n_n), (i_hpn // n_n) % n_p, i_hpn % n_n
    i_r, bos, eos = _chunk(tab_ptr, i_c, i_b, T, Q, IS_VARLEN)
    i_g = i_h // HG
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = i_n * BN + tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    p_cs = ((i_r * H + i_h) * K + i_c) * Q                                # this chunk's row of dt / cs
    b_last = tl.load(cs_ptr + p_cs + Q - 1)
    b_st = tl.zeros((BP, BN), dtype=tl.float32)
    for k0 in range(0, Q, BK):
        o_k = k0 + tl.arange(0, BK)
        o_t = bos + o_k
        m_t = o_t < eos
        b_dt = tl.load(dt_ptr + p_cs + o_k)                                                  # [BK]
        b_cs = tl.load(cs_ptr + p_cs + o_k)
        p_x = x_ptr + i_r * sx_b + o_t[:, None] * sx_t + i_h * sx_h + o_p[None, :]
        b_x = tl.load(p_x, mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)      # [BK, BP]
        p_b = b_ptr + i_r * sb_b + o_t[:, None] * sb_t + i_g * sb_g + o_n[None, :]
        b_B = tl.load(p_b, mask=m_t[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)        # [BK, BN]
        b_xw = (b_x * (b_dt * tl.exp2(tl.minimum(b_last - b_cs, 0.0)))[:, None]).to(DOT_DTYPE)
        if IEEE:
            b_st += tl.dot(tl.trans(b_xw), b_B, input_precision="ieee")
        else:
            b_st += tl.dot(tl.trans(b_xw), b_B)
    p_st = st_ptr + ((i_r * K + i_c) * H + i_h) * P * N + o_p[:, None] * N + o_n[None, :]
    tl.store(p_st, b_st, mask=m_p[:, None] & m_n[None, :])                                   # [BP, BN]


@triton.jit(do_not_specialize=["K"])
def _ssd_state_passing_fwd_kernel(st_ptr, cs_ptr, s0_ptr, sf_ptr, off_ptr,
                                  H, PN, K,
                                  HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                                  Q: tl.constexpr, BS: tl.constexpr):
    """Per (sequence, block of state elements, head): walks the sequence's chunks in order and
    turns each chunk's own state into the state before it, in place:
    before_0 = s0, before_{c+1} = before_c * exp2(min(cs_last_c, 0)) + own_c. In order, so a
    non-finite own state reaches only the chunks after it (never 0 * NaN from a later one)."""
    i_s, i_e, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_e * BS + tl.arange(0, BS)
    m_e = o_e < PN
    if IS_VARLEN:
        i_r = tl.full([], 0, tl.int64)
        k0, k1 = tl.load(off_ptr + i_s).to(tl.int64), tl.load(off_ptr + i_s + 1).to(tl.int64)
    else:
        i_r = i_s.to(tl.int64)
        k0, k1 = 0, K
    p_s = (i_s.to(tl.int64) * H + i_h) * PN + o_e
    if HAS_S0:
        b_carry = tl.load(s0_ptr + p_s, mask=m_e, other=0.0).to(tl.float32)                    # [BS]
    else:
        b_carry = tl.zeros((BS,), dtype=tl.float32)
    for k in range(k0, k1):
        p_st = st_ptr + ((i_r * K + k) * H + i_h) * PN + o_e
        b_own = tl.load(p_st, mask=m_e, other=0.0)                                              # [BS]
        tl.store(p_st, b_carry, mask=m_e)
        b_last = tl.load(cs_ptr + ((i_r * H + i_h) * K + k) * Q + Q - 1)
        b_carry = b_carry * tl.exp2(tl.minimum(b_last, 0.0)) + b_own
    if STORE_FINAL:
        tl.store(sf_ptr + p_s, b_carry, mask=m_e)
