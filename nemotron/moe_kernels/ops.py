"""MoE ops: validation at the public boundary, ``torch.library`` registrations, dispatch.

Each op picks its implementation through :mod:`nemotron.dispatch`: the Triton grouped GEMM for CUDA
tensors, the fp32 grouped matmuls of :mod:`.fast` on CPU, the fp64 reference when asked; routing,
permutation and the combine are torch ops (their own references). A trailing ``impl`` argument
names the implementation outright (the ``nemotron`` backend's lowering writes it). float64 inputs
compute and return float64 (routing weights, slots) on the torch path whatever was chosen: the
precision gradient checks need. The backward of every op is registered in :mod:`.autograd`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ..dispatch import FLOAT_DTYPES as _FLOATS
from ..nvfp4.format import NVFP4Tensor
from . import fast
from . import reference as ref
from .triton import grouped_gemm as kernels

_MOE_FLOATS = (*_FLOATS, torch.float64)       # fp64: gradient checks (computed in fp64 throughout)


# ---- torch.library ops -------------------------------------------------------------------------

@torch.library.custom_op("nemotron::moe_route", mutates_args=())
def _route_op(logits: torch.Tensor, top_k: int, correction_bias: Optional[torch.Tensor], n_group: int,
              topk_group: int, renormalize: bool, scaling_factor: float,
              impl: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    name = dispatch.choose("moe_route", logits, impl).name
    return _route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor, name)


def _route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor, impl: str = "reference"):
    # sigmoid + top-k over [T, E] is a few memory-bound torch ops; no kernel of ours beats them. The
    # torch path is the reference's formulation in fewer ops (bit-equal), what decode overhead wants
    if impl == "reference":
        weights, ids = ref.route_reference(logits, top_k=top_k, correction_bias=correction_bias, n_group=n_group,
                                           topk_group=topk_group, renormalize=renormalize,
                                           scaling_factor=scaling_factor)
    else:
        weights, ids = fast.route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor)
    if logits.dtype == torch.float64:     # selection on the fp32 scores as always; the weights in fp64
        weights = ref.route_weights_reference(logits, ids, renormalize=renormalize, scaling_factor=scaling_factor)
    return weights, ids


@_route_op.register_fake
def _(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor, impl=""):
    t = logits.shape[0]
    return (logits.new_empty(t, top_k, dtype=fast.compute_dtype(logits)),
            logits.new_empty(t, top_k, dtype=torch.int32))


def _weights(w: torch.Tensor, scales: Optional[torch.Tensor], gs: Optional[torch.Tensor]):
    """The op-level weight triple back to what the reference / kernels take."""
    if scales is None:
        return w, (None, w)
    return (NVFP4Tensor(w, scales.view(torch.float8_e4m3fn), gs), (w, scales, gs))


@torch.library.custom_op("nemotron::moe_permute", mutates_args=())
def _permute_op(ids: torch.Tensor, num_experts: int, impl: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    dispatch.choose("moe_permute", ids, impl)
    # a stable sort and a scatter-add: torch does these well, sync-free on CUDA
    return ref.permute_reference(ids, num_experts)


@_permute_op.register_fake
def _(ids, num_experts, impl=""):
    return ids.new_empty(ids.numel(), dtype=torch.int32), ids.new_empty(num_experts, dtype=torch.int32)


@torch.library.custom_op("nemotron::moe_combine", mutates_args=())
def _combine_op(slots: torch.Tensor, top_k: int, dtype: torch.dtype, impl: str = "") -> torch.Tensor:
    dispatch.choose("moe_combine", slots, impl)
    return ref.combine_reference(slots, top_k, dtype)


@_combine_op.register_fake
def _(slots, top_k, dtype, impl=""):
    return slots.new_empty(slots.shape[0] // top_k, slots.shape[1], dtype=dtype)


@torch.library.custom_op("nemotron::moe_expert_slots", mutates_args=())
def _slots_op(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
              up_scales: Optional[torch.Tensor], up_gs: Optional[torch.Tensor], down: torch.Tensor,
              down_scales: Optional[torch.Tensor], down_gs: Optional[torch.Tensor], impl: str = "") -> torch.Tensor:
    return _slots(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs,
                  dispatch.choose("moe_expert_slots", x, impl).name)


def _slots(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, impl: str) -> torch.Tensor:
    up_ref, up_k = _weights(up, up_scales, up_gs)
    down_ref, down_k = _weights(down, down_scales, down_gs)
    if impl == "torch" or x.dtype == torch.float64:
        return fast.expert_slots(x, weights, ids, up_ref, down_ref)
    if impl == "reference":
        return ref.expert_slots_reference(x, weights, ids, up_ref, down_ref)
    perm, offs = ref.permute_reference(ids, up.shape[0])
    return kernels.expert_slots(x, weights, perm, offs, ids.shape[1], up_k, down_k)


@_slots_op.register_fake
def _(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, impl=""):
    return x.new_empty(ids.numel(), x.shape[1], dtype=fast.compute_dtype(x))


@torch.library.custom_op("nemotron::moe_experts", mutates_args=())
def _experts_op(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
                up_scales: Optional[torch.Tensor], up_gs: Optional[torch.Tensor], down: torch.Tensor,
                down_scales: Optional[torch.Tensor], down_gs: Optional[torch.Tensor], impl: str = "") -> torch.Tensor:
    return _experts(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs,
                    dispatch.choose("moe_experts", x, impl).name)


def _experts(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, impl: str) -> torch.Tensor:
    slots = _slots(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, impl)
    return ref.combine_reference(slots, ids.shape[1], x.dtype)


@_experts_op.register_fake
def _(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, impl=""):
    return torch.empty_like(x)


@torch.library.custom_op("nemotron::moe_routed_experts", mutates_args=())
def _routed_experts_op(x: torch.Tensor, logits: torch.Tensor, correction_bias: Optional[torch.Tensor], top_k: int,
                       n_group: int, topk_group: int, renormalize: bool, scaling_factor: float, up: torch.Tensor,
                       up_scales: Optional[torch.Tensor], up_gs: Optional[torch.Tensor], down: torch.Tensor,
                       down_scales: Optional[torch.Tensor], down_gs: Optional[torch.Tensor],
                       impl: str = "") -> torch.Tensor:
    """route -> permute -> grouped GEMM -> combine as one op: what the ``nemotron`` backend's MoE
    fusion substitutes for ``moe_route`` feeding ``moe_experts`` (routing never leaves the op)."""
    name = dispatch.choose("moe_routed_experts", x, impl).name
    weights, ids = _route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor, name)
    return _experts(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, name)


@_routed_experts_op.register_fake
def _(x, logits, correction_bias, top_k, n_group, topk_group, renormalize, scaling_factor, up, up_scales, up_gs,
      down, down_scales, down_gs, impl=""):
    return torch.empty_like(x)


# ---- public API --------------------------------------------------------------------------------

def _tensor(name: str, t, *, dim: int, dtypes=_MOE_FLOATS, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def route(logits: torch.Tensor, *, top_k: int, correction_bias: Optional[torch.Tensor] = None,
          n_group: int = 1, topk_group: int = 1, renormalize: bool = True,
          scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k routing with a selection bias (HF ``NemotronHTopkRouter`` semantics).

    Args:
        logits: router logits ``[T, E]`` (any float dtype; all math in fp32, the weights in fp64
            for fp64 logits).
        top_k: experts per token, 1 <= top_k <= E.
        correction_bias: ``[E]`` added to the sigmoid scores for *selection only*
            (``e_score_correction_bias``); the weights come from the un-biased scores.
        n_group, topk_group: group-limited selection (DeepSeek-V3): the E experts form ``n_group``
            groups, each scored by the sum of its top-2 biased scores; only experts of the best
            ``topk_group`` groups are eligible. ``n_group=1`` disables it.
        renormalize: divide the k weights by their sum (+ 1e-20).
        scaling_factor: multiply the weights (``routed_scaling_factor``, 5.0 in Super).

    Returns ``(weights fp32 [T, k], ids int32 [T, k])``, ids in decreasing biased-score order.
    Differentiable: the weights with respect to the logits (through the sigmoid, the gather, the
    renormalization and the scale); ids and the correction bias get no gradient.
    A NaN logit (or a NaN bias entry) makes that expert never selected for that token (its score
    ranks last; if it must fill a slot its weight is 0), so a token's weights stay finite; nothing
    raises (on CUDA a check would cost a host sync). ``scaling_factor`` must be finite, ``top_k``,
    ``n_group`` and ``topk_group`` ints (not bools), ``renormalize`` a bool.

    Example::

        >>> w, ids = nemotron.moe_kernels.route(torch.randn(4, 512), top_k=22, scaling_factor=5.0)
    """
    args = _check_route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor)
    return _route_op(logits, *args)


def _check_route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor) -> tuple:
    """The routing arguments checked and normalized, in the op's order (top_k, bias, n_group, ...)."""
    _tensor("logits", logits, dim=2)
    t, e = logits.shape
    top_k = dispatch.check_int("top_k", top_k, lo=1, hi=e)
    n_group = dispatch.check_int("n_group", n_group, lo=1)
    topk_group = dispatch.check_int("topk_group", topk_group, lo=1)
    renormalize = dispatch.check_bool("renormalize", renormalize)
    scaling_factor = dispatch.check_float("scaling_factor", scaling_factor)
    if correction_bias is not None:
        _tensor("correction_bias", correction_bias, dim=1, device=logits.device)
        if correction_bias.shape[0] != e:
            raise ValueError(f"correction_bias: expected shape [{e}], got {tuple(correction_bias.shape)}")
    if e % n_group:
        raise ValueError(f"n_group: expected a positive divisor of E = {e}, got {n_group!r}")
    if n_group > 1 and e // n_group < 2:
        raise ValueError(f"n_group: groups are scored by their top-2 experts, so E / n_group must be >= 2, got "
                         f"{e} / {n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected an int in [1, n_group = {n_group}], got {topk_group!r}")
    if top_k > topk_group * (e // n_group):
        raise ValueError(f"top_k: {top_k} exceeds the {topk_group * (e // n_group)} experts eligible in "
                         f"topk_group = {topk_group} groups of {e // n_group}")
    return top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor


def _check_weight(name: str, w, e_dim: Optional[int], n: Optional[int], k: Optional[int], device):
    """Validate a stacked expert weight [E, N, K]; returns (E, N, K) and the op-level triple."""
    if isinstance(w, NVFP4Tensor):
        if w.codes.dim() != 3:
            raise ValueError(f"{name}: expected a stacked NVFP4Tensor [E, N, K], got shape {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"{name}: expected it on {device}, got {w.device}")
        gs = w.global_scale if w.per_matrix_scale else w.global_scale.expand(w.shape[0])
        triple = (w.codes.contiguous(), w.block_scales.contiguous().view(torch.uint8), gs.contiguous())
    else:
        _tensor(name, w, dim=3, device=device)
        triple = (w.contiguous(), None, None)
    shape = tuple(w.shape)
    for got, want, what in zip(shape, (e_dim, n, k), ("E", "N", "K")):
        if want is not None and got != want:
            raise ValueError(f"{name}: expected shape [E, N, K] with {what} = {want}, got {shape}")
    return shape, triple


def _check_stacks(x, up, down, activation):
    """x [T, H] and the two stacks; returns E and the op-level weight triples."""
    _tensor("x", x, dim=2)
    if x.stride(-1) != 1:
        raise ValueError(f"x: the last dim must be contiguous, got strides {x.stride()}")
    if activation not in ref.ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ref.ACTIVATIONS}, got {activation!r}")
    (e, inter, hdim), up_t = _check_weight("up", up, None, None, x.shape[1], x.device)
    _, down_t = _check_weight("down", down, e, hdim, inter, x.device)
    if isinstance(up, NVFP4Tensor) != isinstance(down, NVFP4Tensor):
        raise TypeError("up, down: expected both NVFP4Tensors or both float tensors")
    return e, up_t, down_t


def _check_experts(x, weights, ids, up, down, activation):
    e, up_t, down_t = _check_stacks(x, up, down, activation)
    _tensor("weights", weights, dim=2, device=x.device)
    _tensor("ids", ids, dim=2, dtypes=(torch.int32, torch.int64), device=x.device)
    if weights.shape != ids.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"weights, ids: expected both of shape [T, k] with T = x.shape[0] = {x.shape[0]}, got "
                         f"{tuple(weights.shape)} and {tuple(ids.shape)}")
    # on CUDA (and while compiling) this check would cost a host sync; those callers own ids
    if ids.numel() and not ids.is_cuda and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= e:
            raise ValueError(f"ids: expected expert ids in [0, {e}), got values in [{lo}, {hi}]")
    return up_t, down_t


def experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up, down, *,
            activation: str = "relu2") -> torch.Tensor:
    """Routed experts: ``out[t] = sum_j weights[t, j] * down[e](relu2(up[e] @ x[t]))``, e = ids[t, j].

    Args:
        x: ``[T, H]`` bf16 / fp16 / fp32 (H is the latent width in a LatentMoE), last dim contiguous.
        weights: ``[T, k]`` routing weights (fp32 from :func:`route`).
        ids: ``[T, k]`` int32/int64 expert ids in ``[0, E)``.
        up: ``[E, I, H]`` float tensor, or a stacked :class:`~nemotron.nvfp4.NVFP4Tensor` of logical
            shape ``[E, I, H]`` whose ``global_scale`` is ``[E]`` (one ModelOpt ``weight_scale_2`` per
            expert; a 0-dim scale is shared); see :func:`quantize_experts`.
        down: ``[E, H, I]``, the same kind as ``up``.
        activation: ``"relu2"`` (relu(h)^2, non-gated, Nemotron-H).

    Returns ``[T, H]`` in x's dtype. The weighted slot outputs are formed in fp32 and each token's k
    slots summed in fp32 (deterministic, no atomics); fp64 x: fp64 throughout. On CUDA a Triton
    grouped GEMM (NVFP4 weights expanded in registers, only touched experts read); on CPU one fp32
    matmul per touched expert and projection (:mod:`nemotron.moe_kernels.fast`).

    Differentiable with respect to x, the weights and float ``up`` / ``down`` stacks (NVFP4 stacks
    are not); the backward runs in plain torch, fp32 (fp64 for fp64 x).

    Example::

        >>> w, ids = nemotron.moe_kernels.route(logits, top_k=2)
        >>> y = nemotron.moe_kernels.experts(x, w, ids, up, down)
    """
    up_t, down_t = _check_experts(x, weights, ids, up, down, activation)
    return _experts_op(x, weights, ids, *up_t, *down_t)


def expert_slots(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up, down, *,
                 activation: str = "relu2") -> torch.Tensor:
    """The weighted per-slot outputs of :func:`experts`, fp32 ``[T * k, H]`` (slot ``t * k + j``; fp64
    for fp64 x), before the combine; ``combine(expert_slots(...), k, x.dtype) == experts(...)``.
    Expert parallelism exchanges these rows. Differentiable as :func:`experts` is."""
    up_t, down_t = _check_experts(x, weights, ids, up, down, activation)
    return _slots_op(x, weights, ids, *up_t, *down_t)


def routed_experts(x: torch.Tensor, logits: torch.Tensor, up, down, *, top_k: int,
                   correction_bias: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
                   renormalize: bool = True, scaling_factor: float = 1.0, activation: str = "relu2") -> torch.Tensor:
    """:func:`route` then :func:`experts` as one op (``nemotron::moe_routed_experts``, what the
    ``nemotron`` backend's MoE fusion makes of the pair): ``x [T, H]``, router ``logits [T, E]``,
    the stacks and routing arguments as there; returns ``[T, H]`` in x's dtype, equal to the pair.
    Differentiable with respect to x, the logits and float stacks.

    Example::

        >>> y = nemotron.moe_kernels.routed_experts(x, logits, up, down, top_k=22, scaling_factor=5.0)
    """
    e, up_t, down_t = _check_stacks(x, up, down, activation)
    top_k, bias, n_group, topk_group, renormalize, scaling_factor = _check_route(
        logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor)
    if logits.shape != (x.shape[0], e) or logits.device != x.device:
        raise ValueError(f"logits: expected [T, E] = [{x.shape[0]}, {e}] on {x.device}, got {tuple(logits.shape)} "
                         f"on {logits.device}")
    return _routed_experts_op(x, logits, bias, top_k, n_group, topk_group, renormalize, scaling_factor, *up_t, *down_t)


def combine(slots: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's ``top_k`` consecutive fp32 (or fp64) slot rows ``[T * k, H]`` -> ``[T, H]`` in
    ``dtype``. Differentiable with respect to the slots."""
    _tensor("slots", slots, dim=2, dtypes=(torch.float32, torch.float64))
    top_k = dispatch.check_int("top_k", top_k, lo=1)
    if slots.shape[0] % top_k:
        raise ValueError(f"top_k: expected a positive divisor of slots.shape[0] = {slots.shape[0]}, got {top_k!r}")
    if dtype not in _MOE_FLOATS:
        raise TypeError(f"dtype: expected one of {[str(d) for d in _MOE_FLOATS]}, got {dtype}")
    return _combine_op(slots, top_k, dtype)


def permute(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the ``T * k`` slots by expert: ``(perm int32 [T * k], offs int32 [E])``; ``offs`` holds the
    cumulative ends (``torch._grouped_mm``'s convention), no padding. No host sync on CUDA."""
    _tensor("ids", ids, dim=2, dtypes=(torch.int32, torch.int64))
    num_experts = dispatch.check_int("num_experts", num_experts, lo=1)
    return _permute_op(ids, num_experts)


def quantize_experts(w: torch.Tensor, *, block_shape=(1, 16)) -> NVFP4Tensor:
    """Quantize stacked expert weights ``[E, N, K]`` to NVFP4 (1x16 blocks, or 16x16 tiles), each
    expert with its own global scale (as ModelOpt does per expert module): a stacked NVFP4Tensor with
    ``global_scale [E]``."""
    from ..nvfp4.ops import quantize
    _tensor("w", w, dim=3, dtypes=_FLOATS)
    if w.shape[0] == 0:
        raise ValueError("w: expected at least one expert")
    parts = [quantize(w[e], block_shape=block_shape) for e in range(w.shape[0])]
    return NVFP4Tensor(torch.stack([p.codes for p in parts]), torch.stack([p.block_scales for p in parts]),
                       torch.stack([p.global_scale for p in parts]), tuple(block_shape))
