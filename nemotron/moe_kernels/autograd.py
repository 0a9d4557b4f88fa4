"""Backward of the MoE ops (``torch.library.register_autograd``), so a LatentMoE layer trains.

Differentiable inputs, per op:
  moe_route           logits (the weights output; ids and the correction bias get no gradient)
  moe_combine         slots
  moe_expert_slots    x, weights, float up / down stacks (NVFP4 codes, scales: none)
  moe_experts         the same
  moe_routed_experts  x, logits, float up / down stacks

Each backward recomputes what it needs from the op's inputs in plain torch (:mod:`.fast`), fp32
(fp64 for fp64 inputs), so it does not depend on which implementation ran the forward. Importing
the package registers them.
"""
from __future__ import annotations

import torch

from . import fast, ops


def _flags(ctx, *index: int) -> tuple:
    return tuple(bool(ctx.needs_input_grad[i]) for i in index)


# ---- moe_route(logits, top_k, correction_bias, n_group, topk_group, renormalize, scaling_factor, impl)

def _route_setup(ctx, inputs, output):
    logits, _, _, _, _, renormalize, scaling_factor, _ = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize, ctx.scaling_factor = renormalize, scaling_factor


def _route_backward(ctx, grad_weights, grad_ids):
    logits, ids = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_weights is not None:
        grad = fast.route_backward(grad_weights, logits, ids, ctx.renormalize, ctx.scaling_factor)
    return grad, None, None, None, None, None, None, None


# ---- moe_combine(slots, top_k, dtype, impl) -----------------------------------------------------

def _combine_setup(ctx, inputs, output):
    slots, top_k, _, _ = inputs
    ctx.top_k, ctx.slots_dtype = top_k, slots.dtype


def _combine_backward(ctx, grad):
    return fast.combine_backward(grad, ctx.top_k, ctx.slots_dtype), None, None, None


# ---- moe_expert_slots / moe_experts(x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs, impl)

def _experts_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])


def _experts_grads(ctx, grad, per_token: bool) -> tuple:
    x, weights, ids, up, up_scales, up_gs, down, down_scales, down_gs = ctx.saved_tensors
    up_w, _ = ops._weights(up, up_scales, up_gs)
    down_w, _ = ops._weights(down, down_scales, down_gs)
    dx, dw, dup, ddown = fast.expert_slots_backward(grad, per_token, x, weights, ids, up_w, down_w,
                                                    _flags(ctx, 0, 1, 3, 6))
    return dx, dw, None, dup, None, None, ddown, None, None, None


def _slots_backward(ctx, grad):
    return _experts_grads(ctx, grad, per_token=False)


def _experts_backward(ctx, grad):
    return _experts_grads(ctx, grad, per_token=True)


# ---- moe_routed_experts(x, logits, correction_bias, top_k, n_group, topk_group, renormalize, scaling_factor,
#                         up, up_scales, up_gs, down, down_scales, down_gs, impl)

def _routed_setup(ctx, inputs, output):
    x, logits, bias, top_k, n_group, topk_group, renormalize, scaling_factor = inputs[:8]
    ctx.save_for_backward(x, logits, bias, *inputs[8:14])
    ctx.route_args = (top_k, n_group, topk_group, renormalize, scaling_factor)


def _routed_backward(ctx, grad):
    x, logits, bias, up, up_scales, up_gs, down, down_scales, down_gs = ctx.saved_tensors
    top_k, n_group, topk_group, renormalize, scaling_factor = ctx.route_args
    weights, ids = ops._route(logits, top_k, bias, n_group, topk_group, renormalize, scaling_factor)
    up_w, _ = ops._weights(up, up_scales, up_gs)
    down_w, _ = ops._weights(down, down_scales, down_gs)
    need_x, need_logits, need_up, need_down = _flags(ctx, 0, 1, 8, 11)
    dx, dw, dup, ddown = fast.expert_slots_backward(grad, True, x, weights, ids, up_w, down_w,
                                                    (need_x, need_logits, need_up, need_down))
    dlogits = fast.route_backward(dw, logits, ids, renormalize, scaling_factor) if need_logits else None
    return dx, dlogits, None, None, None, None, None, None, dup, None, None, ddown, None, None, None


torch.library.register_autograd("nemotron::moe_route", _route_backward, setup_context=_route_setup)
torch.library.register_autograd("nemotron::moe_combine", _combine_backward, setup_context=_combine_setup)
torch.library.register_autograd("nemotron::moe_expert_slots", _slots_backward, setup_context=_experts_setup)
torch.library.register_autograd("nemotron::moe_experts", _experts_backward, setup_context=_experts_setup)
torch.library.register_autograd("nemotron::moe_routed_experts", _routed_backward, setup_context=_routed_setup)
