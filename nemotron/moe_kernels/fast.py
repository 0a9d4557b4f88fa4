"""The routed experts in fast plain torch (dispatch's ``torch`` implementation) and their backward.

Forward: the ``T * k`` slots are sorted by expert (stable, so an expert's rows keep slot order);
each touched expert multiplies its rows with one fp32 matmul per projection (relu2 between), NVFP4
and bf16/fp16 stacks converted to fp32 per touched expert only; the weighted rows go back to slot
order. fp64 inputs compute in fp64 (what gradient checks need); everything else in fp32.

Rows and batching: a BLAS GEMM's value for one row depends on the row count it was called with
(small counts take other kernels) and on operand alignment (MKL: modulo 16 bytes). Each expert's
matmul therefore gets exactly the rows routed to it and operands at 64-byte aligned addresses
(fresh tensors, or slices of one at multiples of 64 bytes), so a slot's value depends only on the
set of rows its expert multiplies. Expert parallelism keeps that set (one call per source rank)
and so stays bit-equal to the single-process layer; tests/moe_kernels/test_fast.py checks it.
The decode step (T = 1) skips the sort: its k slots are k experts with one row each.

Backward (:func:`expert_slots_backward`, :func:`route_backward`): the same grouping, recomputing
the forward's intermediates, in fp32 (fp64 for fp64 inputs) whichever implementation ran forward;
under AOTAutograd tracing (fake tensors) a static-shape formulation, so compiled training works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from ..nvfp4.format import NVFP4Tensor
from ..nvfp4.reference import BLOCK, E2M1_VALUES

_PAIRS: dict = {}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: the precision of the slots and of every backward."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _byte_table(device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: the two E2M1 values of each code byte (element 0 in the low nibble)."""
    key = str(device)
    if key not in _PAIRS:
        v = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        b = torch.arange(256)
        _PAIRS[key] = torch.stack([v[b & 0xF], v[b >> 4]], dim=1).to(device)
    return _PAIRS[key]


def dequantize_expert(w: NVFP4Tensor, e: int) -> torch.Tensor:
    """Expert e of a stacked NVFP4Tensor as fp32 ``[N, K]``: ``e2m1 * (fp32(block_scale) * global_scale)``,
    bit-equal to :func:`nemotron.nvfp4.reference.dequantize_reference` (one byte-table lookup)."""
    codes = w.codes[e]
    n, half = codes.shape
    v = _byte_table(codes.device).index_select(0, codes.reshape(-1).int())           # [N * K/2, 2]
    gs = w.global_scale[e] if w.per_matrix_scale else w.global_scale
    s = w.block_scales[e].float() * gs.float().reshape(())                          # [N, K/16]
    return (v.view(n, half * 2 // BLOCK, BLOCK) * s[..., None]).view(n, half * 2)


def expert_matrix(w, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's matrix in ``dtype`` from a float stack [E, N, K] or a stacked NVFP4Tensor, at an
    allocator-aligned address (see the module note on rows and batching)."""
    if isinstance(w, NVFP4Tensor):
        return dequantize_expert(w, e).to(dtype)
    m = w[e]
    if m.dtype != dtype:
        return m.to(dtype)
    return _aligned(m)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _groups(ids: torch.Tensor, num_experts: int):
    """Slots sorted by expert: (order int64 [T*k], [(expert, start, end), ...] for touched experts)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    spans, start = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, start, start + n))
            start += n
    return order, spans


def _expert_rows(xe: torch.Tensor, up, down, e: int, dtype: torch.dtype) -> torch.Tensor:
    """``down[e](relu2(up[e] @ xe))`` for the rows ``xe [n, H]`` routed to expert e: two matmuls."""
    h = F.linear(xe, expert_matrix(up, e, dtype))                                        # [n, I]
    return F.linear(torch.relu_(h).square_(), expert_matrix(down, e, dtype))             # [n, H]


def _whole(w, dtype: torch.dtype) -> bool:
    return isinstance(w, torch.Tensor) and w.dtype == dtype and w.data_ptr() % 64 == 0


def _stack(w, counts: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype):
    """``(stack [G, N, K] in dtype, offs int32 [G])`` for ``torch._grouped_mm``: an fp32 float stack as
    it is with ``offs`` (every expert; an empty group costs little), else the touched experts
    converted or dequantized into a fresh stack."""
    if _whole(w, dtype):
        return w, offs
    touched = counts.nonzero().squeeze(1)
    if isinstance(w, NVFP4Tensor):
        codes = w.codes.index_select(0, touched)                                         # [U, N, K/2]
        u, n, half = codes.shape
        gs = w.global_scale.index_select(0, touched) if w.per_matrix_scale else w.global_scale.expand(u)
        s = w.block_scales.index_select(0, touched).float() * gs.float()[:, None, None]  # [U, N, K/16]
        v = _byte_table(codes.device).index_select(0, codes.reshape(-1).int())
        m = (v.view(u, n, half * 2 // BLOCK, BLOCK) * s[..., None]).view(u, n, half * 2).to(dtype)
    else:
        m = w.index_select(0, touched).to(dtype)
    return m, counts.index_select(0, touched).cumsum(0, dtype=torch.int32)


def _grouped(x: torch.Tensor, up, cdt: torch.dtype) -> bool:
    """Whether one ``torch._grouped_mm`` per projection may run: CPU fp32 (its fallback is one
    ``mm`` per group, the per-expert matmul) with every group's rows starting 64-byte aligned."""
    return x.device.type == "cpu" and cdt == torch.float32 and x.shape[1] % 16 == 0 and up.shape[1] % 16 == 0


def expert_slots(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up, down) -> torch.Tensor:
    """Weighted per-slot outputs ``[T * k, H]`` in fp32 (fp64 for fp64 x), slot ``t * k + j`` =
    ``weights[t, j] * down[e](relu2(up[e] @ x[t]))``, e = ids[t, j]: the reference's definition, one
    matmul per touched expert and projection. ``up`` [E, I, H], ``down`` [E, H, I]: float stacks or
    stacked NVFP4Tensors."""
    t, k = ids.shape
    cdt = compute_dtype(x)
    if ids.numel() == 0:
        return torch.zeros(0, x.shape[1], dtype=cdt, device=x.device)
    xc = x if x.dtype == cdt else x.to(cdt)
    flat = ids.reshape(-1)
    if t == 1:
        # decode: the k slots are k distinct experts, each multiplying the one row (no sort needed)
        xc = _aligned(xc)
        rows = torch.cat([_expert_rows(xc, up, down, e, cdt) for e in flat.tolist()])
        return rows.mul_(weights.reshape(k, 1).to(cdt))
    if _grouped(x, up, cdt):
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=up.shape[0])
        offs = counts.cumsum(0, dtype=torch.int32)
        xs = xc.index_select(0, order // k if k > 1 else order)                         # [T*k, H] by expert
        wu, offs_u = _stack(up, counts, offs, cdt)
        wd, offs_d = _stack(down, counts, offs, cdt)
        h = torch._grouped_mm(xs, wu.transpose(1, 2), offs=offs_u)                       # [T*k, I]
        rows = torch._grouped_mm(torch.relu_(h).square_(), wd.transpose(1, 2), offs=offs_d)
    else:
        order, spans = _groups(ids, up.shape[0])
        tokens = order // k if k > 1 else order
        # each expert's rows gathered into a fresh tensor (aligned), in slot order
        rows = torch.cat([_expert_rows(xc.index_select(0, tokens[a:b]), up, down, e, cdt) for e, a, b in spans])
    w_sorted = weights.reshape(-1).index_select(0, order)
    rows.mul_((w_sorted if w_sorted.dtype == cdt else w_sorted.to(cdt)).unsqueeze(1))
    return torch.empty_like(rows).index_copy_(0, order, rows)


def route(logits: torch.Tensor, top_k: int, correction_bias, n_group: int, topk_group: int, renormalize: bool,
          scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.reference.route_reference`'s ``(weights fp32, ids int32)`` bit for bit, in fewer ops:
    one sigmoid whose NaNs (NaN logits) become score 0 and, with the bias added, biased score -inf
    (as does a NaN bias), by ``nan_to_num`` instead of masks."""
    t, e = logits.shape
    s = logits.float().sigmoid()
    scores = s.nan_to_num(nan=0.0)                          # sigmoid is finite elsewhere
    choice = s if correction_bias is None else s + correction_bias.float()
    inf = float("inf")
    choice = choice.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)
    if n_group > 1:
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)    # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), -inf)
    ids = choice.topk(top_k, dim=-1).indices                                                     # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids.to(torch.int32)


def expert_slots_backward(grad: torch.Tensor, per_token: bool, x: torch.Tensor, weights: torch.Tensor,
                          ids: torch.Tensor, up, down, needs: tuple) -> tuple:
    """Gradients of :func:`expert_slots` with respect to ``(x, weights, up, down)``.

    ``grad``: the gradient of the slots ``[T * k, H]``, or with ``per_token`` the gradient ``[T, H]``
    of their combine (every slot of token t receives ``grad[t]``). ``needs``: which of the four to
    form (None for the others, and for NVFP4 stacks, which are not differentiable). Each is
    returned in its input's dtype, computed in fp32 (fp64 for fp64 x).

    Eagerly: a loop over the touched experts (their row counts read on the host). Traced (fake
    tensors: AOTAutograd differentiating a compiled graph): the same math in static shapes, one
    matmul per slot on gathered expert matrices (``T * k * I * H`` elements: small models).
    """
    t, k = ids.shape
    cdt = compute_dtype(x)
    need_x, need_w, need_up, need_down = needs
    need_up = need_up and not isinstance(up, NVFP4Tensor)
    need_down = need_down and not isinstance(down, NVFP4Tensor)
    dx = dw = dup = ddown = None
    if ids.numel() == 0 or detect_fake_mode((x, ids)) is not None:
        dx, dw, dup, ddown = _backward_static(grad, per_token, x, weights, ids, up, down, cdt,
                                              (need_x, need_w, need_up, need_down))
    else:
        dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_x else None
        dw = torch.zeros(t * k, dtype=cdt, device=x.device) if need_w else None
        dup = torch.zeros(up.shape, dtype=cdt, device=x.device) if need_up else None
        ddown = torch.zeros(down.shape, dtype=cdt, device=x.device) if need_down else None
        order, spans = _groups(ids, up.shape[0])
        tokens = order // k if k > 1 else order
        xc = x if x.dtype == cdt else x.to(cdt)
        g_src = grad if grad.dtype == cdt else grad.to(cdt)
        g_rows = tokens if per_token else order
        w_sorted = weights.reshape(-1)[order].to(cdt)
        for e, a, b in spans:
            xe = xc.index_select(0, tokens[a:b])                                         # [n, H]
            ge = g_src.index_select(0, g_rows[a:b])                                      # [n, H]
            wu, wd = expert_matrix(up, e, cdt), expert_matrix(down, e, cdt)             # [I, H], [H, I]
            r = torch.relu(torch.mm(xe, wu.t()))                                         # [n, I]
            z = r * r
            if need_w:
                dw[order[a:b]] = (ge * torch.mm(z, wd.t())).sum(-1)
            dy = ge * w_sorted[a:b, None]                                                # [n, H]
            if need_down:
                ddown[e] = torch.mm(dy.t(), z)
            if need_x or need_up:
                da = torch.mm(dy, wd).mul_(2 * r)                                        # d relu(a)^2 = 2 relu(a)
                if need_up:
                    dup[e] = torch.mm(da.t(), xe)
                if need_x:
                    dx.index_add_(0, tokens[a:b], torch.mm(da, wu))
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return (cast(dx, x), None if dw is None else dw.view(t, k).to(weights.dtype),
            cast(dup, up) if need_up else None, cast(ddown, down) if need_down else None)


def _full_stack(w, dtype: torch.dtype) -> torch.Tensor:
    """Every expert's matrix in ``dtype`` [E, N, K] (NVFP4: dequantized)."""
    if isinstance(w, NVFP4Tensor):
        e, n, half = w.codes.shape
        gs = w.global_scale if w.per_matrix_scale else w.global_scale.expand(e)
        s = w.block_scales.float() * gs.float()[:, None, None]
        v = _byte_table(w.codes.device).index_select(0, w.codes.reshape(-1).int())
        return (v.view(e, n, half * 2 // BLOCK, BLOCK) * s[..., None]).view(e, n, half * 2).to(dtype)
    return w.to(dtype)


def _backward_static(grad, per_token, x, weights, ids, up, down, cdt, needs):
    """:func:`expert_slots_backward` without data-dependent shapes (traceable): one matmul per slot
    on its gathered expert matrices. (``torch._grouped_mm`` would keep this O(T k (I + H)), but it
    traces for bf16 only; the gather holds T k I H elements, right for the small models compiled.)"""
    t, k = ids.shape
    need_x, need_w, need_up, need_down = needs
    flat = ids.reshape(-1).long()                                                        # [R] slots
    tokens = torch.arange(t * k, device=x.device) // k
    xs = x.to(cdt).index_select(0, tokens)                                               # [R, H]
    gs = grad.to(cdt).index_select(0, tokens) if per_token else grad.to(cdt)            # [R, H]
    wu, wd = _full_stack(up, cdt), _full_stack(down, cdt)                                # [E, I, H], [E, H, I]
    mm = lambda a, b: torch.bmm(a[:, None, :], b.index_select(0, flat)).squeeze(1)  # noqa: E731
    wgrad = lambda a, b: torch.zeros(up.shape[0], a.shape[1], b.shape[1], dtype=cdt,  # noqa: E731
                                     device=x.device).index_add_(0, flat, a[:, :, None] * b[:, None, :])
    r = torch.relu(mm(xs, wu.transpose(1, 2)))                                           # [R, I]
    z = r * r
    dy = gs * weights.reshape(-1).to(cdt)[:, None]
    da = mm(dy, wd) * (2 * r)
    dw = (gs * mm(z, wd.transpose(1, 2))).sum(-1) if need_w else None
    ddown = wgrad(dy, z) if need_down else None
    dup = wgrad(da, xs) if need_up else None
    dx = torch.zeros(x.shape, dtype=cdt, device=x.device).index_add_(0, tokens, mm(da, wu)) if need_x else None
    return dx, dw, dup, ddown


def route_backward(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, renormalize: bool,
                   scaling_factor: float) -> torch.Tensor:
    """Gradient ``[T, E]`` of the routing weights with respect to the logits, in the logits' dtype.

    ``w = c * s[ids] / (sum s[ids] + 1e-20)`` (or ``c * s[ids]``) with ``s = sigmoid(logits)``: the
    un-biased scores, so the correction bias and the selection get no gradient; NaN logits (score 0)
    get 0. Computed in fp32 (fp64 for fp64 logits).
    """
    cdt = compute_dtype(logits)
    lg = logits.to(cdt)
    nan = torch.isnan(lg)
    s = torch.where(nan, torch.zeros_like(lg), torch.where(nan, torch.zeros_like(lg), lg).sigmoid())
    idx = ids.long()
    sel = s.gather(1, idx)                                                               # [T, k]
    g = grad_weights.to(cdt) * scaling_factor
    if renormalize:
        den = sel.sum(-1, keepdim=True) + 1e-20
        g = g / den - (g * sel).sum(-1, keepdim=True) / (den * den)
    out = torch.zeros_like(lg).scatter_add_(1, idx, g * sel * (1 - sel))                 # sigmoid' = s (1 - s)
    return out.to(logits.dtype)


def combine_backward(grad: torch.Tensor, top_k: int, slots_dtype: torch.dtype) -> torch.Tensor:
    """Gradient ``[T * k, H]`` of the slots from that of their combine ``[T, H]``."""
    return grad.to(slots_dtype)[:, None, :].expand(grad.shape[0], top_k, grad.shape[1]).reshape(-1, grad.shape[1])

