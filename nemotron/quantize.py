"""``nemotron.quantize_`` and ``nemotron.prepare_training_``: swap a model's linears (and LatentMoE
expert stacks) for NVFP4 / FP8 inference layers, or for NVFP4 / MXFP8 training layers.

It sits above the kernel families: it knows the layers of each (``nvfp4.NVFP4Linear`` /
``FP8Linear`` / ``NVFP4TrainingLinear``, ``moe_kernels.MoEExperts``), and none of them imports it.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Mapping, Optional, Union

from torch import nn

from .moe_kernels.layer import MoEExperts
from .nvfp4.linear import FP8Linear, NVFP4Linear
from .nvfp4.training import MXFP8TrainingLinear, NVFP4Recipe, NVFP4TrainingLinear, final_layers

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
    swaps = []
    for name, lin, fmt in linear_todo:
        if fmt == "nvfp4":
            # a layer trained with 16x16 weight blocks exports those blocks: inference sees the trained weights
            block = getattr(lin, "weight_block_shape", (1, 16))
            swaps.append((name, NVFP4Linear.from_linear(lin, act_quant=act_quant, block_shape=block)))
        else:
            swaps.append((name, FP8Linear.from_linear(lin)))
    return _swap(model, swaps)


def _swap(model: nn.Module, swaps: list) -> nn.Module:
    """Put each ``(name, new module)`` in place; the root module's replacement is returned."""
    for name, new in swaps:
        if not name:
            return new                     # the root module itself
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _layer_count(model: nn.Module) -> Optional[tuple]:
    """(count, path) of the backbone's layers (``backbone.layers`` or ``layers``), for ``high_precision_final``."""
    for path in ("backbone.layers", "model.layers", "layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return len(layers), path
    return None


def prepare_training_(model: nn.Module, recipe: Optional[NVFP4Recipe] = None, *,
                      generator=None) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` modules in place for NVFP4 training layers (:class:`~nemotron.
    nvfp4.NVFP4TrainingLinear`), in the spirit of :func:`quantize_`; float LatentMoE expert stacks
    (:class:`~nemotron.moe_kernels.MoEExperts`) train their GEMMs in NVFP4 too.

    Args:
        recipe: an :class:`~nemotron.nvfp4.NVFP4Recipe` (default ``NVFP4Recipe()``; Super's carve-outs:
            ``NVFP4Recipe.nemotron3()``). Modules matching ``recipe.high_precision`` (fnmatch on the
            module name) and those in the final ``recipe.high_precision_final`` share of the backbone's
            layers (``backbone.layers.{i}``) stay ``nn.Linear``; those matching ``recipe.mxfp8`` become
            :class:`~nemotron.nvfp4.MXFP8TrainingLinear`.
        generator: the stochastic-rounding seed source of every swapped layer (default: torch's global
            CPU generator).

    The new layers hold the same Parameters (an optimizer built before keeps working) and the same
    state-dict names. After training, :func:`quantize_` exports them as NVFP4 with the recipe's weight
    blocks. Every swap is validated before the first one happens (an NVFP4 layer needs in/out features
    that are multiples of 16, an MXFP8 layer multiples of 32). Returns the model (a root ``nn.Linear``
    is returned swapped, not changed in place).

    Example::

        >>> model = nemotron.prepare_training_(model, nemotron.nvfp4.NVFP4Recipe.nemotron3())
        >>> loss = model(ids)[:, :-1].flatten(0, 1).log_softmax(-1).gather(1, ids[:, 1:].reshape(-1, 1)).mean()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    recipe = NVFP4Recipe() if recipe is None else recipe
    if not isinstance(recipe, NVFP4Recipe):
        raise TypeError(f"recipe: expected an NVFP4Recipe, got {type(recipe).__name__}")
    final = ()
    if recipe.high_precision_final > 0:
        found = _layer_count(model)
        if found is None:
            raise ValueError("recipe.high_precision_final: the model has no backbone.layers / layers ModuleList "
                             "to take the final layers from")
        count, path = found
        final = tuple(f"{path}.{i}.*" for i in range(count - final_layers(count, recipe.high_precision_final), count))
    keep = lambda name: any(fnmatch.fnmatchcase(name, p) for p in (*recipe.high_precision, *final))  # noqa: E731
    mx = lambda name: any(fnmatch.fnmatchcase(name, p) for p in recipe.mxfp8)  # noqa: E731
    swaps, stacks = [], []
    for name, lin in model.named_modules():
        if isinstance(lin, MoEExperts) and lin.quant is None and not keep(name):
            if lin.hidden % 16 or lin.intermediate % 16:
                raise ValueError(f"{name}: NVFP4 training of routed experts needs widths that are multiples of 16, "
                                 f"got {lin.hidden} x {lin.intermediate}; add it to recipe.high_precision")
            stacks.append(lin)
        if not isinstance(lin, nn.Linear) or keep(name):
            continue
        label = name or "model"
        if lin.weight.is_meta:
            raise ValueError(f"{label}: its weight is on the meta device (no values to train)")
        if mx(name):
            if lin.in_features % 32 or lin.out_features % 32:
                raise ValueError(f"{label}: MXFP8 training needs in/out features that are multiples of 32, got "
                                 f"{lin.in_features} x {lin.out_features}; add it to recipe.high_precision")
            swaps.append((name, lin, "mxfp8"))
        elif lin.in_features % 16 or lin.out_features % 16:
            raise ValueError(f"{label}: NVFP4 training needs in/out features that are multiples of 16, got "
                             f"{lin.in_features} x {lin.out_features}; add it to recipe.high_precision")
        else:
            swaps.append((name, lin, "nvfp4"))
    for stack in stacks:
        stack.training_recipe, stack.training_generator = recipe, generator
    return _swap(model, [(name, MXFP8TrainingLinear.from_linear(lin) if fmt == "mxfp8"
                          else NVFP4TrainingLinear.from_linear(lin, recipe, generator)) for name, lin, fmt in swaps])
