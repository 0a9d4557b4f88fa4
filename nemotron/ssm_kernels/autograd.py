"""Backward of the Mamba-2 ops: ``torch.library.register_autograd`` for ``nemotron::ssd_scan``,
``nemotron::causal_conv1d`` and ``nemotron::gated_rmsnorm``, so the model trains end to end.

The backward is the differentiated reference: it recomputes the op's plain-torch reference
(:mod:`nemotron.ssm_kernels.reference`; the chunked SSD at the forward's chunk size) from the saved
inputs under ``torch.func.vjp``, in fp32 (fp64 when an input is fp64), and returns each float
input's gradient in that input's dtype (None for the integer, boolean and absent arguments). There
are no Triton backward kernels yet, so the forward's result never feeds the backward: it is the
same whichever implementation (reference or Triton) ran the forward. Only the inputs are saved; the
backward costs one more forward of the reference. An output whose gradient autograd leaves
undefined (e.g. final states nobody read) is left out of the differentiation (a zero gradient).
The decode ops (``causal_conv1d_update``, ``selective_state_update``) mutate caches and get none.

Under ``torch.compile`` the ops stay opaque in the forward graph and AOTAutograd traces this
backward formula into the backward graph, as for any custom op with registered autograd. A traced
backward cannot read ``cu_seqlens`` on the host, so packed sequences train eagerly only (a clear
error at compile time says so).
"""
from __future__ import annotations

import torch

from . import ops  # noqa: F401  (defines the ops whose autograd is registered here)
from . import reference as ref


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _vjp(fn, inputs: list, needs: list, cotangents: list) -> list:
    """Gradients of ``fn(*inputs) -> tuple of outputs`` with respect to each ``inputs[i]`` with
    ``needs[i]`` (None for the rest), given the output gradients ``cotangents``. An output whose
    gradient is None is left out of the differentiated function (not given a zero gradient), so the
    result is autograd's through the reference bit for bit; all None: no work. Each gradient comes
    back in its input's dtype (the references cast inside, and the gradient of a cast casts back)."""
    idx = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    used = [j for j, c in enumerate(cotangents) if c is not None]
    out = [None] * len(inputs)
    if not idx or not used:
        return out

    def f(*diff):
        args = list(inputs)
        for i, v in zip(idx, diff):
            args[i] = v
        values = fn(*args)
        return tuple(values[j] for j in used)

    values, pullback = torch.func.vjp(f, *[inputs[i] for i in idx])
    for i, g in zip(idx, pullback(tuple(cotangents[j].to(v.dtype) for j, v in zip(used, values)))):
        out[i] = g
    return out


def _host_bounds(op: str, cu_seqlens) -> None:
    """The references split packed sequences at host-read bounds, which a traced backward cannot do."""
    if cu_seqlens is not None and torch.compiler.is_compiling():
        raise ValueError(f"cu_seqlens: the backward of nemotron::{op} over packed sequences runs eagerly only "
                         "(the reference reads the sequence bounds on the host); compile without cu_seqlens "
                         "or run this step eagerly")


def _final_grad(d_final):
    """The final states' gradient, or None where they were not returned (the op's empty placeholder)."""
    return None if d_final is None or d_final.numel() == 0 else d_final


# ---- ssd_scan ------------------------------------------------------------------------------------
# inputs: x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_states,
#         cu_seqlens, return_final_states, impl

_SSD_FLOATS = (0, 1, 2, 3, 4, 6, 7, 8, 12)       # x, dt, A, B, C, D, z, dt_bias, initial_states


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, chunk, D, z, dt_bias, softplus, lo, hi, s0, cu, ret, _ = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, s0, cu)
    ctx.cfg = (chunk, softplus, (lo, hi), ret)


def _ssd_backward(ctx, dy, d_final):
    x, dt, A, B, C, D, z, dt_bias, s0, cu = ctx.saved_tensors
    chunk, softplus, limit, ret = ctx.cfg
    _host_bounds("ssd_scan", cu)
    dtype = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, s0)
    d_final = _final_grad(d_final) if ret else None

    def fn(x, dt, A, B, C, D, z, dt_bias, s0):
        return ref.ssd_chunked(x, dt, A, B, C, chunk_size=chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=softplus,
                               dt_limit=limit, initial_states=s0, cu_seqlens=cu, dtype=dtype)

    needs = [ctx.needs_input_grad[i] for i in _SSD_FLOATS]
    grads = _vjp(fn, [x, dt, A, B, C, D, z, dt_bias, s0], needs, [dy, d_final])
    out = [None] * 16
    for i, g in zip(_SSD_FLOATS, grads):
        out[i] = g
    return tuple(out)


# ---- causal_conv1d -------------------------------------------------------------------------------
# inputs: x, weight, bias, silu, initial_states, cu_seqlens, return_final_states, impl

_CONV_FLOATS = (0, 1, 2, 4)                     # x, weight, bias, initial_states


def _conv_setup(ctx, inputs, output):
    x, weight, bias, silu, s0, cu, ret, _ = inputs
    ctx.save_for_backward(x, weight, bias, s0, cu)
    ctx.cfg = (silu, ret)


def _conv_backward(ctx, dy, d_final):
    x, weight, bias, s0, cu = ctx.saved_tensors
    silu, ret = ctx.cfg
    _host_bounds("causal_conv1d", cu)
    dtype = _compute_dtype(x, weight, bias, s0)
    d_final = _final_grad(d_final) if ret else None

    def fn(x, weight, bias, s0):
        return ref.causal_conv1d_reference(x, weight, bias, activation="silu" if silu else None,
                                           initial_states=s0, cu_seqlens=cu, dtype=dtype)

    needs = [ctx.needs_input_grad[i] for i in _CONV_FLOATS]
    grads = _vjp(fn, [x, weight, bias, s0], needs, [dy, d_final])
    out = [None] * 8
    for i, g in zip(_CONV_FLOATS, grads):
        out[i] = g
    return tuple(out)


# ---- gated_rmsnorm -------------------------------------------------------------------------------
# inputs: x, z, weight, group_size, eps, impl

def _norm_setup(ctx, inputs, output):
    x, z, weight, group_size, eps, _ = inputs
    ctx.save_for_backward(x, z, weight)
    ctx.cfg = (group_size, eps)


def _norm_backward(ctx, dy):
    x, z, weight = ctx.saved_tensors
    group_size, eps = ctx.cfg
    dtype = _compute_dtype(x, z, weight)

    def fn(x, z, weight):
        return (ref.gated_rmsnorm_reference(x, z, weight, group_size=group_size, eps=eps, dtype=dtype),)

    gx, gz, gw = _vjp(fn, [x, z, weight], list(ctx.needs_input_grad[:3]), [dy])
    return gx, gz, gw, None, None, None


torch.library.register_autograd("nemotron::ssd_scan", _ssd_backward, setup_context=_ssd_setup)
torch.library.register_autograd("nemotron::causal_conv1d", _conv_backward, setup_context=_conv_setup)
torch.library.register_autograd("nemotron::gated_rmsnorm", _norm_backward, setup_context=_norm_setup)
