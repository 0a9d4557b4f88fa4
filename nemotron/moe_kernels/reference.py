"""LatentMoE references in plain torch: the definition of correct for routing, permutation and experts.

Semantics are those of HF transformers' ``NemotronHTopkRouter`` / ``NemotronHExperts`` (and of
Megatron-Core's ``topk_routing_with_score_function``, vLLM's ``grouped_topk``):

  route:   s = sigmoid(fp32 logits); selection on s + correction_bias (group-limited, DeepSeek-V3
           style: a group scores the sum of its top-2 biased scores, the top ``topk_group`` groups
           stay eligible); weights are the *un-biased* s of the chosen experts, renormalized by
           (sum + 1e-20) when asked, then times ``scaling_factor``.
  experts: out[t] = sum_j w[t, j] * down[e](relu(up[e] @ x[t])^2),  e = ids[t, j].

The weighted per-slot contributions ("slots", [T * k, H], slot ``t * k + j``) are the unit the
kernels and expert parallelism exchange: every implementation produces them in fp32 and combines a
token's k slots by one sum over the slot axis, so a layer split over ranks adds the same numbers in
the same order as the layer in one process.
"""
from __future__ import annotations

import torch

from ..nvfp4.format import NVFP4Tensor
from ..nvfp4.reference import dequantize_reference

ACTIVATIONS = ("relu2",)


def route_reference(logits: torch.Tensor, *, top_k: int, correction_bias: torch.Tensor | None = None,
                    n_group: int = 1, topk_group: int = 1, renormalize: bool = True,
                    scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], ids int32 [T, k]) from router logits [T, E]; ids ordered by biased score.

    A NaN logit means "never selected": its expert's score is 0 (sigmoid(-inf)) and its biased score
    -inf, so it ranks below every finite one and, if picked at all (fewer than k finite logits), has
    weight 0; the token's weights stay finite. A NaN biased score (a NaN bias) ranks last the same way.
    No error is raised: it would need a host sync mid-batch on CUDA.
    """
    t, e = logits.shape
    lg = logits.float()
    nan = torch.isnan(lg)
    scores = torch.where(nan, torch.zeros_like(lg), lg.sigmoid())
    choice = scores if correction_bias is None else scores + correction_bias.float()
    choice = torch.where(nan | torch.isnan(choice), torch.full_like(choice, float("-inf")), choice)
    if n_group > 1:
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)    # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices                                                     # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids.to(torch.int32)


def permute_reference(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots grouped by expert: (perm int32 [T*k], offs int32 [E]).

    ``perm[r]`` is the flat slot ``t * k + j`` of sorted row r (slots of one expert in increasing slot
    order); ``offs[e]`` is the end of expert e's rows, ``torch._grouped_mm``'s ``offs`` convention
    (expert e owns rows ``[offs[e-1], offs[e])``, expert 0 starts at 0). A stable sort and a
    scatter-add: no host sync on CUDA, so it is also the production path.
    """
    flat = ids.reshape(-1).long()
    perm = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return perm.to(torch.int32), counts.cumsum(0).to(torch.int32)


def expert_weight(w, e: int) -> torch.Tensor:
    """Expert e's matrix in fp32 from a float stack [E, N, K] or a stacked NVFP4Tensor (exact)."""
    if isinstance(w, NVFP4Tensor):
        gs = w.global_scale[e] if w.per_matrix_scale else w.global_scale
        return dequantize_reference(w.codes[e], w.block_scales[e], gs)
    return w[e].float()


def relu2(h: torch.Tensor) -> torch.Tensor:
    return torch.relu(h).square()


def expert_slots_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                           up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Weighted per-slot outputs, fp32 [T * k, H]: a loop over experts in fp64, rounded once.

    ``up`` [E, I, H] and ``down`` [E, H, I]: float tensors or stacked NVFP4Tensors (dequantized per
    touched expert, exactly). fp64 makes each row's value independent of how rows are batched.
    """
    t, k = ids.shape
    hdim = up.shape[2]
    x64 = x.double()
    slots = torch.zeros(t * k, hdim, dtype=torch.float64, device=x.device)
    flat_ids = ids.reshape(-1).long()
    flat_w = weights.reshape(-1).double()
    for e in torch.unique(flat_ids).tolist():
        rows = (flat_ids == e).nonzero().squeeze(1)                                              # slots of e
        h = relu2(x64[rows // k] @ expert_weight(up, e).double().T)                              # [R, I]
        slots[rows] = (h @ expert_weight(down, e).double().T) * flat_w[rows, None]
    return slots.float()


def combine_reference(slots: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_j slots[t * k + j] in fp32, in ``dtype``: the one combine every path uses."""
    return slots.view(-1, top_k, slots.shape[-1]).sum(1).to(dtype)


def experts_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``sum_j w[t, j] * down[e](relu2(up[e] @ x[t]))`` for x [T, H], returned in x's dtype."""
    return combine_reference(expert_slots_reference(x, weights, ids, up, down), ids.shape[1], x.dtype)


def experts_tolerance(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |kernel - reference| for the experts in ``want.dtype`` (x's dtype).

    The kernel sums exact fp32 products in another order (each GEMM: gamma_n * |a| @ |b|,
    gamma_n = n u / (1 - n u), u = 2^-24), rounds relu2(h) to x's dtype before the down projection
    (relative 2^-p, p = 8 for bf16, 11 for fp16, 24 for fp32) and rounds the result once more.
    The bound propagates those terms through |down| and |w| in fp64.
    """
    t, k = ids.shape
    u32 = 2.0 ** -24
    u_x = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: u32}[x.dtype]
    gam = lambda n: n * u32 / (1 - n * u32)  # noqa: E731
    n_up, n_dn = up.shape[2], up.shape[1]
    flat_ids, flat_w = ids.reshape(-1).long(), weights.reshape(-1).double().abs()
    ax = x.double().abs()
    bound = torch.zeros(t * k, up.shape[2], dtype=torch.float64, device=x.device)
    slot_abs = torch.zeros_like(bound)
    for e in torch.unique(flat_ids).tolist():
        rows = (flat_ids == e).nonzero().squeeze(1)
        w_up, w_dn = expert_weight(up, e).double(), expert_weight(down, e).double()
        a_up, a_dn = w_up.abs(), w_dn.abs()
        h = x.double()[rows // k] @ w_up.T
        h_abs = ax[rows // k] @ a_up.T                                                           # |x| @ |up|^T
        # relu2 of a perturbed h: |d(h^2)| <= (2|h| + dh) dh with dh the GEMM bound; then rounding
        dh = gam(n_up) * h_abs
        r2 = relu2(h)
        dr2 = (2 * h.abs() + dh) * dh + (r2 + (2 * h.abs() + dh) * dh) * u_x
        bound[rows] = ((a_dn @ dr2.T).T + gam(n_dn) * (relu2(h_abs) @ a_dn.T)) * flat_w[rows, None]
        slot_abs[rows] = (relu2(h_abs) @ a_dn.T) * flat_w[rows, None]
    # the fp32 combine of k slots (same order in both) and the two final roundings to x's dtype
    hdim = bound.shape[1]
    out_abs = (bound + slot_abs * 2 * u32).view(t, k, hdim).sum(1) + slot_abs.view(t, k, hdim).sum(1) * gam(k)
    return out_abs + want.double().abs() * u_x * 2


# ---- differentiable formulations: autograd through these defines the gradients ------------------

def route_weights_reference(logits: torch.Tensor, ids: torch.Tensor, *, renormalize: bool = True,
                            scaling_factor: float = 1.0) -> torch.Tensor:
    """The routing weights of the chosen experts ``ids [T, k]`` as a differentiable function of the
    logits ``[T, E]``, in fp32 (fp64 for fp64 logits): :func:`route_reference`'s weights for those
    ids (bit for bit in fp32). A NaN logit scores 0 and gets gradient 0: it is masked before the
    sigmoid, so no NaN reaches the backward."""
    lg = logits if logits.dtype == torch.float64 else logits.float()
    nan = torch.isnan(lg)
    zero = torch.zeros_like(lg)
    scores = torch.where(nan, zero, torch.where(nan, zero, lg).sigmoid())
    weights = scores.gather(1, ids.long())
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor


def expert_slots_grad_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                                up, down) -> torch.Tensor:
    """:func:`expert_slots_reference` as differentiable fp64 torch (no final rounding): autograd
    through it defines the gradients of the experts with respect to x, the weights and float stacks
    (NVFP4 stacks enter as constants)."""
    t, k = ids.shape
    flat_ids = ids.reshape(-1).long()
    flat_w = weights.reshape(-1).double()
    slots = torch.zeros(t * k, up.shape[2], dtype=torch.float64, device=x.device)
    for e in torch.unique(flat_ids).tolist():
        rows = (flat_ids == e).nonzero().squeeze(1)
        w_up = up[e].double() if isinstance(up, torch.Tensor) else expert_weight(up, e).double()
        w_dn = down[e].double() if isinstance(down, torch.Tensor) else expert_weight(down, e).double()
        h = relu2(x[rows // k].double() @ w_up.T)
        slots = slots.index_add(0, rows, (h @ w_dn.T) * flat_w[rows, None])
    return slots
