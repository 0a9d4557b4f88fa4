"""Checkpoints: HF ``nemotron_h`` safetensors (single file or sharded with an index) and ModelOpt's
NVFP4 / FP8 / MIXED_PRECISION exports of them; random weights built in the target format.

ModelOpt layout (architecture notes section 7): an NVFP4 linear ``X`` is ``X.weight`` uint8
``[out, in/2]``, ``X.weight_scale`` float8_e4m3fn ``[out, in/16]``, ``X.weight_scale_2`` and
``X.input_scale`` fp32 scalars; FP8 per-tensor is ``X.weight`` float8_e4m3fn, ``X.weight_scale``,
``X.input_scale``. The quantization config is ``hf_quant_config.json`` (``{"quantization":
{"quant_algo", "exclude_modules", ...}}``) or ``quantization_config`` in config.json (with a
``quantized_layers`` map for MIXED_PRECISION); routed experts are listed per expert.

Saving (:func:`save_pretrained`): :mod:`nemotron.model.saving`.

Loading checks what it reads: every file error is a :class:`CheckpointError` naming the file; index
entries must name ``.safetensors`` files inside the directory; a tensor may come from one file only;
each tensor's dtype must fit its slot in the model (see :func:`_check_dtypes`).

``tie_word_embeddings``: the head is the embedding table. A checkpoint may hold the table under
either name or both (equal); a save writes both, as transformers does. One whose ``lm_head.weight``
differs from the table loads untied (see :func:`_untie_if_distinct`). Quantization keeps a tied
head float.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import pathlib
import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from ..moe_kernels.layer import MoEExperts
from ..nvfp4.linear import FP8Linear, NVFP4Linear
from ..quantize import quantize_
from . import distributed
from .config import NemotronHConfig
from .model import TiedLMHead

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"
QUANT_CONFIG = "hf_quant_config.json"
_SCALARS = ("weight_scale", "weight_scale_2", "input_scale")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is; the message names the file and the fault."""


def _read_json(file: str):
    """The parsed JSON file; a file that is not UTF-8 JSON is a CheckpointError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{file}: not UTF-8 JSON text (byte {err.start}: {err.reason})") from None


def _get_tensor(handle, name: str, rows: slice) -> torch.Tensor:
    """Read one tensor (or the rows ``rows`` of its first dimension) from an open safetensors file:
    the one place the loader reads tensor data, so nothing else is materialized."""
    if rows == slice(None):
        return handle.get_tensor(name)
    return handle.get_slice(name)[rows]


# ---- quantization config ----------------------------------------------------------------------

def _quant_config(path: str, config_dict: dict) -> tuple[Optional[dict], str]:
    """(the quantization config or None, the file it came from)."""
    file = os.path.join(path, QUANT_CONFIG)
    if os.path.exists(file):
        d = _read_json(file)
        q = d.get("quantization") if isinstance(d, dict) else None
        if not isinstance(q, dict):
            raise CheckpointError(f"{file}: expected {{\"quantization\": {{\"quant_algo\": ...}}}}, got "
                                  f"{json.dumps(d)[:80]}")
        return q, file
    q = config_dict.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: quantization_config must be an object, "
                              f"got {type(q).__name__}")
    return q, os.path.join(path, "config.json")


def read_quant_config(path: str, config_dict: dict) -> Optional[dict]:
    """The ModelOpt quantization config of a checkpoint directory, or None for a plain checkpoint."""
    return _quant_config(path, config_dict)[0]


def recipe_from_quant_config(q: dict, model: nn.Module) -> dict:
    """A :func:`nemotron.quantize_` mixed map {module: "nvfp4" | "fp8"} from a ModelOpt config."""
    algo = str(q.get("quant_algo", "")).upper()
    if algo == "MIXED_PRECISION":
        layers = q.get("quantized_layers")
        if not isinstance(layers, dict):
            raise ValueError("quantization config: MIXED_PRECISION needs a 'quantized_layers' map")
        recipe = {}
        for name, entry in layers.items():
            sub = str(entry.get("quant_algo", "")).upper() if isinstance(entry, dict) else str(entry).upper()
            if sub not in ("NVFP4", "FP8"):
                raise ValueError(f"quantization config: {name}: unknown quant_algo {sub!r} (expected NVFP4 or FP8)")
            recipe[name] = sub.lower()
        return recipe
    if algo not in ("NVFP4", "FP8"):
        raise ValueError(f"quantization config: unknown quant_algo {algo!r} (expected NVFP4, FP8 or MIXED_PRECISION)")
    exclude = q.get("exclude_modules") or q.get("ignore") or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"quantization config: exclude_modules must be a list of module names or patterns, "
                         f"got {exclude!r}")
    skip = lambda n: any(n == p or fnmatch.fnmatchcase(n, p) for p in exclude)  # noqa: E731
    recipe = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not skip(name) and not name.startswith("mtp."):
            recipe[name] = algo.lower()
        elif isinstance(mod, MoEExperts) and not skip(name) and not name.startswith("mtp."):
            for e in range(mod.first, mod.first + mod.num_experts):
                for p in ("up_proj", "down_proj"):
                    recipe[f"{name}.{e}.{p}"] = algo.lower()
    return recipe


def _apply_recipe(model: nn.Module, recipe: dict) -> None:
    # FP8 routed experts (ModelOpt FP8 exports) load dequantized into the model dtype: the grouped
    # GEMM takes float or NVFP4 experts
    stacks = {n for n, m in model.named_modules() if isinstance(m, MoEExperts)}
    fp8_expert = lambda n: recipe[n] == "fp8" and n.rsplit(".", 2)[0] in stacks  # noqa: E731
    quantize_(model, {n: f for n, f in recipe.items() if not fp8_expert(n)})


def _activation_modes(model: nn.Module) -> None:
    """ModelOpt's NVFP4 is W4A4 with a calibrated static ``input_scale``: a linear whose checkpoint
    carries one quantizes its activations with it; one without (weight-only export) runs W4A16."""
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            mod.act_quant = "nvfp4" if mod.input_scale is not None else None


def quant_config_of(model: nn.Module) -> Optional[dict]:
    """The ModelOpt ``quantization_config`` describing a model's NVFP4 / FP8 modules (None if none)."""
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, NVFP4Linear):
            layers[name] = {"quant_algo": "NVFP4", "group_size": 16}
        elif isinstance(mod, FP8Linear):
            layers[name] = {"quant_algo": "FP8"}
        elif isinstance(mod, MoEExperts) and mod.quant == "nvfp4":
            for e in range(mod.num_global):            # every rank's experts: under expert parallelism too
                for p in ("up_proj", "down_proj"):
                    layers[f"{name}.{e}.{p}"] = {"quant_algo": "NVFP4", "group_size": 16}
    if not layers:
        return None
    return {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "quantized_layers": layers,
            "producer": {"name": "nemotron-kernels"}}


# ---- construction -------------------------------------------------------------------------------

def _skeleton(cls, config: NemotronHConfig, device, dtype, ep_group=None, ep_timeout=None):
    """The model with uninitialized float weights (built on meta, then given storage; under expert
    parallelism only this rank's experts get storage)."""
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    if ep_group is not None:
        distributed.shard_experts_(model, ep_group, ep_timeout)
    model.to_empty(device=device)
    for mod in model.modules():       # buffers the loaders do not overwrite must be sane
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.zero_()
    return model


def _units(model) -> list:
    """(name, module) pieces that are built one at a time: embeddings, each layer, the head (unless
    tied: then it is the embedding table), MTP."""
    units = [("backbone.embeddings", model.backbone.embeddings)]
    units += [(f"backbone.layers.{i}", layer) for i, layer in enumerate(model.backbone.layers)]
    units += [("backbone.norm_f", model.backbone.norm_f)]
    if not isinstance(model.lm_head, TiedLMHead):
        units += [("lm_head", model.lm_head)]
    if model.mtp is not None:
        units += [(f"mtp.layers.{j}", layer) for j, layer in enumerate(model.mtp.layers)]
    return units


def _init_random(module: nn.Module, config: NemotronHConfig, gen: torch.Generator, device) -> None:
    std = config.initializer_range
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
            elif leaf == "D" or (leaf == "weight" and p.dim() == 1):
                p.fill_(1.0)                                   # norms and the skip
            elif leaf == "dt_bias":                            # dt in [time_step_min, time_step_max], HF's init
                lo, hi = torch.log(torch.tensor(config.time_step_min)), torch.log(torch.tensor(config.time_step_max))
                dt = torch.exp(torch.rand(p.shape, generator=gen, device=device) * (hi - lo) + lo)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif leaf == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(p.dtype))
        for mod in module.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.zero_()


def _sub_recipe(recipe, prefix: str, other_rank=None):
    """The part of ``recipe`` for the unit ``prefix``, under the unit's own names ("" for the unit);
    entries of routed experts another rank holds (``other_rank(name)``) left out."""
    if recipe is None or isinstance(recipe, str):
        return recipe
    return {k[len(prefix) + 1:]: v for k, v in recipe.items() if (k == prefix or k.startswith(prefix + "."))
            and not (other_rank is not None and other_rank(k))}


def _check_recipe_names(recipe, units: list) -> None:
    """A mixed map's names must each fall in a unit (each unit's quantize_ checks the rest)."""
    if not isinstance(recipe, Mapping):
        return
    lost = [k for k in recipe if not any(k == p or k.startswith(p + ".") for p, _ in units)]
    if lost:
        raise ValueError(f"recipe: {len(lost)} name(s) are not quantizable modules of the model, e.g. {lost[:3]} "
                         "(a tied lm_head is the embedding table and stays float)")


def build_random(cls, config: NemotronHConfig, *, device=None, dtype=None, recipe=None, seed: int = 0,
                 ep_group=None, ep_timeout=distributed.DEFAULT_TIMEOUT_S):
    """Each unit (embeddings, one layer, the head, an MTP sublayer) gets storage, random weights and
    its quantization before the next one is touched: peak memory is the quantized model plus one
    unit in full precision (the full Super fits one 80 GB GPU all-NVFP4). Under expert parallelism
    a MoE unit draws all E experts (so every rank's values are the single-process model's), keeps
    its own E / W and frees the rest before it is quantized."""
    device = torch.device(device or "cpu")
    dtype = dtype or _DTYPES.get(config.dtype, torch.bfloat16)
    distributed.check_group(ep_group, config)
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    units = _units(model)
    _check_recipe_names(recipe, units)
    other_rank = None
    for prefix, unit in units:
        unit.to_empty(device=device)
        _init_random(unit, config, gen, device)
        if ep_group is not None:
            distributed.shard_experts_(unit, ep_group, ep_timeout)
            other_rank = distributed.is_other_rank_expert(model)
        sub = _sub_recipe(recipe, prefix, other_rank)
        if sub:
            new = quantize_(unit, sub)
            if new is not unit:             # the unit is itself a linear (lm_head): swap it in its parent
                parent, _, child = prefix.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
    model.tie_weights()                     # a tied head still holds the meta table
    if ep_group is not None:                # every rank built the same model (config, seed, recipe)
        what = json.dumps([dataclasses.asdict(config), seed, str(dtype), repr(recipe)], sort_keys=True, default=str)
        distributed.agree(ep_group, hashlib.sha256(what.encode()).digest(), "random model (config, seed, recipe)",
                          ep_timeout)
    return model.eval()


# ---- loading ------------------------------------------------------------------------------------

def _shard_name(index: str, name) -> str:
    """An index entry, refused unless it names a ``.safetensors`` file inside the checkpoint."""
    p = pathlib.PurePath(name) if isinstance(name, str) else None
    if p is None or p.is_absolute() or p.anchor or ".." in p.parts or not name.endswith(".safetensors"):
        raise CheckpointError(f"{index}: weight_map entry {name!r} is not a .safetensors file inside the "
                              "checkpoint directory")
    return name


def _files(path: str) -> tuple[list, Optional[dict], str]:
    """(the safetensors files, the index's weight map or None, the index file) of a checkpoint."""
    index = os.path.join(path, INDEX)
    if not os.path.exists(index):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"path: no *.safetensors and no {INDEX} in {path}")
        return files, None, index
    d = _read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor name: file name}}}}")
    files = sorted({_shard_name(index, v) for v in weight_map.values()})
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{index}: lists {name}, which is not in {path}")
    return files, weight_map, index


def _read_tensors(path: str, progress: bool, select=None) -> dict:
    """The tensors of a checkpoint directory, each read lazily by name (``safe_open``). With an index,
    exactly the tensors it maps, each from the file it names; without one, the ``*.safetensors``
    files, each tensor in one file only. ``select(name)`` (expert parallelism) returns None for a
    tensor this rank does not hold, which is then never read, or the rows of it to read."""
    from safetensors import SafetensorError, safe_open
    files, weight_map, index = _files(path)
    tensors, origin = {}, {}
    try:
        for i, name in enumerate(files):
            if progress:
                print(f"\rloading {name} ({i + 1}/{len(files)})", end="", flush=True)
            file = os.path.join(path, name)
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for k in f.keys():
                        if k in origin:
                            raise CheckpointError(f"{path}: tensor {k} is in both {origin[k]} and {name}")
                        if weight_map is not None and weight_map.get(k) != name:
                            raise CheckpointError(f"{index}: {name} holds {k}, which the index maps to "
                                                  f"{weight_map.get(k) or 'no file'}")
                        origin[k] = name
                        rows = slice(None) if select is None else select(k)
                        if rows is not None:
                            tensors[k] = _get_tensor(f, k, rows)
            except SafetensorError as err:
                raise CheckpointError(f"{file}: not a valid safetensors file ({err})") from None
    finally:
        if progress:
            print()
    absent = [k for k in weight_map or {} if k not in origin]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} tensor(s) are not in the files it names, e.g. "
                              f"{[(k, weight_map[k]) for k in absent[:3]]}")
    return tensors


def _fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _check_dtypes(model: nn.Module, tensors: dict, source: str) -> None:
    """Each tensor's dtype against its slot in ``model``, before anything is copied (a copy would
    cast silently). A float slot takes any float tensor but not an integer, bool or fp8 one; an
    integer slot (NVFP4 codes) and an fp8 slot (block scales, FP8 weights) take exactly their dtype.
    The one fp8-into-float case is a routed expert's weight, which ModelOpt FP8 exports store as
    fp8 with a ``weight_scale``, dequantized on load. Scales outside the model's slots (an
    ``input_scale`` the file adds, an FP8 expert's ``weight_scale``) must be non-fp8 floats."""
    slots = {k: v.dtype for k, v in model.state_dict().items()}
    fp8_ok = set()
    for name, mod in model.named_modules():
        if isinstance(mod, MoEExperts) and mod.quant is None:
            for p in ("up_proj", "down_proj"):
                slots[f"{name}.{p}"] = getattr(mod, p).dtype           # HF's stacked layout
                fp8_ok |= {f"{name}.{mod.first + e}.{p}.weight" for e in range(mod.num_experts)}
    bad = []
    for k, t in tensors.items():
        want = slots.get(k)
        if want is None:
            if k.rsplit(".", 1)[-1] in _SCALARS and (not t.is_floating_point() or _fp8(t.dtype)):
                bad.append(f"{k}: expected a float scale (float32, bfloat16 or float16), got {t.dtype}")
        elif want.is_floating_point and not _fp8(want):
            if not t.is_floating_point() or (_fp8(t.dtype) and k not in fp8_ok):
                bad.append(f"{k}: expected a float tensor (float32, bfloat16 or float16), got {t.dtype}")
        elif t.dtype != want:
            bad.append(f"{k}: expected {want}, got {t.dtype}")
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) of the wrong dtype: " + "; ".join(bad[:5]))


def _drop_absent_mtp(model: nn.Module, keys, source: str) -> None:
    """A config with MTP whose weights hold none of it (HF transformers saves no ``mtp.*``): the
    model loads without its MTP block, and says so."""
    if model.mtp is None or any(k.startswith("mtp.") for k in keys):
        return
    warnings.warn(f"{source}: the config has num_nextn_predict_layers = {model.config.num_nextn_predict_layers} "
                  "but the weights hold no mtp.* tensors; loading without MTP (no draft tokens)", stacklevel=5)
    model.mtp = None
    model.config.num_nextn_predict_layers = 0


def _untie_if_distinct(model: nn.Module, tensors: dict, source: str) -> None:
    """A tied config whose weights hold an ``lm_head.weight`` that is not the embedding table: the
    model loads untied (its own head, ``tie_word_embeddings`` turned off), and says so. Transformers
    5 builds NemotronH's head untied whatever the flag says and saves it so; older remote code saved
    a tied head as nothing or as the table. Either name alone, or both equal, loads tied."""
    emb, head = tensors.get("backbone.embeddings.weight"), tensors.get("lm_head.weight")
    if not isinstance(model.lm_head, TiedLMHead) or emb is None or head is None:
        return
    if emb.dtype == head.dtype and emb.shape == head.shape and torch.equal(emb, head):
        return
    warnings.warn(f"{source}: the config has tie_word_embeddings = true but lm_head.weight is not the embedding "
                  "table; loading an untied lm_head (as transformers runs this checkpoint)", stacklevel=4)
    w = model.backbone.embeddings.weight
    model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, dtype=w.dtype,
                              device=w.device)
    model.config.tie_word_embeddings = False


def _load(model: nn.Module, tensors: dict, source: str) -> None:
    """Load ``tensors`` into ``model`` (the checkpoint's names); every mismatch is a CheckpointError."""
    _drop_absent_mtp(model, tensors, source)
    if model.mtp is None:                   # a checkpoint may carry MTP weights the config turns off
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    _check_dtypes(model, tensors, source)
    try:
        with torch.no_grad():
            result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:             # shapes: load_state_dict gathers them into one error
        raise CheckpointError(f"{source}: {' '.join(str(err).split())}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} tensor(s), e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} tensor(s), e.g. {result.unexpected_keys[:5]}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_pretrained(cls, path: str, *, device=None, dtype=None, progress: bool = False, ep_group=None,
                    ep_timeout=distributed.DEFAULT_TIMEOUT_S):
    """The model of a checkpoint directory. Under expert parallelism (``ep_group``) every rank first
    checks that the others read the same checkpoint (:func:`distributed.checkpoint_digest`, one
    all_gather), then reads the dense tensors and only its own routed experts."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a checkpoint directory")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"path: no config.json in {path}")
    config_dict = _read_json(file)
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config_dict).__name__}")
    try:
        config = NemotronHConfig.from_dict(config_dict)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from None
    device = torch.device(device or "cpu")
    dtype = dtype or _DTYPES.get(config.dtype, torch.bfloat16)
    distributed.check_group(ep_group, config)
    if ep_group is not None:
        distributed.agree(ep_group, distributed.checkpoint_digest(path, _files(path)[0]), f"checkpoint ({path})",
                          ep_timeout)
    model = _skeleton(cls, config, device, dtype, ep_group, ep_timeout)
    source = f"checkpoint {path}"
    tensors = _read_tensors(path, progress, distributed.expert_selector(model) if ep_group is not None else None)
    _untie_if_distinct(model, tensors, source)
    q, q_file = _quant_config(path, config_dict)
    if q is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        try:
            recipe = recipe_from_quant_config(q, model)
            if ep_group is not None:
                other_rank = distributed.is_other_rank_expert(model)
                recipe = {k: v for k, v in recipe.items() if not other_rank(k)}
            _apply_recipe(model, recipe)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{q_file}: {err}") from None
    _load(model, tensors, source)
    _activation_modes(model)
    if ep_group is not None:                # wait for the slowest reader under the group's own timeout
        distributed.agree(ep_group, b"loaded", "load", None)
    if progress:
        print(distributed.memory_line(model), flush=True)
    return model.eval()


def from_hf(cls, hf_model, *, device=None, dtype=None):
    """This package's model holding the weights of an HF transformers ``NemotronHForCausalLM`` (one
    call, no files): the HF config becomes ours, HF's in-memory names (``model.*``, stacked experts)
    map to the checkpoint names. HF's module has no MTP block: the model comes without one."""
    config = NemotronHConfig.from_dict(hf_model.config.to_dict())
    ref = next(hf_model.parameters())
    device = torch.device(device or ref.device)
    dtype = dtype or ref.dtype
    model = _skeleton(cls, config, device, dtype)
    sd = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v
          for k, v in hf_model.state_dict().items()}
    _untie_if_distinct(model, sd, "hf_model")
    _load(model, sd, "hf_model")
    return model.eval()


from .saving import save_pretrained  # noqa: E402,F401  (the writer: its own stage file)
