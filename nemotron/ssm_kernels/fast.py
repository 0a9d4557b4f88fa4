"""Fast plain-torch decode updates (CPU's default path): the conv and SSM state updates for one token
(decode) and for T tokens (speculative verification), in fp32.

The references (:mod:`.reference`) loop over batch rows and, for T tokens, over single-token calls,
each cloning its state; on a CPU that per-op overhead is most of a decode step. Here all the
elementwise work (dt processing, decays, input terms, gating) is done once for all T tokens and
rows, and only the recurrence steps token by token (a multiply-add and a contraction over N). The
arithmetic is the fp32 reference's, in its order; transcendental functions (exp, softplus, silu)
may differ from it by an ulp where torch's vectorized and scalar code paths differ, so these paths
match the reference within a tolerance, not bit for bit (``tests/ssm_kernels/test_state_update_multi.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import log_decay

_F32 = torch.float32


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], silu: bool,
                         conv_states_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T conv decode steps: x ``[B, T, D]``, conv_state ``[B, W-1, D]`` (advanced in place over the
    T tokens), weight ``[D, W]``; conv_states_out ``[B, T, W-1, D]`` (optional) receives the state
    after each token. Returns y ``[B, T, D]`` in x's dtype: zero, plus each tap in order, plus the
    bias, then silu, in fp32."""
    b, t, d = x.shape
    w = weight.shape[1]
    win = torch.cat([conv_state, x.to(conv_state.dtype)], 1)                 # [B, W-1+T, D]: the inputs
    seq, wt = win.to(_F32), weight.to(_F32)
    y = torch.zeros(b, t, d, dtype=_F32, device=x.device)
    for k in range(w):                                                       # tap k sees x[t - (W-1) + k]
        y += seq[:, k:k + t] * wt[:, k]
    if bias is not None:
        y = y + bias.to(_F32)
    if silu:
        y = F.silu(y)
    if w > 1:
        if conv_states_out is not None:                                      # after token j: inputs j+1 .. j+W-1
            conv_states_out.copy_(win.unfold(1, w - 1, 1)[:, 1:].transpose(-1, -2))
        conv_state.copy_(win[:, t:])
    return y.to(x.dtype)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                           dt_bias: Optional[torch.Tensor], dt_softplus: bool,
                           states_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T SSM decode steps per sequence, token-major as ``ops.selective_state_update_multi`` (x
    ``[B, T, H, P]``, dt ``[B, T, H]`` or ``[B, T, H, P]``, B/C ``[B, T, G, N]``, z ``[B, T, H, P]``);
    state ``[B, H, P, N]`` is updated in place, each token reading the state the one before left in
    ``state``'s dtype; states_out ``[B, T, H, P, N]`` (optional) receives the state after each token.
    Returns y ``[B, T, H, P]`` in x's dtype."""
    b, t, h, p = x.shape
    n = state.shape[-1]
    xs, dts = x.to(_F32), dt.to(_F32)
    if dts.dim() == 3:
        dts = dts[..., None].expand(b, t, h, p)
    if dt_bias is not None:
        dts = dts + (dt_bias.to(_F32)[:, None] if dt_bias.dim() == 1 else dt_bias.to(_F32))
    if dt_softplus:
        dts = torch.where(dts <= 20.0, F.softplus(dts), dts)
    a = A.to(_F32)
    a = a[:, None, None].expand(h, p, n) if a.dim() == 1 else a
    Bh = B.to(_F32).repeat_interleave(h // B.shape[2], 2)                   # [B, T, H, N]
    Ch = C.to(_F32).repeat_interleave(h // C.shape[2], 2)
    d = dts[..., None]                                                       # [B, T, H, P, 1]
    decay = torch.exp(log_decay(d, a))                                       # [B, T, H, P, N]
    inc = d * xs[..., None] * Bh[:, :, :, None, :]
    ys = []
    cur = state
    for ti in range(t):
        new = decay[:, ti] * cur.to(_F32) + inc[:, ti]                       # [B, H, P, N]
        ys.append(torch.einsum("bhpn,bhn->bhp", new, Ch[:, ti]))
        cur = new.to(state.dtype)
        if states_out is not None:
            states_out[:, ti].copy_(cur)
    if t:
        state.copy_(cur)
    y = torch.stack(ys, 1) if ys else xs.new_zeros(b, 0, h, p)
    if D is not None:
        Dd = D.to(_F32)
        y = y + (Dd[:, None] if Dd.dim() == 1 else Dd) * xs
    if z is not None:
        y = y * F.silu(z.to(_F32))
    return y.to(x.dtype)
