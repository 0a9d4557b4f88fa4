"""Triton chunked SSD scan: one kernel, chunk states kept on chip.

One program owns (sequence, head, block of P) and walks its sequence chunk by chunk, carrying the
[BP, N] fp32 state in registers. Per chunk of Q tokens: cs = cumsum(dt * A); CB = C @ B^T once;
y = (CB * exp2(min(cs_i - cs_j, 0)) * dt_j, causal) @ x + (C @ state^T) * exp2(cs); then
state = state * exp2(cs_last) + (x * dt * exp2(min(cs_last - cs, 0)))^T @ B. Nothing but x, dt,
B, C (and z) is read and y written, so HBM traffic is the compulsory one; there are no per-chunk
state, CB or cumsum tensors. Varlen: each program's chunks start at its own sequence start, so a
boundary inside a global chunk needs no masking. Every exponent is clamped to <= 0 and the per-token
log decay dt * A floored as in ``reference.log_decay`` (finite output for any dt >= 0 and A <= 0,
A = -inf included).

Causality with non-finite inputs (see reference.py): masks select with ``tl.where`` after the
product they mask (CB is masked after the dot: a NaN in B row s fills column s), and x enters the
intra-chunk dot with its non-finite entries zeroed, each column set to NaN from its first
non-finite row on, so a NaN / inf at token t never reaches an earlier token as 0 * NaN.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...dispatch import interpreting
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
def _softplus(v):
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


@triton.jit(do_not_specialize=["T"])  # one compile for every sequence length
def _ssd_fwd_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dtb_ptr, s0_ptr, y_ptr, sf_ptr, cu_ptr,
                    T, H, P, N, HG,
                    sx_b, sx_t, sx_h, sdt_b, sdt_t, sb_b, sb_t, sb_g, sc_b, sc_t, sc_g, sz_b, sz_t, sz_h,
                    sy_b, sy_t, sy_h, dt_lo, dt_hi,
                    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                    SOFTPLUS: tl.constexpr, CLAMP_DT: tl.constexpr, HAS_S0: tl.constexpr,
                    STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    IEEE: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    i_s, i_h, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _sequence(cu_ptr, i_s, T, IS_VARLEN)
    i_g = i_h // HG
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    o_q = tl.arange(0, Q)
    b_a = tl.load(a_ptr + i_h).to(tl.float32) * LOG2E                     # A in log2 units
    b_a = tl.where(b_a < A_MIN, A_MIN, b_a)
    if HAS_DTB:
        b_dtb = tl.load(dtb_ptr + i_h).to(tl.float32)
    if HAS_D:
        if D_PER_P:
            b_d = tl.load(d_ptr + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        else:
            b_d = tl.load(d_ptr + i_h).to(tl.float32)

    p_s = (i_s * H + i_h).to(tl.int64) * P * N + o_p[:, None] * N + o_n[None, :]
    if HAS_S0:
        b_st = tl.load(s0_ptr + p_s, mask=m_p[:, None] & m_n[None, :], other=0.0).to(tl.float32)   # [BP, BN]
    else:
        b_st = tl.zeros((BP, BN), dtype=tl.float32)

    for c0 in range(bos, eos, Q):
        o_t = (c0 + o_q).to(tl.int64)
        m_t = o_t < eos
        b_dt = tl.load(dt_ptr + i_b * sdt_b + o_t * sdt_t + i_h, mask=m_t, other=0.0).to(tl.float32)   # [Q]
        if HAS_DTB:
            b_dt = b_dt + b_dtb
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        if CLAMP_DT:
            b_dt = tl.clamp(b_dt, dt_lo, dt_hi, propagate_nan=tl.PropagateNan.ALL)     # NaN stays NaN
        b_dt = tl.where(m_t, b_dt, 0.0)                                   # past the end: no decay, no input
        b_la = b_dt * b_a
        b_cs = tl.cumsum(tl.where(b_la < LOG2_DECAY_MIN, LOG2_DECAY_MIN, b_la), axis=0)   # [Q], log2 units
        b_last = tl.sum(tl.where(o_q == Q - 1, b_cs, 0.0), axis=0)

        p_x = x_ptr + i_b * sx_b + o_t[:, None] * sx_t + i_h * sx_h + o_p[None, :]
        b_x = tl.load(p_x, mask=m_t[:, None] & m_p[None, :], other=0.0)                       # [Q, BP]
        p_bc = o_t[:, None] * sb_t + i_b * sb_b + i_g * sb_g + o_n[None, :]
        b_B = tl.load(b_ptr + p_bc, mask=m_t[:, None] & m_n[None, :], other=0.0)               # [Q, BN]
        p_cc = o_t[:, None] * sc_t + i_b * sc_b + i_g * sc_g + o_n[None, :]
        b_C = tl.load(c_ptr + p_cc, mask=m_t[:, None] & m_n[None, :], other=0.0)               # [Q, BN]
        b_Bd, b_Cd = b_B.to(DOT_DTYPE), b_C.to(DOT_DTYPE)
        m_fin = tl.abs(b_x.to(tl.float32)) < INF                                     # [Q, BP]
        b_xd = tl.where(m_fin, b_x, 0.0).to(DOT_DTYPE)
        b_bad = tl.min(tl.where(m_fin, Q, o_q[:, None]), axis=0)          # [BP] first non-finite row, or Q

        if IEEE:
            b_cb = tl.dot(b_Cd, tl.trans(b_Bd), input_precision="ieee")                       # [Q, Q]
        else:
            b_cb = tl.dot(b_Cd, tl.trans(b_Bd))
        b_dec = tl.exp2(tl.minimum(b_cs[:, None] - b_cs[None, :], 0.0))
        b_w = tl.where(o_q[:, None] >= o_q[None, :], b_cb * b_dec * b_dt[None, :], 0.0)
        b_sd = b_st.to(DOT_DTYPE)
        if IEEE:
            b_y = tl.dot(b_w.to(DOT_DTYPE), b_xd, input_precision="ieee")                     # [Q, BP]
            b_y += tl.dot(b_Cd, tl.trans(b_sd), input_precision="ieee") * tl.exp2(tl.minimum(b_cs, 0.0))[:, None]
        else:
            b_y = tl.dot(b_w.to(DOT_DTYPE), b_xd)
            b_y += tl.dot(b_Cd, tl.trans(b_sd)) * tl.exp2(tl.minimum(b_cs, 0.0))[:, None]
        b_y = tl.where(o_q[:, None] >= b_bad[None, :], NAN, b_y)

        b_wx = (b_x.to(tl.float32) * (b_dt * tl.exp2(tl.minimum(b_last - b_cs, 0.0)))[:, None]).to(DOT_DTYPE)
        if IEEE:
            b_st = b_st * tl.exp2(tl.minimum(b_last, 0.0)) + tl.dot(tl.trans(b_wx), b_Bd, input_precision="ieee")
        else:
            b_st = b_st * tl.exp2(tl.minimum(b_last, 0.0)) + tl.dot(tl.trans(b_wx), b_Bd)

        if HAS_D:
            if D_PER_P:
                b_y += b_x.to(tl.float32) * b_d[None, :]
            else:
                b_y += b_x.to(tl.float32) * b_d
        if HAS_Z:
            b_z = tl.load(z_ptr + i_b * sz_b + o_t[:, None] * sz_t + i_h * sz_h + o_p[None, :],
                          mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        p_y = y_ptr + i_b * sy_b + o_t[:, None] * sy_t + i_h * sy_h + o_p[None, :]
        tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_t[:, None] & m_p[None, :])

    if STORE_FINAL:
        tl.store(sf_ptr + p_s, b_st, mask=m_p[:, None] & m_n[None, :])


def ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, math.inf), initial_states=None, cu_seqlens=None, return_final_states=False):
    """Kernel twin of ``reference.ssd_recurrence`` (validated arguments; see ops.ssd_scan)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    n_seq = cu_seqlens.numel() - 1 if cu_seqlens is not None else b
    y = torch.empty(b, t, h, p, dtype=x.dtype, device=x.device)
    final = torch.empty(n_seq, h, p, n, dtype=torch.float32, device=x.device) if return_final_states else None
    if interpreting() or x.dtype == torch.float32:
        dot_dtype = tl.float32      # interpreter: tl.dot on bf16 multiplies raw bits (upstream bug)
    else:
        dot_dtype = tl.float16 if x.dtype == torch.float16 else tl.bfloat16
    bp = min(64, max(16, triton.next_power_of_2(p)))
    bn = max(16, triton.next_power_of_2(n))
    dummy = A
    zz = z if z is not None else x
    grid = (n_seq, h, triton.cdiv(p, bp))
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, D if D is not None else dummy, zz, dt_bias if dt_bias is not None else dummy,
        initial_states if initial_states is not None else dummy, y, final if final is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        t, h, p, n, h // g,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        y.stride(0), y.stride(1), y.stride(2), float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP_DT=dt_limit[0] > 0 or dt_limit[1] < math.inf,
        HAS_S0=initial_states is not None, STORE_FINAL=return_final_states, IS_VARLEN=cu_seqlens is not None,
        DOT_DTYPE=dot_dtype, IEEE=dot_dtype == tl.float32, Q=chunk_size, BP=bp, BN=bn,
        num_warps=8 if chunk_size * bn >= 128 * 128 else 4)
    return (y, final) if return_final_states else y
