"""Checkpoints: HF ``nemotron_h`` safetensors (single file or sharded with an index) and ModelOpt's
NVFP4 / FP8 / MIXED_PRECISION exports of them; random weights built in the target format.

ModelOpt layout (architecture notes section 7): an NVFP4 linear ``X`` is ``X.weight`` uint8
``[out, in/2]``, ``X.weight_scale`` float8_e4m3fn ``[out, in/16]``, ``X.weight_scale_2`` and
``X.input_scale`` fp32 scalars; FP8 per-tensor is ``X.weight`` float8_e4m3fn, ``X.weight_scale``,
``X.input_scale``. The quantization config is ``hf_quant_config.json`` (``{"quantization":
{"quant_algo", "exclude_modules", ...}}``) or ``quantization_config`` in config.json (with a
``quantized_layers`` map for MIXED_PRECISION); routed experts are listed per expert.
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Optional

import torch
from torch import nn

from ..moe_kernels.layer import MoEExperts
from ..nvfp4.linear import FP8Linear, NVFP4Linear, quantize_
from .config import NemotronHConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"


# ---- quantization config ----------------------------------------------------------------------

def read_quant_config(path: str, config_dict: dict) -> Optional[dict]:
    """The ModelOpt quantization config of a checkpoint directory, or None for a plain checkpoint."""
    q = None
    file = os.path.join(path, "hf_quant_config.json")
    if os.path.exists(file):
        with open(file) as f:
            q = json.load(f).get("quantization")
    if q is None and "quantization_config" in config_dict:
        q = config_dict["quantization_config"]
    return q


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
    exclude = list(q.get("exclude_modules") or q.get("ignore") or [])
    skip = lambda n: any(n == p or fnmatch.fnmatchcase(n, p) for p in exclude)  # noqa: E731
    recipe = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not skip(name) and not name.startswith("mtp."):
            recipe[name] = algo.lower()
        elif isinstance(mod, MoEExperts) and not skip(name) and not name.startswith("mtp."):
            for e in range(mod.num_experts):
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
            for e in range(mod.num_experts):
                for p in ("up_proj", "down_proj"):
                    layers[f"{name}.{mod.first + e}.{p}"] = {"quant_algo": "NVFP4", "group_size": 16}
    if not layers:
        return None
    return {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "quantized_layers": layers,
            "producer": {"name": "nemotron-kernels"}}


# ---- construction -------------------------------------------------------------------------------

def _skeleton(cls, config: NemotronHConfig, device, dtype):
    """The model with uninitialized float weights (built on meta, then given storage)."""
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    model.to_empty(device=device)
    for mod in model.modules():       # buffers the loaders do not overwrite must be sane
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.zero_()
    return model


def _units(model) -> list:
    """(name, module) pieces that are built one at a time: embeddings, each layer, the head, MTP."""
    units = [("backbone.embeddings", model.backbone.embeddings)]
    units += [(f"backbone.layers.{i}", layer) for i, layer in enumerate(model.backbone.layers)]
    units += [("backbone.norm_f", model.backbone.norm_f), ("lm_head", model.lm_head)]
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


def _sub_recipe(recipe, prefix: str):
    if recipe is None or isinstance(recipe, str):
        return recipe
    return {k[len(prefix) + 1:]: v for k, v in recipe.items() if k.startswith(prefix + ".")}


def build_random(cls, config: NemotronHConfig, *, device=None, dtype=None, recipe=None, seed: int = 0):
    """Each unit (embeddings, one layer, the head, an MTP sublayer) gets storage, random weights and
    its quantization before the next one is touched: peak memory is the quantized model plus one
    unit in full precision (the full Super fits one 80 GB GPU all-NVFP4)."""
    device = torch.device(device or "cpu")
    dtype = dtype or _DTYPES.get(config.dtype, torch.bfloat16)
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for prefix, unit in _units(model):
        unit.to_empty(device=device)
        _init_random(unit, config, gen, device)
        sub = _sub_recipe(recipe, prefix)
        if sub:
            quantize_(unit, sub)
    return model.eval()


# ---- loading ------------------------------------------------------------------------------------

def _read_tensors(path: str, progress: bool) -> dict:
    from safetensors.torch import load_file
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"path: no *.safetensors and no {INDEX} in {path}")
    tensors = {}
    for i, name in enumerate(files):
        if progress:
            print(f"\rloading {name} ({i + 1}/{len(files)})", end="", flush=True)
        tensors.update(load_file(os.path.join(path, name)))
    if progress:
        print()
    return tensors


def load_pretrained(cls, path: str, *, device=None, dtype=None, progress: bool = False):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a checkpoint directory")
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    config = NemotronHConfig.from_dict(config_dict)
    device = torch.device(device or "cpu")
    dtype = dtype or _DTYPES.get(config.dtype, torch.bfloat16)
    model = _skeleton(cls, config, device, dtype)
    q = read_quant_config(path, config_dict)
    if q is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        _apply_recipe(model, recipe_from_quant_config(q, model))
    tensors = _read_tensors(path, progress)
    if model.mtp is None:                   # a checkpoint may carry MTP weights the config turns off
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    with torch.no_grad():
        result = model.load_state_dict(tensors, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} tensor(s), e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} tensor(s), e.g. {result.unexpected_keys[:5]}")
    if problems:
        raise ValueError(f"checkpoint {path}: " + "; ".join(problems))
    _activation_modes(model)
    return model.eval()


def from_hf(cls, hf_model, *, device=None, dtype=None):
    """This package's model holding the weights of an HF transformers ``NemotronHForCausalLM`` (one
    call, no files): the HF config becomes ours, HF's in-memory names (``model.*``, stacked experts)
    map to the checkpoint names."""
    config = NemotronHConfig.from_dict(hf_model.config.to_dict())
    ref = next(hf_model.parameters())
    device = torch.device(device or ref.device)
    dtype = dtype or ref.dtype
    model = _skeleton(cls, config, device, dtype)
    sd = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v
          for k, v in hf_model.state_dict().items()}
    if model.mtp is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    with torch.no_grad():
        result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("mtp.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"hf_model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if model.mtp is not None and any(k.startswith("mtp.") for k in result.missing_keys):
        model.mtp = None            # HF's module holds no MTP weights: drafting is unavailable
    return model.eval()


# ---- saving -------------------------------------------------------------------------------------

def save_pretrained(model, path: str, *, max_shard_bytes: Optional[int] = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    q = quant_config_of(model)
    extra = {"dtype": str(model.dtype).replace("torch.", "")}
    if q is not None:
        extra["quantization_config"] = q
        with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": q["producer"], "quantization": {k: v for k, v in q.items() if k != "producer"}},
                      f, indent=2)
    model.config.save_pretrained(path, extra=extra)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
