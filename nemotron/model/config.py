"""``NemotronHConfig``: the HF ``config.json`` of ``model_type: nemotron_h``, as a dataclass.

Reads both spellings of the layer pattern: ``hybrid_override_pattern`` ("M" Mamba-2, "E" MoE,
"*" attention, "-" MLP) and ``layers_block_type`` (``linear_attention`` / ``moe`` /
``full_attention`` / ``mlp``; older files say ``mamba`` / ``attention``), and likewise the MTP
pattern. Values of the presets: the architecture notes section 1.1 (Super and Nano config.json).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

_CHAR_TO_TYPE = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_TYPE_TO_CHAR = {v: k for k, v in _CHAR_TO_TYPE.items()}
_ALIASES = {"mamba": "linear_attention", "attention": "full_attention"}

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
    chunk_size: int = 128
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
    attention_bias: bool = False
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
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    dtype: str = "bfloat16"

    def __post_init__(self):
        self.layers_block_type = _normalize_types("layers_block_type", self.layers_block_type)
        self.mtp_layers_block_type = _normalize_types("mtp_layers_block_type", self.mtp_layers_block_type)
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"n_groups: {self.n_groups} must divide mamba_num_heads {self.mamba_num_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} must divide num_attention_heads "
                             f"{self.num_attention_heads}")

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
        d = dict(d)
        if d.get("model_type", "nemotron_h") != "nemotron_h":
            raise ValueError(f"config: expected model_type 'nemotron_h', got {d.get('model_type')!r}")
        for types, pattern in (("layers_block_type", "hybrid_override_pattern"),
                               ("mtp_layers_block_type", "mtp_hybrid_override_pattern")):
            if d.get(types) is None:
                d.pop(types, None)
                if d.get(pattern):
                    d[types] = list(d[pattern])
        if "mamba_n_groups" in d and "n_groups" not in d:
            d["n_groups"] = d["mamba_n_groups"]
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d["torch_dtype"]
        if "num_hidden_layers" in d and "layers_block_type" in d and d["num_hidden_layers"] != len(d["layers_block_type"]):
            raise ValueError(f"config: num_hidden_layers {d['num_hidden_layers']} does not match the "
                             f"{len(d['layers_block_type'])} layers of the pattern")
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
        (group-limited routing)."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


def _normalize_types(name: str, types) -> list:
    if isinstance(types, str):
        types = list(types)
    out = []
    for t in types:
        t = _CHAR_TO_TYPE.get(t, _ALIASES.get(t, t))
        if t not in _TYPE_TO_CHAR:
            raise ValueError(f"{name}: unknown layer type {t!r}; expected one of {sorted(_TYPE_TO_CHAR)} "
                             "or the pattern characters M, E, *, -")
        out.append(t)
    return out


_TINY = dict(vocab_size=256, hidden_size=64, layers_block_type=list("ME*EM-E"), mamba_num_heads=4, mamba_head_dim=16,
             ssm_state_size=16, n_groups=2, chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
             moe_shared_expert_intermediate_size=48, moe_latent_size=32, routed_scaling_factor=2.5,
             intermediate_size=48, num_nextn_predict_layers=1, max_position_embeddings=4096, dtype="float32")
PRESETS = {
    "super-120b-a12b": dict(),
    "nano-30b-a3b": dict(hidden_size=2688, layers_block_type=list(NANO_PATTERN), mamba_num_heads=64,
                         n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
                         moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
                         intermediate_size=1856, num_nextn_predict_layers=0),
    "tiny": _TINY,
    "tiny-nano": {**_TINY, "moe_latent_size": None, "num_nextn_predict_layers": 0, "layers_block_type": list("MEM*E")},
    "tiny-groups": {**_TINY, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "layers_block_type": list("M*EME")},
}
