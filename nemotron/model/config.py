"""``NemotronHConfig``: the HF ``config.json`` of ``model_type: nemotron_h``, as a dataclass.

Reads both spellings of the layer pattern: ``hybrid_override_pattern`` ("M" Mamba-2, "E" MoE,
"*" attention, "-" MLP) and ``layers_block_type`` (``linear_attention`` / ``moe`` /
``full_attention`` / ``mlp``; older files say ``mamba`` / ``attention``), and likewise the MTP
pattern. Values of the presets: the architecture notes section 1.1 (Super and Nano config.json).

Every config is validated when it is built (:data:`_RULES`: each field's type and range, then the
relations between fields); a bad value is a TypeError / ValueError naming the field. Two fields
are kept for round trips only, as HF treats them: ``chunk_size`` (the scan's result does not
depend on it; the model uses the package's scan tile) and ``attention_bias`` (HF's attention
projections have no bias whatever the flag says).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from typing import NamedTuple, Optional

_CHAR_TO_TYPE = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_TYPE_TO_CHAR = {v: k for k, v in _CHAR_TO_TYPE.items()}
_ALIASES = {"mamba": "linear_attention", "attention": "full_attention"}
MODEL_TYPES = ("nemotron_h", "nemotron_3")          # the second: HF's legacy spelling
DTYPES = ("float32", "bfloat16", "float16")
PACKAGE_FIELDS = ("prefill_chunk_size",)            # this package's serving settings; HF's config has none of them

SUPER_PATTERN = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


@dataclasses.dataclass
class NemotronHConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: list = dataclasses.field(default_factory=lambda: [_CHAR_TO_TYPE[c] for c in SUPER_PATTERN])
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128                    # round trips only: the scan tile is the package's
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    mamba_ssm_cache_dtype: str = "float32"
    # attention (no positional encoding)
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False             # round trips only: HF builds the projections without bias
    # MoE
    n_routed_experts: int = 512
    num_experts_per_tok: int = 22
    moe_intermediate_size: int = 2688
    moe_shared_expert_intermediate_size: int = 5376
    moe_latent_size: Optional[int] = 1024
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 5.0
    mlp_bias: bool = False
    intermediate_size: int = 2688            # dense "-" MLP layers
    # MTP
    num_nextn_predict_layers: int = 1
    mtp_layers_block_type: list = dataclasses.field(default_factory=lambda: ["full_attention", "moe"])
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2          # or a list of ids, as HF allows
    pad_token_id: Optional[int] = 0
    initializer_range: float = 0.02
    dtype: Optional[str] = "bfloat16"        # None (HF's default): bfloat16
    # serving (this package's; HF ignores it): ``generate`` prefills a prompt in chunks of this many
    # tokens, so prefill memory stays bounded whatever the prompt length (bench.model --prefill-chunks)
    prefill_chunk_size: int = 8192

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name in _RULES:
                setattr(self, f.name, _RULES[f.name].check(f.name, getattr(self, f.name)))
        self.layers_block_type = _normalize_types("layers_block_type", self.layers_block_type)
        self.mtp_layers_block_type = _normalize_types("mtp_layers_block_type", self.mtp_layers_block_type,
                                                      empty_ok=not self.num_nextn_predict_layers)
        _check_relations(self)

    # -- derived --------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        return "".join(_TYPE_TO_CHAR[t] for t in self.layers_block_type)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    # -- HF config.json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "NemotronHConfig":
        """The config of a parsed HF ``config.json``, read as HF reads it.

        The file must carry :data:`REQUIRED` (the model's shape is never guessed); a field it
        omits takes HF's default (:data:`_HF_DEFAULTS` where it differs from the dataclass's
        Super values); HF's legacy names (``mamba_d_conv``, ``torch_dtype``, ...) are read as HF
        reads them. A ``num_hidden_layers`` that disagrees with the pattern is warned about and the
        pattern wins, as in HF. Keys this model does not use are ignored, except the activations:
        one this model does not run is an error.
        """
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict (a parsed config.json), got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "nemotron_h") not in MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {d.get('model_type')!r}")
        for name, ours in _LEGACY.items():                 # HF: the legacy name wins when present
            if name in d and d[name] is not None:
                d[ours] = d.pop(name)
        if d.get("dtype") is None and d.get("torch_dtype") is not None:
            d["dtype"] = d["torch_dtype"]
        for types, pattern in (("layers_block_type", "hybrid_override_pattern"),
                               ("mtp_layers_block_type", "mtp_hybrid_override_pattern")):
            source = types if d.get(types) is not None else pattern
            if d.get(source) is not None:    # checked here, under the name the file used
                d[types] = _normalize_types(source, d[source], empty_ok=types.startswith("mtp"))
        missing = [_SPELLED.get(f, f) for f in REQUIRED if d.get(f) is None]
        if missing:
            raise ValueError(f"config: missing required field(s): {'; '.join(missing)} (every config.json "
                             "carries vocab_size, hidden_size and the layer pattern)")
        for name, runs in _ACTIVATIONS.items():
            if d.get(name, runs[0]) not in runs:
                raise ValueError(f"{name}: this model runs {' / '.join(runs)}, got {d[name]!r}")
        n = d.get("num_hidden_layers")
        if n is not None and n != len(d["layers_block_type"]):
            warnings.warn(f"config: num_hidden_layers {n!r} does not match the {len(d['layers_block_type'])} layers "
                          "of the pattern; using the pattern", stacklevel=2)
        d = {**_HF_DEFAULTS, **d}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(model_type="nemotron_h", architectures=["NemotronHForCausalLM"],
                 num_hidden_layers=self.num_hidden_layers, hybrid_override_pattern=self.hybrid_override_pattern,
                 mtp_hybrid_override_pattern="".join(_TYPE_TO_CHAR[t] for t in self.mtp_layers_block_type),
                 expand=2, mamba_hidden_act="silu", mlp_hidden_act="relu2", n_shared_experts=1,
                 residual_in_fp32=False, rescale_prenorm_residual=True, use_cache=True,
                 time_step_limit=[0.0, float("inf")])
        return d

    @classmethod
    def from_pretrained(cls, path: str) -> "NemotronHConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file) as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, path: str, extra: Optional[dict] = None) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**self.to_dict(), **(extra or {})}, f, indent=2)

    @classmethod
    def preset(cls, name: str) -> "NemotronHConfig":
        """``"super-120b-a12b"``, ``"nano-30b-a3b"``, or a tiny test model: ``"tiny"`` (every layer
        kind, latent MoE, MTP), ``"tiny-nano"`` (no latent projection, no MTP), ``"tiny-groups"``
        (group-limited routing); ``"stdlib-tiny"``: the small model ``nemotron train`` trains on the
        Python standard library (a scaled-down Super, NVFP4-trainable widths)."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


# ---- validation -----------------------------------------------------------------------------------

class _Rule(NamedTuple):
    """A field's type and range. Bools are not ints; an int is taken where a float is meant (and
    stored as a float, which HF's strict config requires); floats must be finite."""
    kind: type
    lo: Optional[float] = None          # the least value allowed
    strict: bool = False                # the value must exceed ``lo``
    optional: bool = False              # None is allowed
    choices: tuple = ()
    many: bool = False                  # a non-empty list of such values is allowed too

    def expected(self) -> str:
        if self.choices:
            what = f"one of {self.choices}"
        elif self.kind is bool:
            what = "a bool"
        else:
            what = ("an int" if self.kind is int else "a finite number") + (
                "" if self.lo is None else f" {'>' if self.strict else '>='} {self.lo:g}")
        return what + (" (or a list of them)" if self.many else "") + (" or None" if self.optional else "")

    def check(self, name: str, v):
        if v is None and self.optional:
            return v
        if self.many and isinstance(v, (list, tuple)) and v:
            return [self.check(name, x) for x in v]
        if self.kind is bool:
            ok = isinstance(v, bool)
        elif self.kind is int:
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        elif self.kind is float:
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
        else:
            ok = isinstance(v, self.kind)
        if not ok:
            raise TypeError(f"{name}: expected {self.expected()}, got {v!r} ({type(v).__name__})")
        if self.kind is float:
            v = float(v)
        elif self.kind is int:
            v = int(v)
        bad = ((self.choices and v not in self.choices) or (self.kind is float and not math.isfinite(v))
               or (self.lo is not None and (v <= self.lo if self.strict else v < self.lo)))
        if bad:
            raise ValueError(f"{name}: expected {self.expected()}, got {v!r}")
        return v


_POSITIVE = _Rule(int, 1)
_FLAG = _Rule(bool)
_RULES = {
    **{f: _POSITIVE for f in ("vocab_size", "hidden_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size",
                              "n_groups", "conv_kernel", "chunk_size", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                              "moe_shared_expert_intermediate_size", "n_group", "topk_group", "intermediate_size",
                              "max_position_embeddings", "prefill_chunk_size")},
    **{f: _FLAG for f in ("use_conv_bias", "use_bias", "attention_bias", "norm_topk_prob", "mlp_bias",
                          "tie_word_embeddings")},
    "moe_latent_size": _Rule(int, 1, optional=True),
    "num_nextn_predict_layers": _Rule(int, 0),
    "bos_token_id": _Rule(int, 0, optional=True),
    "eos_token_id": _Rule(int, 0, optional=True, many=True),
    "pad_token_id": _Rule(int, 0, optional=True),
    "time_step_min": _Rule(float, 0, strict=True),      # the dt clamp, and its log starts the dt init
    "time_step_max": _Rule(float, 0, strict=True),
    "time_step_floor": _Rule(float, 0),
    "routed_scaling_factor": _Rule(float, 0, strict=True),
    "layer_norm_epsilon": _Rule(float, 0, strict=True),
    "initializer_range": _Rule(float, 0),
    "mamba_ssm_cache_dtype": _Rule(str, choices=DTYPES),
    "dtype": _Rule(str, choices=DTYPES, optional=True),
}
REQUIRED = ("vocab_size", "hidden_size", "layers_block_type")
_SPELLED = {"layers_block_type": "the layer pattern (hybrid_override_pattern or layers_block_type)"}
# HF's defaults where they differ from the dataclass's (which are Super's): a field a config.json
# omits means what it means to HF
_HF_DEFAULTS = dict(num_key_value_heads=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=7688,
                    moe_shared_expert_intermediate_size=7688, moe_latent_size=None, routed_scaling_factor=1.0,
                    intermediate_size=21504, num_nextn_predict_layers=0, max_position_embeddings=4096)
_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
           "mamba_dt_max": "time_step_max", "mamba_dt_init_floor": "time_step_floor",
           "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size"}
_ACTIVATIONS = {"mamba_hidden_act": ("silu", "swish"), "mlp_hidden_act": ("relu2",)}


def _check_relations(c: NemotronHConfig) -> None:
    """What the fields must satisfy together (each field already has its type and range)."""
    rules = [
        (c.mamba_num_heads % c.n_groups == 0, "n_groups", f"must divide mamba_num_heads {c.mamba_num_heads}"),
        (c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
         f"must divide num_attention_heads {c.num_attention_heads}"),
        (c.time_step_min <= c.time_step_max, "time_step_max", f"must be >= time_step_min {c.time_step_min}"),
        (c.n_routed_experts % c.n_group == 0, "n_group", f"must divide n_routed_experts {c.n_routed_experts}"),
        (c.n_group == 1 or c.n_routed_experts // c.n_group >= 2, "n_group",
         "groups are scored by their top-2 experts: n_routed_experts / n_group must be >= 2"),
        (c.topk_group <= c.n_group, "topk_group", f"must be <= n_group {c.n_group}"),
        (c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts // c.n_group), "num_experts_per_tok",
         f"must be <= the {c.topk_group * (c.n_routed_experts // c.n_group)} experts of topk_group {c.topk_group} "
         f"groups of n_routed_experts {c.n_routed_experts} / n_group {c.n_group}"),
    ]
    for ok, name, what in rules:
        if not ok:
            raise ValueError(f"{name}: {getattr(c, name)} {what}")


def _normalize_types(name: str, types, *, empty_ok: bool = False) -> list:
    """A layer pattern (a string of pattern characters, or a list of type names / characters) as a
    list of type names; an empty one is an error unless ``empty_ok``."""
    if isinstance(types, str):
        types = list(types)
    if not isinstance(types, (list, tuple)):
        raise TypeError(f"{name}: expected a pattern string or a list of layer types, got {type(types).__name__}")
    if not types and not empty_ok:
        raise ValueError(f"{name}: the layer pattern is empty")
    out = []
    for t in types:
        t = _CHAR_TO_TYPE.get(t, _ALIASES.get(t, t)) if isinstance(t, str) else t
        if not isinstance(t, str) or t not in _TYPE_TO_CHAR:
            raise ValueError(f"{name}: unknown layer type {t!r}; expected one of {sorted(_TYPE_TO_CHAR)} "
                             "or the pattern characters M, E, *, -")
        out.append(t)
    return out
_TINY = dict(vocab_size=256, hidden_size=64, layers_block_type=list("ME*EM-E"), mamba_num_heads=4, mamba_head_dim=16,
             ssm_state_size=16, n_groups=2, chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
             moe_shared_expert_intermediate_size=48, moe_latent_size=32, routed_scaling_factor=2.5,
             intermediate_size=48, num_nextn_predict_layers=1, max_position_embeddings=4096, dtype="float32")
# A scaled-down Super for training on the Python standard library on a CPU (``nemotron train``): the
# Super pattern's shape (Mamba-2 / LatentMoE pairs, two attention anchors) at width 64, a latent MoE
# with group-limited routing and a shared expert, one MTP block; about 1.6M parameters, of which the
# embeddings and lm_head hold 1M. Every linear is a multiple of 16 wide (NVFP4 training): in_proj
# 2 * 128 + 2 * 1 * 16 + 16 = 304; the Mamba out_proj (128 -> 64) is a multiple of 32 (MXFP8 under
# Super's recipe). Sized for ~1.3 s per NVFP4 step of 8 x 256 tokens on 2 CPU cores.
_STDLIB_TINY = dict(vocab_size=8192, hidden_size=64, layers_block_type=list("MEM*EME*E"), mamba_num_heads=16,
                    mamba_head_dim=8, ssm_state_size=16, n_groups=1, chunk_size=64, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
                    moe_intermediate_size=64, moe_shared_expert_intermediate_size=128, moe_latent_size=32,
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, intermediate_size=128,
                    num_nextn_predict_layers=1, max_position_embeddings=4096, dtype="float32")
PRESETS = {
    "super-120b-a12b": dict(),
    "nano-30b-a3b": dict(hidden_size=2688, layers_block_type=list(NANO_PATTERN), mamba_num_heads=64,
                         n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
                         moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
                         intermediate_size=1856, num_nextn_predict_layers=0),
    "tiny": _TINY,
    "tiny-nano": {**_TINY, "moe_latent_size": None, "num_nextn_predict_layers": 0, "layers_block_type": list("MEM*E")},
    "tiny-groups": {**_TINY, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "layers_block_type": list("M*EME")},
    "stdlib-tiny": _STDLIB_TINY,
}
