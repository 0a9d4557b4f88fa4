"""Mamba-2 references: plain torch, loops allowed, FP64 by default. This file defines correct.

Shapes (one notation package-wide): B batch, T tokens, H heads, P head dim, G B/C groups (G | H,
head h reads group h // (H/G)), N state size, D channels, W conv width.

SSD (state-space duality, Mamba-2), per head and token t:
    dt_t  = clamp(softplus?(dt_t + dt_bias), dt_limit)                  (softplus(v) = v for v > 20)
    s_t   = exp(dt_t * A) * s_{t-1} + dt_t * x_t (outer) B_t            s: [P, N]
    y_t   = s_t C_t + D * x_t;  y_t *= silu(z_t) when z is given
The sequential recurrence (:func:`ssd_recurrence`) is the definition; :func:`ssd_chunked` is the
chunked algorithm of the Mamba-2 paper (Listing 1) that the kernel decomposes the same way, with
every exp of a cumsum difference clamped to <= 0.

Extreme decays (:func:`log_decay`): the per-token log decay dt_t * A is floored at LOG_DECAY_MIN
(exp(-128) is 0 in fp32 and < 1e-55 in fp64, so no finite result moves), and A = -inf is read as
-FLT_MAX, so dt = 0 is no step (decay 1). A = -inf, A = -3e38, dt = inf (A < 0) or an fp32
overflow of dt * A thus decay by ~0 as the limit says, and the fp32 cumsums stay finite (no
-inf - -inf = NaN).

Non-finite inputs are causal: a NaN / inf in x, dt, B, C or z at token t (of one sequence) leaves
every output before t, and every other sequence, exactly as without it. From t on the outputs it
reaches through the state are non-finite (NaN where the chunked forms cannot tell inf from NaN).
Masks therefore select with ``where`` after a product, never multiply by 0 (0 * NaN = NaN).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FLT_MAX = torch.finfo(torch.float32).max
LOG_DECAY_MIN = -128.0     # floor of dt * A (natural log units)


def process_dt(dt: torch.Tensor, dt_bias=None, dt_softplus: bool = False, dt_limit=(0.0, math.inf)) -> torch.Tensor:
    """dt [..., H] -> clamp(softplus?(dt + dt_bias), *dt_limit), in dt's dtype."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def log_decay(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """max(dt * max(A, -FLT_MAX), LOG_DECAY_MIN), elementwise: the log of a token's state decay.
    NaN stays NaN (torch.clamp propagates it)."""
    return torch.clamp(dt * torch.clamp(A, min=-FLT_MAX), min=LOG_DECAY_MIN)


def _seq_bounds(t: int, cu_seqlens) -> list:
    if cu_seqlens is None:
        return [(0, t)]
    c = [int(v) for v in cu_seqlens.tolist()]
    return list(zip(c[:-1], c[1:]))


def _expand_groups(v: torch.Tensor, h: int) -> torch.Tensor:
    """[B, T, G, N] -> [B, T, H, N]: head h reads group h // (H / G)."""
    return v.repeat_interleave(h // v.shape[2], dim=2)


def _gate(y, x, D, z):
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z)
    return y


def _ssd_per_sequence(one, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, cu_seqlens, dtype):
    """Shared driver: process dt, expand groups, run ``one(x, dt, A, B, C, s0) -> (y, s)`` on every
    sequence (batch row, or packed sequence with cu_seqlens), then apply D and the z gate."""
    cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    x, dt, A, B, C, D, z, dt_bias = map(cast, (x, dt, A, B, C, D, z, dt_bias))
    b, t, h, p = x.shape
    n = B.shape[-1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh, Ch = _expand_groups(B, h), _expand_groups(C, h)
    y = torch.zeros_like(x)
    bounds = _seq_bounds(t, cu_seqlens)
    finals = x.new_zeros(len(bounds) if cu_seqlens is not None else b, h, p, n)
    for bi in range(b):
        for si, (s0, s1) in enumerate(bounds):
            idx = si if cu_seqlens is not None else bi
            init = initial_states[idx].to(dtype) if initial_states is not None else x.new_zeros(h, p, n)
            y[bi, s0:s1], finals[idx] = one(x[bi, s0:s1], dt[bi, s0:s1], A, Bh[bi, s0:s1], Ch[bi, s0:s1], init)
    return _gate(y, x, D, z), finals


def _recurrence_one(x, dt, A, B, C, s):
    """One sequence, token by token: x [T,H,P], dt [T,H], B/C [T,H,N], s [H,P,N]."""
    y = torch.zeros_like(x)
    for ti in range(x.shape[0]):
        d = dt[ti]                                                                   # [H]
        s = torch.exp(log_decay(d, A))[:, None, None] * s + (d[:, None] * x[ti])[:, :, None] * B[ti][:, None, :]
        y[ti] = torch.einsum("hpn,hn->hp", s, C[ti])
    return y, s


def ssd_recurrence(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                   initial_states=None, cu_seqlens=None, dtype=torch.float64):
    """The sequential recurrence, token by token, in ``dtype``. Returns (y [B,T,H,P], final states [B|S,H,P,N])."""
    return _ssd_per_sequence(_recurrence_one, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit,
                             initial_states, cu_seqlens, dtype)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., Q] -> [..., Q, Q] with out[i, j] = sum_{k=j+1..i} a_k for i >= j, -inf above (stable form)."""
    q = a.shape[-1]
    a = a[..., None].expand(*a.shape, q)
    a = a.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), -1), 0)
    out = torch.cumsum(a, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device)), -math.inf)


def _causal_matmul(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[c, l, h, p] = sum_{s <= l} w[h, c, l, s] v[c, s, h, p], w already 0 for s > l.

    A matmul would let a non-finite v[s] reach the rows l < s as 0 * NaN, so v enters with its
    non-finite entries zeroed and each column (h, p) is set to NaN from its first non-finite row on
    (where the recurrence is non-finite too); the kernel does the same."""
    bad = ~torch.isfinite(v)
    out = torch.einsum("hcls,cshp->clhp", w, torch.where(bad, torch.zeros_like(v), v))
    return torch.where(torch.cumsum(bad, dim=1) > 0, torch.full_like(out, math.nan), out)


def _ssd_chunked_one(x, dt, A, B, C, chunk_size, s0):
    """One sequence: x [T,H,P], dt [T,H] (processed), B/C [T,H,N] (per head), s0 [H,P,N]."""
    t, h, p = x.shape
    n = B.shape[-1]
    q = chunk_size
    pad = (-t) % q
    if pad:  # zero dt/x past the end: no decay, no input
        x, dt, B, C = (F.pad(v, (0, 0) * (v.dim() - 1) + (0, pad)) for v in (x, dt, B, C))
    c = x.shape[0] // q
    xd = (x * dt[..., None]).reshape(c, q, h, p)
    a = log_decay(dt, A).reshape(c, q, h).permute(2, 0, 1)                           # [H, c, Q]
    Bc, Cc = B.reshape(c, q, h, n), C.reshape(c, q, h, n)
    cs = torch.cumsum(a, dim=-1)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    # masked after the C B^T product: a non-finite B_s fills column s, which rows l < s must not see
    cb = torch.einsum("clhn,cshn->hcls", Cc, Bc) * torch.exp(_segsum(a))             # [H, c, Q, Q]
    y_diag = _causal_matmul(torch.where(causal, cb, torch.zeros_like(cb)), xd)
    decay_states = torch.exp(torch.clamp(cs[..., -1:] - cs, max=0))                  # [H, c, Q]
    states = torch.einsum("clhn,hcl,clhp->chpn", Bc, decay_states, xd)               # each chunk's own input
    # chunk to chunk in order: a weighted sum over all chunk states would add the later ones as 0 * NaN
    new = [s0]                                                                       # state before chunk i
    for i in range(c):
        new.append(torch.exp(torch.clamp(cs[:, i, -1], max=0))[:, None, None] * new[-1] + states[i])
    before = torch.stack(new[:-1]) if c else s0.new_zeros(0, h, p, n)
    y_off = torch.einsum("clhn,chpn,hcl->clhp", Cc, before, torch.exp(torch.clamp(cs, max=0)))
    return (y_diag + y_off).reshape(c * q, h, p)[:t], new[-1]


def ssd_chunked(x, dt, A, B, C, *, chunk_size=128, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, math.inf), initial_states=None, cu_seqlens=None, dtype=torch.float32):
    """The chunked SSD algorithm in ``dtype``; same arguments and returns as :func:`ssd_recurrence`."""
    one = lambda x_, dt_, A_, B_, C_, s0: _ssd_chunked_one(x_, dt_, A_, B_, C_, chunk_size, s0)  # noqa: E731
    return _ssd_per_sequence(one, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                             cu_seqlens, dtype)


def _act(y, activation):
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_reference(x, weight, bias=None, *, activation=None, initial_states=None, cu_seqlens=None,
                            dtype=torch.float64):
    """Depthwise causal conv over T. x [B, T, D] (channel-last), weight [D, W], bias [D],
    initial_states [B|S, W-1, D] (the W-1 inputs before the first token, oldest first).
    Returns (y [B, T, D] in ``dtype``, final states [B|S, W-1, D]: the last W-1 inputs)."""
    b, t, d = x.shape
    w = weight.shape[1]
    xs, wt = x.to(dtype), weight.to(dtype)
    y = torch.zeros_like(xs)
    bounds = _seq_bounds(t, cu_seqlens)
    finals = xs.new_zeros(len(bounds) if cu_seqlens is not None else b, w - 1, d)
    for bi in range(b):
        for si, (s0, s1) in enumerate(bounds):
            idx = si if cu_seqlens is not None else bi
            hist = initial_states[idx].to(dtype) if initial_states is not None else xs.new_zeros(w - 1, d)
            seq = torch.cat([hist, xs[bi, s0:s1]], 0)                                   # [W-1+L, D]
            for k in range(w):                                                          # tap k sees x[t - (W-1) + k]
                y[bi, s0:s1] += seq[k:k + s1 - s0] * wt[:, k]
            finals[idx] = seq[seq.shape[0] - (w - 1):]
    if bias is not None:
        y = y + bias.to(dtype)
    return _act(y, activation), finals


def causal_conv1d_update_reference(x, conv_state, weight, bias=None, *, activation=None, dtype=torch.float64):
    """Decode: x [B, D] or [B, L, D] new tokens, conv_state [B, W-1, D]. Returns (y like x, new conv_state)."""
    squeeze = x.dim() == 2
    x3 = x[:, None] if squeeze else x
    y, final = causal_conv1d_reference(x3, weight, bias, activation=activation, initial_states=conv_state, dtype=dtype)
    return (y[:, 0] if squeeze else y), final


def selective_state_update_reference(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                                     state_indices=None, dtype=torch.float64):
    """One decode step of the recurrence. state [S, H, P, N]; x [B, H, P]; dt [B, H] or [B, H, P];
    A [H] or [H, P, N]; B, C [B, G, N]; D, dt_bias [H] or [H, P]; z [B, H, P]; state_indices [B]
    (row of ``state`` per batch entry, < 0 = padding: skipped, y = 0).
    Returns (y [B, H, P] in ``dtype``, the new state tensor in ``dtype``); nothing in place."""
    b, h, p = x.shape
    n = B.shape[-1]
    new = state.to(dtype).clone()
    xs = x.to(dtype)
    dts = dt.to(dtype)
    if dts.dim() == 2:
        dts = dts[..., None].expand(b, h, p)
    if dt_bias is not None:
        dts = dts + (dt_bias.to(dtype)[:, None] if dt_bias.dim() == 1 else dt_bias.to(dtype))
    if dt_softplus:
        dts = torch.where(dts <= 20.0, F.softplus(dts), dts)
    a = A.to(dtype)
    a = a[:, None, None].expand(h, p, n) if a.dim() == 1 else a
    Bh, Ch = B.to(dtype).repeat_interleave(h // B.shape[1], 1), C.to(dtype).repeat_interleave(h // C.shape[1], 1)
    y = torch.zeros_like(xs)
    for bi in range(b):
        row = bi if state_indices is None else int(state_indices[bi])
        if row < 0:
            continue
        d = dts[bi][..., None]                                                       # [H, P, 1]
        new[row] = torch.exp(log_decay(d, a)) * new[row] + d * xs[bi][..., None] * Bh[bi][:, None, :]
        y[bi] = torch.einsum("hpn,hn->hp", new[row], Ch[bi])
    Dd = None if D is None else D.to(dtype)
    y = _gate(y, xs, Dd, None if z is None else z.to(dtype))
    if state_indices is not None:
        y = torch.where((state_indices < 0)[:, None, None], torch.zeros_like(y), y)
    return y, new


def selective_state_update_multi_reference(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None,
                                           dt_softplus=False, dtype=torch.float64):
    """T decode steps per sequence, defined as T sequential :func:`selective_state_update_reference`
    calls (so it equals them bit for bit): token t reads the state token t-1 left, rounded to
    ``state.dtype`` as a single-token update writes it. state [B, H, P, N]; x [B, T, H, P];
    dt [B, T, H] or [B, T, H, P]; B, C [B, T, G, N]; z [B, T, H, P]; A, D, dt_bias as for one step.
    Returns (y [B, T, H, P] in ``dtype``, states [B, T, H, P, N] in ``state.dtype``: the state after
    each token); nothing in place."""
    t = x.shape[1]
    ys, states, cur = [], [], state
    for ti in range(t):
        y, new = selective_state_update_reference(cur, x[:, ti], dt[:, ti], A, B[:, ti], C[:, ti], D=D,
                                                  z=None if z is None else z[:, ti], dt_bias=dt_bias,
                                                  dt_softplus=dt_softplus, dtype=dtype)
        cur = new.to(state.dtype)
        ys.append(y)
        states.append(cur)
    b, h, p, n = state.shape
    if not t:
        return x.new_zeros(b, 0, h, p, dtype=dtype), state.new_zeros(b, 0, h, p, n)
    return torch.stack(ys, 1), torch.stack(states, 1)


def causal_conv1d_update_multi_reference(x, conv_state, weight, bias=None, *, activation=None, dtype=torch.float64):
    """T decode steps of the conv, defined as T sequential single-token
    :func:`causal_conv1d_update_reference` calls. x [B, T, D], conv_state [B, W-1, D].
    Returns (y [B, T, D] in ``dtype``, states [B, T, W-1, D] in conv_state's dtype: the conv state
    after each token, i.e. its last W-1 inputs); nothing in place."""
    b, t, d = x.shape
    ys, states, cur = [], [], conv_state
    for ti in range(t):
        y, new = causal_conv1d_update_reference(x[:, ti], cur, weight, bias, activation=activation, dtype=dtype)
        cur = new.to(conv_state.dtype)       # exact: the state only holds inputs
        ys.append(y)
        states.append(cur)
    if not t:
        return x.new_zeros(b, 0, d, dtype=dtype), conv_state.new_zeros(b, 0, *conv_state.shape[1:])
    return torch.stack(ys, 1), torch.stack(states, 1)


def gated_rmsnorm_reference(x, z, weight, *, group_size, eps=1e-5, dtype=torch.float64):
    """rmsnorm(x * silu(z)) within groups of ``group_size`` along the last dim, times weight
    (Nemotron's norm_before_gate=False). x, z [..., D]; weight [D]."""
    d = x.shape[-1]
    v = x.to(dtype) * F.silu(z.to(dtype))
    g = v.reshape(*v.shape[:-1], d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return g.reshape(v.shape) * weight.to(dtype)
