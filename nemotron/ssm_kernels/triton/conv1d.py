"""Triton kernel: depthwise causal conv1d over tokens, channel-last, any width W (unrolled taps).

Layout: x [B, T, D] (channel-last, as the in_proj output is laid out), with conv states
[B, W-1, D] holding the W-1 inputs before the first token, oldest first. Bandwidth-bound: each
program reads its [BT + W - 1, BD] input window once per tap from L1/L2 and writes y once.
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
