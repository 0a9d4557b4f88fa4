"""``nemotron.quantize_``: swap a model's linears (and LatentMoE expert stacks) for NVFP4 / FP8 layers.

It sits above the kernel families: it knows the layers of each (``nvfp4.NVFP4Linear`` /
``FP8Linear``, ``moe_kernels.MoEExperts``), and none of them imports it.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Mapping, Optional, Union

from torch import nn

from .moe_kernels.layer import MoEExperts
from .nvfp4.linear import FP8Linear, NVFP4Linear

_EXPERT = re.compile(r"(^|\.)experts\.")
_FORMATS = {"nvfp4": "nvfp4", "fp8": "fp8", "keep": None, "bf16": None, "none": None}


def _format_of(value) -> Optional[str]:
    """A mixed-map value: "nvfp4" | "fp8" | "keep" | None, or ModelOpt's {"quant_algo": "NVFP4" | "FP8"}."""
    if isinstance(value, Mapping):
        value = value.get("quant_algo")
    if value is None:
        return None
    key = str(value).lower()
    if key not in _FORMATS:
        raise ValueError(f"recipe: unknown format {value!r}; expected nvfp4, fp8 or keep (or ModelOpt's "
                         "{'quant_algo': 'NVFP4' | 'FP8'})")
    return _FORMATS[key]


def _split_expert_entries(recipe: Mapping, stacks: dict) -> tuple[dict, dict]:
    """Take the per-expert entries (``{stack}.{e}.up_proj`` / ``down_proj``, as in ModelOpt's
    ``quantized_layers``) out of a mixed map: a stack converts when all its 2E entries agree."""
    rest, seen = dict(recipe), {}
    for name, mod in stacks.items():
        keys = [f"{name}.{mod.first + e}.{p}" for e in range(mod.num_experts) for p in ("up_proj", "down_proj")]
        present = [k for k in keys if k in rest]
        if not present:
            continue
        fmts = {_format_of(rest.pop(k)) for k in present}
        if len(present) != len(keys) or len(fmts) != 1:
            raise ValueError(f"recipe: the routed experts of {name} are stored as one stack; list all "
                             f"{len(keys)} of its expert projections with one format (got {len(present)}, {fmts})")
        seen[name] = fmts.pop()
    return rest, seen


def _plan(model: nn.Module, recipe, exclude) -> tuple[list, list]:
    """The (name, module, format) conversions ``recipe`` asks for, every one validated."""
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    stacks = {name: mod for name, mod in model.named_modules() if isinstance(mod, MoEExperts)}
    if isinstance(exclude, str):
        exclude = (exclude,)
    excluded = lambda name: any(name == p or fnmatch.fnmatchcase(name, p) for p in exclude)  # noqa: E731
    if isinstance(recipe, str):
        if recipe == "nvfp4":
            plan = {n: "nvfp4" for n in linears}
        elif recipe == "nvfp4-experts":
            plan = {n: "nvfp4" for n in linears if _EXPERT.search(n)}
        else:
            raise ValueError(f"recipe: expected 'nvfp4', 'nvfp4-experts' or a mapping, got {recipe!r}")
        stack_plan = {n: "nvfp4" for n in stacks}
    elif isinstance(recipe, Mapping):
        recipe, stack_plan = _split_expert_entries(recipe, stacks)
        missing = [n for n in recipe if n not in linears]
        if missing:
            raise ValueError(f"recipe: {len(missing)} name(s) are not nn.Linear modules of the model, e.g. {missing[:3]}")
        plan = {n: _format_of(v) for n, v in recipe.items()}
    else:
        raise TypeError(f"recipe: expected a str or a mapping, got {type(recipe).__name__}")
    stack_todo, linear_todo = [], []
    for name, fmt in stack_plan.items():
        if fmt is None or excluded(name):
            continue
        if fmt != "nvfp4":
            raise ValueError(f"recipe: routed experts {name} support nvfp4 or keep, got {fmt!r}")
        if stacks[name].hidden % 16 or stacks[name].intermediate % 16:
            raise ValueError(f"{name}: expert widths must be multiples of 16 for NVFP4; exclude or keep them")
        stack_todo.append(stacks[name])
    for name, fmt in plan.items():
        if fmt is None or excluded(name):
            continue
        lin = linears[name]
        if fmt == "nvfp4" and lin.in_features % 16:
            raise ValueError(f"{name or 'model'}: in_features {lin.in_features} is not a multiple of 16; exclude it "
                             "or keep it")
        if lin.weight.is_meta:
            raise ValueError(f"{name or 'model'}: its weight is on the meta device (no values to quantize)")
        linear_todo.append((name, lin, fmt))
    return stack_todo, linear_todo


def quantize_(model: nn.Module, recipe: Union[str, Mapping], *, exclude: Iterable[str] = (),
              act_quant: Optional[str] = None) -> nn.Module:
    """Swap ``nn.Linear`` modules of ``model`` in place for NVFP4 / FP8 layers (torchao-style).

    Args:
        recipe: ``"nvfp4"`` (every linear), ``"nvfp4-experts"`` (linears under an ``experts.``
            module, not ``shared_experts``; both also convert the stacked routed experts of a
            :class:`~nemotron.moe_kernels.LatentMoE`, one global scale per expert), or a ModelOpt-style
            mixed map ``{module name: "nvfp4" | "fp8" | "keep"}`` (values may be ModelOpt's
            ``{"quant_algo": "NVFP4"}``; modules not listed are kept), as in the Nemotron 3 Super
            checkpoint's ``quantized_layers``.
        exclude: module names or fnmatch patterns never swapped (e.g. ``"lm_head"``, ``"*.q_proj"``).
        act_quant: for NVFP4 layers: None (W4A16) or ``"nvfp4"`` (W4A4).

    Returns the model. When ``model`` itself is an ``nn.Linear`` it cannot be swapped in place: the
    new layer is returned (``lin = quantize_(lin, "nvfp4")``). Every conversion is validated before
    the first one happens, so an error leaves the model as it was. Map names that are not
    ``nn.Linear`` modules of the model raise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if act_quant not in (None, "nvfp4"):
        raise ValueError(f"act_quant: expected None or 'nvfp4', got {act_quant!r}")
    stack_todo, linear_todo = _plan(model, recipe, exclude)
    for stack in stack_todo:
        stack.quantize_()
    for name, lin, fmt in linear_todo:
        new = NVFP4Linear.from_linear(lin, act_quant=act_quant) if fmt == "nvfp4" else FP8Linear.from_linear(lin)
        if not name:
            return new                     # the root module itself
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
