"""Mamba-2 ops: validation at the public boundary, ``torch.library`` registrations, dispatch.

Each op picks its implementation through :mod:`nemotron.dispatch`: Triton kernels for CUDA tensors,
elsewhere the decode updates' fast torch paths (:mod:`.fast`) and the references (the chunked fp32
SSD there; the FP64 recurrence is the tests' oracle); a
trailing ``impl`` argument names one outright (the ``nemotron`` backend's lowering writes it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import dispatch
from ..dispatch import FLOAT_DTYPES as _FLOATS
from . import fast
from . import reference as ref
from .triton import conv1d as conv_kernels
from .triton import gated_rmsnorm as norm_kernels
from .triton import ssd as ssd_kernels
from .triton import state_update as ssu_kernels

CHUNK_SIZES = (16, 32, 64, 128, 256)   # every one fits sm_90's shared memory per block (bench.static)
MAX_CONV_WIDTH = 32        # the kernel unrolls its W taps; HF's Nemotron-H uses 4
_EMPTY = lambda like: like.new_empty(0, dtype=torch.float32)  # noqa: E731  (final states not asked for)


# ---- torch.library ops -------------------------------------------------------------------------

@torch.library.custom_op("nemotron::ssd_scan", mutates_args=())
def _ssd_scan_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 chunk_size: int, D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                 dt_softplus: bool, dt_lo: float, dt_hi: float, initial_states: Optional[torch.Tensor],
                 cu_seqlens: Optional[torch.Tensor], return_final_states: bool,
                 impl: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=(dt_lo, dt_hi),
              initial_states=initial_states, cu_seqlens=cu_seqlens)
    if dispatch.choose("ssd_scan", x, impl).name == "triton":
        out = ssd_kernels.ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, return_final_states=return_final_states, **kw)
        return out if return_final_states else (out, _EMPTY(x))
    y, final = ref.ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    return y.to(x.dtype), (final if return_final_states else _EMPTY(x))


@_ssd_scan_op.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_states, cu_seqlens, ret, impl=""):
    n_seq = (cu_seqlens.shape[0] - 1) if cu_seqlens is not None else x.shape[0]
    final = x.new_empty(n_seq, x.shape[2], x.shape[3], B.shape[3], dtype=torch.float32) if ret else _EMPTY(x)
    return torch.empty_like(x), final


def _conv_final_states(x, initial_states, cu_seqlens, w):
    """The last W-1 inputs of each sequence (initial states / zeros in front), [B|S, W-1, D]."""
    b, t, d = x.shape
    bounds = [(0, t)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    out = []
    for bi in range(b):
        for si, (s0, s1) in enumerate(bounds):
            idx = si if cu_seqlens is not None else bi
            hist = initial_states[idx] if initial_states is not None else x.new_zeros(w - 1, d)
            out.append(torch.cat([hist.to(x.dtype), x[bi, s0:s1]], 0)[s1 - s0:])
    return torch.stack(out) if out else x.new_zeros(0, w - 1, d)


@torch.library.custom_op("nemotron::causal_conv1d", mutates_args=())
def _conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
               initial_states: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               return_final_states: bool, impl: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    return _conv1d(x, weight, bias, silu, initial_states, cu_seqlens, return_final_states,
                   dispatch.choose("causal_conv1d", x, impl).name)


def _conv1d(x, weight, bias, silu, initial_states, cu_seqlens, return_final_states, impl: str):
    act = "silu" if silu else None
    if impl == "triton":
        y = conv_kernels.causal_conv1d(x, weight, bias, activation=act, initial_states=initial_states,
                                     cu_seqlens=cu_seqlens)
        final = _conv_final_states(x, initial_states, cu_seqlens, weight.shape[1]) if return_final_states else None
    else:
        y, final = ref.causal_conv1d_reference(x, weight, bias, activation=act, initial_states=initial_states,
                                               cu_seqlens=cu_seqlens, dtype=torch.float32)
        y = y.to(x.dtype)
    return y, (final.to(x.dtype) if return_final_states else _EMPTY(x))


@_conv1d_op.register_fake
def _(x, weight, bias, silu, initial_states, cu_seqlens, ret, impl=""):
    n_seq = (cu_seqlens.shape[0] - 1) if cu_seqlens is not None else x.shape[0]
    final = x.new_empty(n_seq, weight.shape[1] - 1, x.shape[2]) if ret else _EMPTY(x)
    return torch.empty_like(x), final


@torch.library.custom_op("nemotron::causal_conv1d_update", mutates_args=("conv_state",))
def _conv1d_update_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      silu: bool, impl: str = "") -> torch.Tensor:
    name = dispatch.choose("causal_conv1d_update", x, impl).name
    if name == "torch":
        return fast.causal_conv1d_update(x, conv_state, weight, bias, silu)
    y, final = _conv1d(x, weight, bias, silu, conv_state, None, True, name)
    conv_state.copy_(final)
    return y


@_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu, impl=""):
    return torch.empty_like(x)


@torch.library.custom_op("nemotron::selective_state_update", mutates_args=("state",))
def _ssu_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], dt_softplus: bool,
            state_indices: Optional[torch.Tensor], impl: str = "") -> torch.Tensor:
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, state_indices=state_indices)
    name = dispatch.choose("selective_state_update", x, impl).name
    if name == "triton":
        return ssu_kernels.selective_state_update(state, x, dt, A, B, C, **kw)
    if name == "torch" and state_indices is None:
        return fast.selective_state_update(state, x[:, None], dt[:, None], A, B[:, None], C[:, None], D,
                                           None if z is None else z[:, None], dt_bias, dt_softplus)[:, 0]
    y, new = ref.selective_state_update_reference(state, x, dt, A, B, C, dtype=torch.float32, **kw)
    state.copy_(new)
    return y.to(x.dtype)


@_ssu_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices, impl=""):
    return torch.empty_like(x)


@torch.library.custom_op("nemotron::selective_state_update_multi", mutates_args=("state", "states_out"))
def _ssu_multi_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, states_out: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                  dt_bias: Optional[torch.Tensor], dt_softplus: bool, impl: str = "") -> torch.Tensor:
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    name = dispatch.choose("selective_state_update_multi", x, impl).name
    if name == "triton":
        return ssu_kernels.selective_state_update_multi(state, x, dt, A, B, C, states_out, **kw)
    if name == "torch":
        return fast.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, states_out)
    y, states = ref.selective_state_update_multi_reference(state, x, dt, A, B, C, dtype=torch.float32, **kw)
    states_out.copy_(states)
    if x.shape[1]:
        state.copy_(states[:, -1])
    return y.to(x.dtype)


@_ssu_multi_op.register_fake
def _(state, x, dt, A, B, C, states_out, D, z, dt_bias, dt_softplus, impl=""):
    return torch.empty_like(x)


@torch.library.custom_op("nemotron::causal_conv1d_update_multi", mutates_args=("conv_state", "conv_states_out"))
def _conv1d_update_multi_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], conv_states_out: torch.Tensor, silu: bool,
                            impl: str = "") -> torch.Tensor:
    act = "silu" if silu else None
    name = dispatch.choose("causal_conv1d_update_multi", x, impl).name
    if name == "triton":
        return conv_kernels.causal_conv1d_update_multi(x, conv_state, weight, conv_states_out, bias, activation=act)
    if name == "torch":
        return fast.causal_conv1d_update(x, conv_state, weight, bias, silu, conv_states_out)
    y, states = ref.causal_conv1d_update_multi_reference(x, conv_state, weight, bias, activation=act,
                                                         dtype=torch.float32)
    conv_states_out.copy_(states)
    if x.shape[1]:
        conv_state.copy_(states[:, -1])
    return y.to(x.dtype)


@_conv1d_update_multi_op.register_fake
def _(x, conv_state, weight, bias, conv_states_out, silu, impl=""):
    return torch.empty_like(x)


@torch.library.custom_op("nemotron::gated_rmsnorm", mutates_args=())
def _gated_rmsnorm_op(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                      impl: str = "") -> torch.Tensor:
    if dispatch.choose("gated_rmsnorm", x, impl).name == "triton":
        return norm_kernels.gated_rmsnorm(x, z, weight, group_size=group_size, eps=eps)
    return ref.gated_rmsnorm_reference(x, z, weight, group_size=group_size, eps=eps, dtype=torch.float32).to(x.dtype)


@_gated_rmsnorm_op.register_fake
def _(x, z, weight, group_size, eps, impl=""):
    return torch.empty_like(x)


# ---- validation ----------------------------------------------------------------------------------

def _tensor(name, t, shape=None, *, dtypes=_FLOATS, device=None, optional=False, last_contiguous=True):
    if t is None:
        if optional:
            return
        raise ValueError(f"{name}: required")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if shape is not None:  # one shape [d0, d1, ...] or a list of alternatives [[...], [...]]
        options = shape if shape and isinstance(shape[0], (list, tuple)) else [shape]
        if tuple(t.shape) not in [tuple(o) for o in options]:
            want = " or ".join(str(list(o)) for o in options)
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if last_contiguous and t.dim() and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")


def _cu_seqlens(cu_seqlens, t: int, batch: int, device) -> int:
    """Validate cu_seqlens (int32/int64 [S+1], 0 .. T, non-decreasing); returns S."""
    _tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64), device=device)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [num_seqs + 1], got shape {list(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch 1, got batch {batch}")
    c = cu_seqlens.cpu()
    if c[0] != 0 or c[-1] != t or bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected 0 = c[0] <= ... <= c[-1] = {t} (the token count), got {c.tolist()}")
    return cu_seqlens.numel() - 1


# ---- public API ----------------------------------------------------------------------------------

def ssd_scan(x, dt, A, B, C, *, chunk_size=128, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, math.inf), initial_states=None, cu_seqlens=None, return_final_states=False):
    """Mamba-2 chunked SSD scan (semantics of mamba_ssm's ``mamba_chunk_scan_combined``).

    Args:
        x: ``[B, T, H, P]`` fp32/fp16/bf16; dt: ``[B, T, H]``; A: ``[H]`` (<= 0, fp32 preferred);
        B, C: ``[B, T, G, N]`` with G | H (head h reads group h // (H/G)); D: ``[H]`` or ``[H, P]``;
        z: ``[B, T, H, P]`` (output gated by silu(z)); dt_bias: ``[H]``; dt_softplus, dt_limit: dt is
        ``clamp(softplus(dt + dt_bias), *dt_limit)``; initial_states: ``[B, H, P, N]`` (or
        ``[S, H, P, N]`` with cu_seqlens); cu_seqlens: int ``[S + 1]`` offsets of S packed sequences
        in a batch of 1 (boundaries may fall inside a chunk); chunk_size: a power of two in 16..256.
        Strided views (e.g. x split from in_proj's output) are fine if the last dim is contiguous.
        The processed dt must be >= 0 and A <= 0 (a decay, as in Mamba-2): every exponent of a
        cumsum difference is clamped to <= 0, so extreme dt / A give finite output.

    Returns y ``[B, T, H, P]`` in x's dtype, and with ``return_final_states`` also the fp32 final
    states ``[B|S, H, P, N]``. The kernels run parallel over chunks (triton/ssd.py); memory beyond x
    and y: fp32 dt and its cumsum per token and head, and one fp32 ``[H, P, N]`` state per chunk.

    Example::

        >>> y, s = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
    """
    _tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, T, H, P], got shape {list(x.shape)}")
    b, t, h, p = x.shape
    dev = x.device
    _tensor("B", B, dtypes=_FLOATS, device=dev)
    if B.dim() != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"B: expected [B={b}, T={t}, G, N], got shape {list(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g:
        raise ValueError(f"B: its group count G={g} must divide the head count H={h}")
    _tensor("dt", dt, [b, t, h], device=dev)
    _tensor("A", A, [h], device=dev)
    _tensor("C", C, [b, t, g, n], device=dev)
    _tensor("D", D, [[h], [h, p]], device=dev, optional=True)
    _tensor("z", z, [b, t, h, p], device=dev, optional=True)
    _tensor("dt_bias", dt_bias, [h], device=dev, optional=True)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size: expected one of {CHUNK_SIZES}, got {chunk_size}")
    lo, hi = dt_limit
    if not (0.0 <= lo <= hi):
        raise ValueError(f"dt_limit: expected 0 <= low <= high, got {dt_limit}")
    n_seq = _cu_seqlens(cu_seqlens, t, b, dev) if cu_seqlens is not None else b
    _tensor("initial_states", initial_states, [n_seq, h, p, n], device=dev, optional=True)
    if initial_states is not None and not initial_states.is_contiguous():
        raise ValueError("initial_states: must be contiguous")
    for name, v in (("D", D), ("dt_bias", dt_bias), ("A", A)):
        if v is not None and not v.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    y, final = _ssd_scan_op(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, float(lo), float(hi),
                            initial_states, cu_seqlens, return_final_states)
    return (y, final) if return_final_states else y


def _check_conv(x, weight, bias, activation):
    _tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, T, D] (channel-last), got shape {list(x.shape)}")
    d = x.shape[2]
    _tensor("weight", weight, device=x.device)
    if weight.dim() != 2 or weight.shape[0] != d or not (1 <= weight.shape[1] <= MAX_CONV_WIDTH):
        raise ValueError(f"weight: expected [D={d}, W] with width W in 1..{MAX_CONV_WIDTH}, got shape "
                         f"{list(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight: must be contiguous")
    _tensor("bias", bias, [d], device=x.device, optional=True)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_states=None, cu_seqlens=None,
                  return_final_states=False):
    """Depthwise causal conv1d over tokens, channel-last (this package's layout).

    x ``[B, T, D]``; weight ``[D, W]`` (W in 1..32); bias ``[D]``; activation None | "silu";
    initial_states ``[B|S, W-1, D]``: the W-1 inputs before the first token, oldest first;
    cu_seqlens: int ``[S + 1]`` for S packed sequences in a batch of 1. Equals
    ``F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=W-1, groups=D)[..., :T]``.
    Returns y ``[B, T, D]`` in x's dtype (and the final states ``[B|S, W-1, D]``: the last W-1
    inputs of each sequence, the next call's initial states).
    """
    _check_conv(x, weight, bias, activation)
    b, t, d = x.shape
    w = weight.shape[1]
    n_seq = _cu_seqlens(cu_seqlens, t, b, x.device) if cu_seqlens is not None else b
    _tensor("initial_states", initial_states, [n_seq, w - 1, d], device=x.device, optional=True)
    if initial_states is not None and not initial_states.is_contiguous():
        raise ValueError("initial_states: must be contiguous")
    y, final = _conv1d_op(x, weight, bias, activation is not None, initial_states, cu_seqlens, return_final_states)
    return (y, final) if return_final_states else y


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation=None):
    """Decode: x ``[B, D]`` (one token) or ``[B, L, D]``; conv_state ``[B, W-1, D]`` (x's dtype,
    contiguous) is advanced in place. Returns y like x."""
    x3 = x[:, None] if isinstance(x, torch.Tensor) and x.dim() == 2 else x
    _check_conv(x3, weight, bias, activation)
    b, _, d = x3.shape
    _tensor("conv_state", conv_state, [b, weight.shape[1] - 1, d], dtypes=(x.dtype,), device=x.device)
    if not conv_state.is_contiguous():
        raise ValueError("conv_state: must be contiguous")
    y = _conv1d_update_op(x3, conv_state, weight, bias, activation is not None)
    return y[:, 0] if x.dim() == 2 else y


def selective_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_indices=None):
    """One decode step of the SSM, ``state`` updated in place (semantics of mamba_ssm's).

    state ``[S, H, P, N]`` (fp32/fp16/bf16; last two dims contiguous); x ``[B, H, P]``; dt ``[B, H]``
    or ``[B, H, P]``; A ``[H]`` or ``[H, P, N]``; B, C ``[B, G, N]``; D and dt_bias ``[H]`` or
    ``[H, P]``; z ``[B, H, P]``; state_indices int ``[B]``: the state row of each batch entry
    (default: row b), negative = padding (skipped, y = 0). Broadcast (stride-0) views are accepted.
    Returns y ``[B, H, P]`` in x's dtype.
    """
    _tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, H, P], got shape {list(x.shape)}")
    b, h, p = x.shape
    dev = x.device
    _tensor("state", state, device=dev)
    if state.dim() != 4 or state.shape[1:3] != (h, p):
        raise ValueError(f"state: expected [S, H={h}, P={p}, N], got shape {list(state.shape)}")
    n = state.shape[3]
    if state.stride(3) != 1 or state.stride(2) != n:
        raise ValueError("state: its last two dims [P, N] must be contiguous")
    _tensor("B", B, device=dev)
    if B.dim() != 3 or B.shape[0] != b or B.shape[2] != n or B.shape[1] == 0 or h % B.shape[1]:
        raise ValueError(f"B: expected [B={b}, G, N={n}] with G dividing H={h}, got shape {list(B.shape)}")
    _tensor("C", C, list(B.shape), device=dev)
    _tensor("dt", dt, [[b, h], [b, h, p]], device=dev, last_contiguous=False)
    _tensor("A", A, [[h], [h, p, n]], device=dev, last_contiguous=False)
    _tensor("D", D, [[h], [h, p]], device=dev, optional=True, last_contiguous=False)
    _tensor("dt_bias", dt_bias, [[h], [h, p]], device=dev, optional=True, last_contiguous=False)
    _tensor("z", z, [b, h, p], device=dev, optional=True)
    if state_indices is None and state.shape[0] != b:
        raise ValueError(f"state: {state.shape[0]} rows for batch {b}; pass state_indices to map them")
    _tensor("state_indices", state_indices, [b], dtypes=(torch.int32, torch.int64), device=dev, optional=True)
    if state_indices is not None and not state.is_cuda and b and int(state_indices.max()) >= state.shape[0]:
        raise ValueError(f"state_indices: values must be < {state.shape[0]} (the state rows)")
    return _ssu_op(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices)


def _check_states_out(name, out, shape, dtypes, dev):
    """A caller's buffer of per-token states ``[B, T, ...]``: any batch / token strides (a slice of a
    longer buffer), the dims after them contiguous (the kernels index them densely)."""
    _tensor(name, out, shape, dtypes=dtypes, device=dev)
    if out.numel() and not out[0, 0].is_contiguous():
        raise ValueError(f"{name}: the dims after [B, T] must be contiguous, got strides {out.stride()}")


def causal_conv1d_update_multi(x, conv_state, weight, bias=None, *, conv_states_out, activation=None):
    """T decode steps of the conv in one call (speculative verification), keeping every state.

    x ``[B, T, D]``; conv_state ``[B, W-1, D]`` (x's dtype, contiguous) is advanced in place over the
    T tokens; conv_states_out ``[B, T, W-1, D]`` (x's dtype, contiguous, caller-provided) receives
    the conv state after each token (the conv_state layout with a token axis after the batch), so a
    rollback to token t is ``conv_state.copy_(conv_states_out[:, t])``. Equals T single-token
    :func:`causal_conv1d_update` calls bit for bit on the reference path. Returns y ``[B, T, D]``.
    """
    _check_conv(x, weight, bias, activation)
    b, t, d = x.shape
    w = weight.shape[1]
    _tensor("conv_state", conv_state, [b, w - 1, d], dtypes=(x.dtype,), device=x.device)
    if not conv_state.is_contiguous():
        raise ValueError("conv_state: must be contiguous")
    _check_states_out("conv_states_out", conv_states_out, [b, t, w - 1, d], (x.dtype,), x.device)
    return _conv1d_update_multi_op(x, conv_state, weight, bias, conv_states_out, activation is not None)


def selective_state_update_multi(state, x, dt, A, B, C, *, states_out, D=None, z=None, dt_bias=None,
                                 dt_softplus=False):
    """T decode steps of the SSM per sequence in one call (speculative verification), keeping every state.

    Layout: token-major like :func:`ssd_scan` (x ``[B, T, H, P]``, dt ``[B, T, H]`` or
    ``[B, T, H, P]``, B and C ``[B, T, G, N]`` with G | H, z ``[B, T, H, P]``), so views of the
    in_proj / conv output pass without copies. state ``[B, H, P, N]`` (fp32/fp16/bf16, last two dims
    contiguous) is updated in place through all T tokens; A ``[H]`` or ``[H, P, N]``; D and dt_bias
    ``[H]`` or ``[H, P]``; dt_softplus as for :func:`selective_state_update`. states_out
    ``[B, T, H, P, N]`` (fp32 or fp16, last three dims contiguous, caller-provided) receives the state after each
    token (fp16: rounded to nearest). Token t reads the state token t-1 left in ``state``'s dtype, so
    this equals T single-token :func:`selective_state_update` calls (bit for bit on the reference
    path); the kernel keeps the state in registers across the tokens (one launch).
    Returns y ``[B, T, H, P]`` in x's dtype.

    Example::

        >>> y = selective_state_update_multi(state, x, dt, A, B, C, states_out=buf, D=D)   # buf [B, T, H, P, N]
        >>> state.copy_(buf[:, n - 1])                       # keep the first n tokens
    """
    _tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, T, H, P], got shape {list(x.shape)}")
    b, t, h, p = x.shape
    dev = x.device
    _tensor("state", state, device=dev)
    if state.dim() != 4 or state.shape[0] != b or state.shape[1:3] != (h, p):
        raise ValueError(f"state: expected [B={b}, H={h}, P={p}, N], got shape {list(state.shape)}")
    n = state.shape[3]
    if state.stride(3) != 1 or state.stride(2) != n:
        raise ValueError("state: its last two dims [P, N] must be contiguous")
    _tensor("B", B, device=dev)
    if B.dim() != 4 or B.shape[:2] != (b, t) or B.shape[3] != n or B.shape[2] == 0 or h % B.shape[2]:
        raise ValueError(f"B: expected [B={b}, T={t}, G, N={n}] with G dividing H={h}, got shape {list(B.shape)}")
    _tensor("C", C, list(B.shape), device=dev)
    _tensor("dt", dt, [[b, t, h], [b, t, h, p]], device=dev, last_contiguous=False)
    _tensor("A", A, [[h], [h, p, n]], device=dev, last_contiguous=False)
    _tensor("D", D, [[h], [h, p]], device=dev, optional=True, last_contiguous=False)
    _tensor("dt_bias", dt_bias, [[h], [h, p]], device=dev, optional=True, last_contiguous=False)
    _tensor("z", z, [b, t, h, p], device=dev, optional=True)
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus: expected a bool, got {type(dt_softplus).__name__}")
    _check_states_out("states_out", states_out, [b, t, h, p, n], (torch.float32, torch.float16), dev)
    return _ssu_multi_op(state, x, dt, A, B, C, states_out, D, z, dt_bias, dt_softplus)


def gated_rmsnorm(x, z, weight, *, group_size, eps=1e-5):
    """RMSNorm of ``x * silu(z)`` within groups of ``group_size`` along the last dim, times weight
    (Nemotron's ``norm_before_gate=False``). x, z ``[..., D]``; weight ``[D]``; D % group_size == 0.
    fp32 math, result in x's dtype."""
    _tensor("x", x)
    d = x.shape[-1] if x.dim() else 0
    _tensor("z", z, list(x.shape), device=x.device)
    _tensor("weight", weight, [d], device=x.device)
    if not isinstance(group_size, int) or group_size <= 0 or d % group_size:
        raise ValueError(f"group_size: expected a positive divisor of D={d}, got {group_size}")
    for name, v in (("x", x), ("z", z)):
        if not dispatch.flattens(v):
            raise ValueError(f"{name}: leading dims must flatten without a copy; call .contiguous()")
    return _gated_rmsnorm_op(x, z, weight, group_size, float(eps))
