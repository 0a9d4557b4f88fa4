"""Triton kernels: depthwise causal conv1d (channel-last), the single-token selective state update,
and the gated grouped RMSNorm. All three are bandwidth-bound; each reads its inputs once.

Layout: conv1d works on x [B, T, D] (channel-last, as the in_proj output is laid out), with
conv states [B, W-1, D] holding the W-1 inputs before the first token, oldest first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ssd import _sequence


@triton.jit(do_not_specialize=["T"])  # one compile for every sequence length
def _conv1d_fwd_kernel(x_ptr, w_ptr, bias_ptr, s0_ptr, y_ptr, cu_ptr, T, D, sx_b, sx_t, sy_b, sy_t,
                       W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_S0: tl.constexpr, SILU: tl.constexpr,
                       IS_VARLEN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_s, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _sequence(cu_ptr, i_s, T, IS_VARLEN)
    o_t = bos + i_t * BT + tl.arange(0, BT).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < eos, o_d < D
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for k in tl.static_range(W):
        o_src = o_t - (W - 1) + k                                           # input row feeding tap k
        m_x = (o_src >= bos) & m_t
        b_x = tl.load(x_ptr + i_b * sx_b + o_src[:, None] * sx_t + o_d[None, :],
                      mask=m_x[:, None] & m_d[None, :], other=0.0).to(tl.float32)          # [BT, BD]
        if HAS_S0:
            o_h = o_src - bos + (W - 1)                                     # row of the initial state
            m_h = (o_src < bos) & m_t
            b_x += tl.load(s0_ptr + i_s * (W - 1) * D + o_h[:, None] * D + o_d[None, :],
                           mask=m_h[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)             # [BD]
        acc += b_x * b_w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + i_b * sy_b + o_t[:, None] * sy_t + o_d[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_states=None, cu_seqlens=None):
    """y [B, T, D] of the depthwise causal conv (validated arguments; see ops.causal_conv1d)."""
    b, t, d = x.shape
    w = weight.shape[1]
    n_seq = cu_seqlens.numel() - 1 if cu_seqlens is not None else b
    y = torch.empty(b, t, d, dtype=x.dtype, device=x.device)
    if t == 0 or d == 0:
        return y
    bt, bd = 32, min(128, triton.next_power_of_2(d))
    # varlen: a sequence needs at most cdiv(T, BT) token blocks; programs past its end store nothing
    grid = (n_seq, triton.cdiv(t, bt), triton.cdiv(d, bd))
    dummy = weight
    _conv1d_fwd_kernel[grid](
        x, weight, bias if bias is not None else dummy, initial_states if initial_states is not None else dummy,
        y, cu_seqlens if cu_seqlens is not None else dummy, t, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        W=w, HAS_BIAS=bias is not None, HAS_S0=initial_states is not None, SILU=activation in ("silu", "swish"),
        IS_VARLEN=cu_seqlens is not None, BT=bt, BD=bd, num_warps=4)
    return y


@triton.jit
def _state_update_fwd_kernel(s_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dtb_ptr, idx_ptr, y_ptr,
                             H, P, N, HG, ss_b, ss_h, sx_b, sx_h, sdt_b, sdt_h, sdt_p, sa_h, sa_p, sa_n,
                             sb_b, sb_g, sc_b, sc_g, sd_h, sd_p, sz_b, sz_h, sdtb_h, sdtb_p, sy_b, sy_h,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                             SOFTPLUS: tl.constexpr, HAS_IDX: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    i_b, i_h, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    p_y = y_ptr + i_b * sy_b + i_h * sy_h + o_p
    row = i_b.to(tl.int64)
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
        b_s = b_s * tl.exp(b_a * b_dt[:, None]) + (b_dt * b_x)[:, None] * b_B[None, :]
        tl.store(p_s, b_s.to(s_ptr.dtype.element_ty), mask=m_pn)
        b_y = tl.sum(b_s * b_C[None, :], axis=1)
        if HAS_D:
            b_y += b_x * tl.load(d_ptr + i_h * sd_h + o_p * sd_p, mask=m_p, other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(z_ptr + i_b * sz_b + i_h * sz_h + o_p, mask=m_p, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_p)


def selective_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_indices=None):
    """In-place decode step (validated arguments, broadcast views allowed; see ops.selective_state_update)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    if b == 0:
        return y
    dt3 = dt[..., None].expand(b, h, p) if dt.dim() == 2 else dt
    a3 = A[:, None, None].expand(h, p, n) if A.dim() == 1 else A
    d2 = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)
    dtb2 = None if dt_bias is None else (dt_bias[:, None].expand(h, p) if dt_bias.dim() == 1 else dt_bias)
    zz = z if z is not None else x
    dummy = x
    bp = min(16, triton.next_power_of_2(p))
    bn = max(16, triton.next_power_of_2(n))
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


@triton.jit
def _gated_rmsnorm_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, D, GS, eps, sx, sz, sy, BG: tl.constexpr):
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    o = i_g * GS + tl.arange(0, BG)
    m = tl.arange(0, BG) < GS
    row = i_r.to(tl.int64)
    b_x = tl.load(x_ptr + row * sx + o, mask=m, other=0.0).to(tl.float32)
    b_z = tl.load(z_ptr + row * sz + o, mask=m, other=0.0).to(tl.float32)
    b_v = b_x * b_z * tl.sigmoid(b_z)                                   # x * silu(z), before the norm
    b_r = tl.rsqrt(tl.sum(b_v * b_v, axis=0) / GS + eps)
    b_w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + o, (b_v * b_r * b_w).to(y_ptr.dtype.element_ty), mask=m)


def gated_rmsnorm(x, z, weight, *, group_size, eps=1e-5):
    d = x.shape[-1]
    x2, z2 = x.reshape(-1, d), z.reshape(-1, d)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _gated_rmsnorm_fwd_kernel[(x2.shape[0], d // group_size)](
            x2, z2, weight, y, d, group_size, eps, x2.stride(0), z2.stride(0), y.stride(0),
            BG=triton.next_power_of_2(group_size), num_warps=4 if group_size <= 1024 else 8)
    return y.reshape(x.shape)
