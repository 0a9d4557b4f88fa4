"""Triton kernel: depthwise causal conv1d over tokens, channel-last, any width W (unrolled taps).

Layout: x [B, T, D] (channel-last, as the in_proj output is laid out), with conv states
[B, W-1, D] holding the W-1 inputs before the first token, oldest first. Bandwidth-bound: each
program reads its [BT + W - 1, BD] input window once per tap from L1/L2 and writes y once. The
multi-token decode update walks T tokens per program and also stores each token's conv state.
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
    i_s, i_t, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
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


@triton.jit(do_not_specialize=["T"])
def _conv1d_update_multi_fwd_kernel(x_ptr, s_ptr, so_ptr, w_ptr, bias_ptr, y_ptr, T, D, sx_b, sx_t, ss_b, ss_w,
                                    sso_b, sso_t, sso_w, sy_b, sy_t,
                                    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BD: tl.constexpr):
    # token t's window is rows t .. t+W-1 of [conv_state; x]; its taps 1..W-1 are the state after t
    i_b, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    for i_t in range(T):
        t64 = tl.cast(i_t, tl.int64)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for k in tl.static_range(W):
            o_src = t64 - (W - 1) + k                                       # < 0: a conv_state row
            if o_src >= 0:
                b_x = tl.load(x_ptr + i_b * sx_b + o_src * sx_t + o_d, mask=m_d, other=0.0)        # [BD]
            else:
                b_x = tl.load(s_ptr + i_b * ss_b + (o_src + W - 1) * ss_w + o_d, mask=m_d, other=0.0)
            if k > 0:
                tl.store(so_ptr + i_b * sso_b + t64 * sso_t + (k - 1) * sso_w + o_d, b_x.to(so_ptr.dtype.element_ty),
                         mask=m_d)
            b_w = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)             # [BD]
            acc += b_x.to(tl.float32) * b_w
        if HAS_BIAS:
            acc += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_ptr + i_b * sy_b + t64 * sy_t + o_d, acc.to(y_ptr.dtype.element_ty), mask=m_d)
    # the final state: rows T .. T+W-2 of [conv_state; x]; row j reads state row T+j > j, never one
    # already overwritten
    for j in tl.static_range(W - 1):
        o_src = T.to(tl.int64) - (W - 1) + j
        if o_src >= 0:
            b_x = tl.load(x_ptr + i_b * sx_b + o_src * sx_t + o_d, mask=m_d, other=0.0)
        else:
            b_x = tl.load(s_ptr + i_b * ss_b + (o_src + W - 1) * ss_w + o_d, mask=m_d, other=0.0)
        tl.store(s_ptr + i_b * ss_b + j * ss_w + o_d, b_x.to(s_ptr.dtype.element_ty), mask=m_d)


def causal_conv1d_update_multi(x, conv_state, weight, conv_states_out, bias=None, *, activation=None):
    """T decode steps of the conv in one launch: conv_state in place, the state after each token into
    conv_states_out (validated arguments; see ops.causal_conv1d_update_multi)."""
    b, t, d = x.shape
    w = weight.shape[1]
    y = torch.empty(b, t, d, dtype=x.dtype, device=x.device)
    if b == 0 or t == 0 or d == 0:
        return y
    bd = min(256, triton.next_power_of_2(d))
    _conv1d_update_multi_fwd_kernel[(b, triton.cdiv(d, bd))](
        x, conv_state, conv_states_out, weight, bias if bias is not None else weight, y, t, d,
        x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1),
        conv_states_out.stride(0), conv_states_out.stride(1), conv_states_out.stride(2), y.stride(0), y.stride(1),
        W=w, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"), BD=bd, num_warps=4)
    return y
