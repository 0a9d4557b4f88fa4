"""Triton kernels: the selective state update (Mamba-2 decode), in place, for one token and for T
tokens per sequence (speculative verification).

Each program owns a [BP, N] slice of one head's state: read once, decayed and updated in fp32,
written back in the state's dtype; y is its contraction with C (+ D skip, silu(z) gate). The
multi-token kernel keeps the slice in registers across its T tokens and stores it after each one
into the caller's per-token buffer, so a verification is one launch per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import FLT_MAX, LOG_DECAY_MIN

A_MIN = tl.constexpr(-FLT_MAX)                   # A = -inf: finite, so a zero dt is no step (decay 1)
_LOG_DECAY_MIN = tl.constexpr(LOG_DECAY_MIN)     # reference.log_decay: exp underflows to 0, never NaN


@triton.jit
def _state_update_fwd_kernel(s_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dtb_ptr, idx_ptr, y_ptr,
                             H, P, N, HG, ss_b, ss_h, sx_b, sx_h, sdt_b, sdt_h, sdt_p, sa_h, sa_p, sa_n,
                             sb_b, sb_g, sc_b, sc_g, sd_h, sd_p, sz_b, sz_h, sdtb_h, sdtb_p, sy_b, sy_h,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                             SOFTPLUS: tl.constexpr, HAS_IDX: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    i_b, i_h, i_p = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    p_y = y_ptr + i_b * sy_b + i_h * sy_h + o_p
    row = i_b
    if HAS_IDX:
        row = tl.load(idx_ptr + i_b).to(tl.int64)
    if row < 0:                                                          # padding slot: skip, y = 0
        tl.store(p_y, tl.zeros((BP,), dtype=tl.float32).to(y_ptr.dtype.element_ty), mask=m_p)
    else:
        i_g = i_h // HG
        p_s = s_ptr + row * ss_b + i_h * ss_h + o_p[:, None] * N + o_n[None, :]
        b_s = tl.load(p_s, mask=m_pn, other=0.0).to(tl.float32)                              # [BP, BN]
        b_x = tl.load(x_ptr + i_b * sx_b + i_h * sx_h + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_dt = tl.load(dt_ptr + i_b * sdt_b + i_h * sdt_h + o_p * sdt_p, mask=m_p, other=0.0).to(tl.float32)
        if HAS_DTB:
            b_dt += tl.load(dtb_ptr + i_h * sdtb_h + o_p * sdtb_p, mask=m_p, other=0.0).to(tl.float32)
        if SOFTPLUS:
            b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(b_dt)), b_dt)
        b_a = tl.load(a_ptr + i_h * sa_h + o_p[:, None] * sa_p + o_n[None, :] * sa_n, mask=m_pn, other=0.0).to(tl.float32)
        b_B = tl.load(b_ptr + i_b * sb_b + i_g * sb_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(c_ptr + i_b * sc_b + i_g * sc_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_a = tl.where(b_a < A_MIN, A_MIN, b_a)
        b_la = b_a * b_dt[:, None]
        b_la = tl.where(b_la < _LOG_DECAY_MIN, _LOG_DECAY_MIN, b_la)
        b_s = b_s * tl.exp(b_la) + (b_dt * b_x)[:, None] * b_B[None, :]
        tl.store(p_s, b_s.to(s_ptr.dtype.element_ty), mask=m_pn)
        b_y = tl.sum(b_s * b_C[None, :], axis=1)
        if HAS_D:
            b_y += b_x * tl.load(d_ptr + i_h * sd_h + o_p * sd_p, mask=m_p, other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(z_ptr + i_b * sz_b + i_h * sz_h + o_p, mask=m_p, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_p)


def _per_head(A, D, dt_bias, h: int, p: int, n: int):
    """A as ``[H, P, N]``, D and dt_bias as ``[H, P]`` (broadcast views; None stays None), and the
    P and N block sizes both decode kernels launch with."""
    a3 = A[:, None, None].expand(h, p, n) if A.dim() == 1 else A
    d2 = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)
    dtb2 = None if dt_bias is None else (dt_bias[:, None].expand(h, p) if dt_bias.dim() == 1 else dt_bias)
    return a3, d2, dtb2, min(16, triton.next_power_of_2(p)), max(16, triton.next_power_of_2(n))


def selective_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_indices=None):
    """In-place decode step (validated arguments, broadcast views allowed; see ops.selective_state_update)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    if b == 0:
        return y
    dt3 = dt[..., None].expand(b, h, p) if dt.dim() == 2 else dt
    a3, d2, dtb2, bp, bn = _per_head(A, D, dt_bias, h, p, n)
    zz = z if z is not None else x
    dummy = x
    _state_update_fwd_kernel[(b, h, triton.cdiv(p, bp))](
        state, x, dt3, a3, B, C, d2 if d2 is not None else dummy, zz, dtb2 if dtb2 is not None else dummy,
        state_indices if state_indices is not None else dummy, y,
        h, p, n, h // g, state.stride(0), state.stride(1), x.stride(0), x.stride(1),
        dt3.stride(0), dt3.stride(1), dt3.stride(2), a3.stride(0), a3.stride(1), a3.stride(2),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        d2.stride(0) if d2 is not None else 0, d2.stride(1) if d2 is not None else 0, zz.stride(0), zz.stride(1),
        dtb2.stride(0) if dtb2 is not None else 0, dtb2.stride(1) if dtb2 is not None else 0, y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus,
        HAS_IDX=state_indices is not None, BP=bp, BN=bn, num_warps=4)
    return y


@triton.jit(do_not_specialize=["T"])  # one compile for every draft length
def _state_update_multi_fwd_kernel(s_ptr, so_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dtb_ptr, y_ptr,
                                   T, H, P, N, HG, ss_b, ss_h, sso_b, sso_t, sso_h, sx_b, sx_t, sx_h,
                                   sdt_b, sdt_t, sdt_h, sdt_p, sa_h, sa_p, sa_n, sb_b, sb_t, sb_g, sc_b, sc_t, sc_g,
                                   sd_h, sd_p, sz_b, sz_t, sz_h, sdtb_h, sdtb_p, sy_b, sy_t, sy_h,
                                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                                   SOFTPLUS: tl.constexpr, ROUND_STATE: tl.constexpr,
                                   BP: tl.constexpr, BN: tl.constexpr):
    # the single-token kernel's arithmetic, token after token, on a state that stays in registers
    i_b, i_h, i_p = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    i_g = i_h // HG
    o_pn = o_p[:, None] * N + o_n[None, :]
    p_s = s_ptr + i_b * ss_b + i_h * ss_h + o_pn
    b_s = tl.load(p_s, mask=m_pn, other=0.0).to(tl.float32)                                  # [BP, BN]
    b_a = tl.load(a_ptr + i_h * sa_h + o_p[:, None] * sa_p + o_n[None, :] * sa_n, mask=m_pn, other=0.0).to(tl.float32)
    b_a = tl.where(b_a < A_MIN, A_MIN, b_a)
    if HAS_DTB:
        b_dtb = tl.load(dtb_ptr + i_h * sdtb_h + o_p * sdtb_p, mask=m_p, other=0.0).to(tl.float32)   # [BP]
    if HAS_D:
        b_D = tl.load(d_ptr + i_h * sd_h + o_p * sd_p, mask=m_p, other=0.0).to(tl.float32)
    for i_t in range(T):
        t64 = tl.cast(i_t, tl.int64)
        b_x = tl.load(x_ptr + i_b * sx_b + t64 * sx_t + i_h * sx_h + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_dt = tl.load(dt_ptr + i_b * sdt_b + t64 * sdt_t + i_h * sdt_h + o_p * sdt_p, mask=m_p, other=0.0).to(tl.float32)
        if HAS_DTB:
            b_dt += b_dtb
        if SOFTPLUS:
            b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(b_dt)), b_dt)
        b_B = tl.load(b_ptr + i_b * sb_b + t64 * sb_t + i_g * sb_g + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BN]
        b_C = tl.load(c_ptr + i_b * sc_b + t64 * sc_t + i_g * sc_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_la = b_a * b_dt[:, None]
        b_la = tl.where(b_la < _LOG_DECAY_MIN, _LOG_DECAY_MIN, b_la)
        b_s = b_s * tl.exp(b_la) + (b_dt * b_x)[:, None] * b_B[None, :]
        b_y = tl.sum(b_s * b_C[None, :], axis=1)                                             # [BP]
        if ROUND_STATE:      # the next token reads the state as a single-token update stores it
            b_s = b_s.to(s_ptr.dtype.element_ty).to(tl.float32)
        tl.store(so_ptr + i_b * sso_b + t64 * sso_t + i_h * sso_h + o_pn, b_s.to(so_ptr.dtype.element_ty), mask=m_pn)
        if HAS_D:
            b_y += b_x * b_D
        if HAS_Z:
            b_z = tl.load(z_ptr + i_b * sz_b + t64 * sz_t + i_h * sz_h + o_p, mask=m_p, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        tl.store(y_ptr + i_b * sy_b + t64 * sy_t + i_h * sy_h + o_p, b_y.to(y_ptr.dtype.element_ty), mask=m_p)
    tl.store(p_s, b_s.to(s_ptr.dtype.element_ty), mask=m_pn)


def selective_state_update_multi(state, x, dt, A, B, C, states_out, *, D=None, z=None, dt_bias=None,
                                 dt_softplus=False):
    """T decode steps in one launch, state in place, the state after each token into states_out
    (validated arguments, broadcast views allowed; see ops.selective_state_update_multi)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    y = torch.empty(b, t, h, p, dtype=x.dtype, device=x.device)
    if b == 0 or t == 0:
        return y
    dt4 = dt[..., None].expand(b, t, h, p) if dt.dim() == 3 else dt
    a3, d2, dtb2, bp, bn = _per_head(A, D, dt_bias, h, p, n)
    zz = z if z is not None else x
    dummy = x
    _state_update_multi_fwd_kernel[(b, h, triton.cdiv(p, bp))](
        state, states_out, x, dt4, a3, B, C, d2 if d2 is not None else dummy, zz,
        dtb2 if dtb2 is not None else dummy, y,
        t, h, p, n, h // g, state.stride(0), state.stride(1),
        states_out.stride(0), states_out.stride(1), states_out.stride(2), x.stride(0), x.stride(1), x.stride(2),
        dt4.stride(0), dt4.stride(1), dt4.stride(2), dt4.stride(3), a3.stride(0), a3.stride(1), a3.stride(2),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        d2.stride(0) if d2 is not None else 0, d2.stride(1) if d2 is not None else 0,
        zz.stride(0), zz.stride(1), zz.stride(2),
        dtb2.stride(0) if dtb2 is not None else 0, dtb2.stride(1) if dtb2 is not None else 0,
        y.stride(0), y.stride(1), y.stride(2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus,
        ROUND_STATE=state.dtype != torch.float32, BP=bp, BN=bn, num_warps=4)
    return y
