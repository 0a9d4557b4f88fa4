"""The ``nemotron`` backend's graph passes, run by Inductor on the post-grad (functional ATen) graph.

  noop       drop copies and reshapes that change nothing around the package's ops: a contiguous
             clone of a contiguous tensor, a reshape of a reshape (one reshape), a reshape or dtype
             view to what the tensor already is
  norm_quant RMSNorm (the model's ATen pattern) or ``nemotron::gated_rmsnorm`` feeding a W4A4
             ``nemotron::nvfp4_linear`` with a static input scale -> ``nemotron::norm_nvfp4_linear``
             (the normalized activation never goes to memory in bf16; triton/norm_quantize.py)
  moe        ``nemotron::moe_route`` feeding ``nemotron::moe_experts`` -> ``nemotron::moe_routed_experts``
             (routing weights and ids never leave the op)
  lowering   decides every package op's implementation through :mod:`nemotron.dispatch` (device,
             capability, dtype, rows; the ``kernels`` option) and writes it into the node's ``impl``
             argument, so the compiled graph runs exactly what :func:`nemotron.graph.explain` prints

Everything else is left to Inductor. :class:`NemotronPasses` is a ``CustomGraphPass`` whose
``uuid()`` hashes the package's sources and the options, so Inductor's FX-graph cache never serves
a graph compiled by other passes or kernels.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .. import dispatch
from ..attention import ops as _attention_ops  # noqa: F401
from ..moe_kernels import ops as _moe_ops  # noqa: F401  (registers the ops the passes match)
from ..nvfp4 import ops as _nvfp4_ops  # noqa: F401
from ..ssm_kernels import ops as _ssm_ops  # noqa: F401

FUSIONS = ("noop", "norm_quant", "moe")
KERNELS = dispatch.KERNELS

_ops = torch.ops.nemotron
_aten = torch.ops.aten


def _is(node, op) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == op


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _package_op(node) -> Optional[torch._ops.OpOverload]:
    """The nemotron op a node runs (also through ``auto_functionalized`` for the mutating ops)."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in (torch.ops.higher_order.auto_functionalized, getattr(torch.ops.higher_order, "auto_functionalized_v2", None)):
        target = node.args[0]
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "nemotron":
        return target
    return None


def _replace(graph: torch.fx.Graph, node, op, args: tuple) -> None:
    """Put ``op(*args)`` in ``node``'s place. The new node takes the output value and source location,
    not ``eager_input_vals`` (the old op's arguments, which Inductor would check against the new schema)."""
    with graph.inserting_before(node):
        new = graph.call_function(op, args)
    for key in ("val", "stack_trace", "nn_module_stack"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    graph.erase_node(node)


# ---- no-op elimination --------------------------------------------------------------------------

_RESHAPES = (_aten.reshape.default, _aten.view.default, _aten._unsafe_view.default)


def eliminate_noops(graph: torch.fx.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        src = node.args[0]
        v, sv = _val(node), _val(src)
        if v is None or sv is None or not isinstance(sv, torch.Tensor):
            continue
        if _is(node, _aten.clone.default):
            fmt = node.kwargs.get("memory_format")
            same = fmt in (None, torch.contiguous_format, torch.preserve_format) and sv.is_contiguous()
            # a clone another op mutates in place must stay
            if same and all(_package_op(u) is not None or u.op == "output" for u in node.users) and \
                    not any(u.target is torch.ops.higher_order.auto_functionalized for u in node.users):
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                removed += 1
        elif node.target in _RESHAPES:
            if tuple(v.shape) == tuple(sv.shape) and sv.is_contiguous():
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                removed += 1
            elif src.op == "call_function" and src.target in _RESHAPES and len(src.users) == 1:
                node.args = (src.args[0], *node.args[1:])
                graph.erase_node(src)
                removed += 1
        elif _is(node, _aten.view.dtype) and node.args[1] == sv.dtype:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            removed += 1
    return removed


# ---- norm + quantize + W4A4 linear --------------------------------------------------------------

def _strip_converts(n):
    while _is(n, torch.ops.prims.convert_element_type.default):
        n = n.args[0]
    return n


def match_rmsnorm(out):
    """(h, weight, eps) if ``out`` is ``(w * (h * rsqrt(mean(h^2, -1, keepdim) + eps))).to(h.dtype)``
    (fp32 math, the converts optional), else None."""
    n = out
    if _is(n, torch.ops.prims.convert_element_type.default):
        n = n.args[0]
    if not _is(n, _aten.mul.Tensor):
        return None
    for w_side, inner in (n.args, n.args[::-1]):
        if not _is(inner, _aten.mul.Tensor):
            continue
        for h32, r in (inner.args, inner.args[::-1]):
            if not _is(r, _aten.rsqrt.default) or not _is(r.args[0], _aten.add.Tensor):
                continue
            mean, eps = r.args[0].args
            if not isinstance(eps, float) or not _is(mean, _aten.mean.dim):
                continue
            if list(mean.args[1]) not in ([-1], [len(_val(h32).shape) - 1]) or not (len(mean.args) > 2 and mean.args[2]):
                continue
            pw = mean.args[0]
            if not (_is(pw, _aten.pow.Tensor_Scalar) and pw.args[0] is h32 and pw.args[1] == 2):
                continue
            h, w = _strip_converts(h32), _strip_converts(w_side)
            if not isinstance(w, torch.fx.Node) or _val(h) is None or _val(w) is None:
                continue
            if _val(h).dtype != _val(out).dtype or _val(w).dim() != 1:
                continue
            return h, w, eps
    return None


def fuse_norm_quant_linear(graph: torch.fx.Graph) -> int:
    matched = 0
    for node in list(graph.nodes):
        if not _is(node, _ops.nvfp4_linear.default):
            continue
        x, codes, scales, gs, bias, act_quant, input_scale = node.args
        if not act_quant or input_scale is None or len(x.users) != 1:
            continue
        if _is(x, _ops.gated_rmsnorm.default):
            y, z, w, group, eps = x.args
            args = (y, w, z, group, eps)
        else:
            m = match_rmsnorm(x)
            if m is None:
                continue
            h, w, eps = m
            k = _val(h).shape[-1]
            if not isinstance(k, int) or k % 16:
                continue
            args = (h, w, None, k, eps)
        _replace(graph, node, _ops.norm_nvfp4_linear.default, (*args, codes, scales, gs, bias, input_scale))
        matched += 1
    graph.eliminate_dead_code()
    return matched


# ---- MoE: route + experts -----------------------------------------------------------------------

def fuse_moe_route(graph: torch.fx.Graph) -> int:
    matched = 0
    for node in list(graph.nodes):
        if not _is(node, _ops.moe_experts.default):
            continue
        x, wts, ids = node.args[:3]
        if not (wts.op == "call_function" and ids.op == "call_function" and wts.args[0] is ids.args[0]):
            continue
        route = wts.args[0]
        if not _is(route, _ops.moe_route.default) or (wts.args[1], ids.args[1]) != (0, 1):
            continue
        if len(wts.users) != 1 or len(ids.users) != 1 or len(route.users) != 2:
            continue
        logits, top_k, bias, n_group, topk_group, renorm, scale = route.args
        _replace(graph, node, _ops.moe_routed_experts.default,
                 (x, logits, bias, top_k, n_group, topk_group, renorm, scale, *node.args[3:]))
        matched += 1
    graph.eliminate_dead_code()
    return matched


# ---- lowering -----------------------------------------------------------------------------------

def _leading_val(op: torch._ops.OpOverload, node) -> Optional[torch.Tensor]:
    """The fake value of the op's first tensor argument that it does not mutate: what the op itself
    hands :func:`nemotron.dispatch.choose`."""
    args = dict(zip([a.name for a in op._schema.arguments], node.args)) if not _functionalized(node) else {}
    args.update(node.kwargs)
    for a in op._schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write:
            continue
        v = _val(args.get(a.name))
        if isinstance(v, torch.Tensor):
            return v
    return None


def _functionalized(node) -> bool:
    return node.target is not None and not isinstance(node.target, torch._ops.OpOverload)


def _set_impl(op: torch._ops.OpOverload, node, impl: str) -> None:
    """Write the chosen implementation into the node's ``impl`` argument (the op's last)."""
    names = [a.name for a in op._schema.arguments]
    idx = names.index("impl")
    if not _functionalized(node) and len(node.args) > idx:
        node.args = (*node.args[:idx], impl, *node.args[idx + 1:])
    else:
        node.kwargs = {**node.kwargs, "impl": impl}


def lower(graph: torch.fx.Graph, kernels: Optional[str]) -> list:
    """Decide every package op's implementation now, through the same table eager calls use, and pin it
    in the node (``impl``), so what runs is what the report (:func:`nemotron.graph.explain`) says."""
    rows = []
    for node in graph.nodes:
        op = _package_op(node)
        if op is None:
            continue
        x = _leading_val(op, node)
        choice = dispatch.choose(op._opname, x, kernels=kernels, record=False)
        _set_impl(op, node, choice.name)
        node.meta["nemotron_kernel"] = str(choice)
        val = node.meta.get("val")
        first = val[0] if isinstance(val, (tuple, list)) and val else val
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
        rows.append((f"nemotron::{op._opname}", choice.name, str(choice), shape))
    return rows


# ---- the pass manager ---------------------------------------------------------------------------

def _source_hash() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return get_hash_for_files(tuple(sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))))


class _Pass(CustomGraphPass):
    """One pass as a ``CustomGraphPass``: ``fn(graph) -> rewrites``; its uuid covers the sources."""
    name = ""
    fn = None

    def __call__(self, graph: torch.fx.Graph) -> int:
        return type(self).fn(graph)

    def uuid(self):
        return (self.name, _source_hash())


class NoOpElimination(_Pass):
    name, fn = "noop", eliminate_noops


class NormQuantFusion(_Pass):
    name, fn = "norm_quant", fuse_norm_quant_linear


class MoERouteFusion(_Pass):
    name, fn = "moe", fuse_moe_route


PASSES = {p.name: p for p in (NoOpElimination, NormQuantFusion, MoERouteFusion)}


class NemotronPasses(CustomGraphPass):
    """The enabled passes in order, then the lowering annotation; ``matched`` counts each pass's
    rewrites in the last graph, ``report`` accumulates {fusions, ops} per graph."""

    def __init__(self, fusions=FUSIONS, kernels: Optional[str] = None, report: Optional[list] = None):
        self.fusions = tuple(fusions)
        self.kernels = kernels
        self.report = report if report is not None else []
        self.passes = [PASSES[name]() for name in FUSIONS if name in self.fusions]
        self.matched: dict = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        matched = {p.name: p(graph) for p in self.passes}
        graph.lint()
        self.matched = matched
        self.report.append({"fusions": matched, "ops": lower(graph, self.kernels)})

    def uuid(self):
        # the lowering pins implementations: a graph compiled under another forced choice is another graph
        return (_source_hash(), tuple(p.uuid() for p in self.passes), self.kernels or dispatch.forced())
