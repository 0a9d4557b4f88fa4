"""Configs as HF writes them: every config HF accepts loads and runs; a wrong value is an error
naming its field (config, cache and generate arguments alike)."""
import dataclasses
import math
import warnings

import pytest
import torch

from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.model import config as config_mod

from .hf_tiny import hf_tiny

TINY = NemotronHConfig.preset("tiny")
IDS = torch.tensor([[1, 5, 7, 9, 11, 2, 3, 200, 17]])


DROP = object()


def _tiny_dict(**over) -> dict:
    """The tiny preset as the config.json it saves, with ``over`` applied (``DROP`` removes a key)."""
    return {k: v for k, v in {**TINY.to_dict(), **over}.items() if v is not DROP}


def _scaled(model, seed=0):
    """Unit-scale random weights (the 0.02 init leaves the logits nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


# ---- bad configs -----------------------------------------------------------------------------------

BAD_FIELDS = [          # (field overrides on the tiny preset, the field the error must name)
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(hidden_size=64.0), "hidden_size"),
    (dict(n_groups=0), "n_groups"),
    (dict(n_groups=3), "n_groups"),                    # does not divide 4 heads
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(conv_kernel=0), "conv_kernel"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(dtype="fp32"), "dtype"),
    (dict(mamba_ssm_cache_dtype="fp8"), "mamba_ssm_cache_dtype"),
    (dict(use_bias=1), "use_bias"),
    (dict(attention_bias="yes"), "attention_bias"),
    (dict(moe_latent_size=0), "moe_latent_size"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),      # 8 experts
    (dict(n_group=3), "n_group"),                              # does not divide 8 experts
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
    (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
    (dict(time_step_min=0.0), "time_step_min"),
    (dict(time_step_min=0.5, time_step_max=0.1), "time_step_max"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=[2, "3"]), "eos_token_id"),
    (dict(pad_token_id=1.5), "pad_token_id"),
    (dict(layers_block_type=[]), "layers_block_type"),
    (dict(layers_block_type=7), "layers_block_type"),
    (dict(layers_block_type=["M", ["E"]]), "layers_block_type"),
    (dict(mtp_layers_block_type=[]), "mtp_layers_block_type"),  # MTP on, no MTP layers
]


@pytest.mark.parametrize("over, field", BAD_FIELDS, ids=[f"{f}={list(o.values())[-1]!r}" for o, f in BAD_FIELDS])
def test_bad_field_is_refused_naming_it(over, field):
    with pytest.raises((ValueError, TypeError), match=rf"^{field}: "):
        dataclasses.replace(TINY, **over)
    with pytest.raises((ValueError, TypeError), match=rf"^{field}: "):      # the config.json path too
        NemotronHConfig.from_dict(_tiny_dict(**over))


BAD_DICTS = [           # (config.json dict, what the message must say)
    ({"model_type": "nemotron_h"}, r"missing required field\(s\): vocab_size; hidden_size; .*hybrid_override_pattern"),
    (_tiny_dict(layers_block_type=DROP, hybrid_override_pattern=DROP),
     r"missing .*hybrid_override_pattern or layers_block_type"),
    (_tiny_dict(vocab_size=DROP), r"missing required field\(s\): vocab_size \("),
    (_tiny_dict(layers_block_type=DROP, hybrid_override_pattern=""), r"^hybrid_override_pattern: .*empty"),
    (_tiny_dict(layers_block_type=DROP, hybrid_override_pattern="MX"), r"^hybrid_override_pattern: unknown"),
    (_tiny_dict(model_type="llama"), r"^model_type: "),
    (_tiny_dict(mlp_hidden_act="gelu"), r"^mlp_hidden_act: .*relu2"),
    (_tiny_dict(mamba_hidden_act="relu"), r"^mamba_hidden_act: "),
    (_tiny_dict(dtype=None, torch_dtype="fp32"), r"^dtype: "),
    (_tiny_dict(mamba_d_conv=0), r"^conv_kernel: "),           # HF's legacy name for it
    ([1, 2], r"^config: expected a dict"),
    ('{"vocab_size": 8}', r"^config: expected a dict"),
]


@pytest.mark.parametrize("d, match", BAD_DICTS)
def test_bad_config_json_is_refused(d, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NemotronHConfig.from_dict(d)


def test_every_field_has_a_rule():
    """A new field gets a type and range, or construction would not check it."""
    names = {f.name for f in dataclasses.fields(NemotronHConfig)}
    assert names - {"layers_block_type", "mtp_layers_block_type"} == set(config_mod._RULES)


def test_model_needs_a_config_object():
    with pytest.raises(TypeError, match="^config: "):
        NemotronHForCausalLM(TINY.to_dict())


# ---- configs HF accepts ----------------------------------------------------------------------------

HF_ACCEPTS = {          # config.json overrides on the tiny preset; each must load and run
    "chunk_size=8": dict(chunk_size=8),
    "chunk_size=17": dict(chunk_size=17),
    "chunk_size=29": dict(chunk_size=29),
    "chunk_size=100": dict(chunk_size=100),
    "conv_kernel=5": dict(conv_kernel=5),
    "conv_kernel=1": dict(conv_kernel=1),
    "attention_bias": dict(attention_bias=True),
    "model_type=nemotron_3": dict(model_type="nemotron_3"),
    "legacy mamba_ names": dict(mamba_d_conv=3, mamba_chunk_size=64, mamba_n_groups=1, mamba_dt_min=0.002),
    "torch_dtype": dict(dtype=DROP, torch_dtype="float32"),
    "int scaling factor": dict(routed_scaling_factor=2),
    "eos list, no pad": dict(eos_token_id=[2, 3], pad_token_id=None, bos_token_id=None),
    "pattern only": dict(layers_block_type=DROP),
    "MTP off, empty MTP pattern": dict(num_nextn_predict_layers=0, mtp_layers_block_type=DROP,
                                       mtp_hybrid_override_pattern=""),
}


@pytest.mark.parametrize("over", HF_ACCEPTS.values(), ids=HF_ACCEPTS.keys())
def test_hf_accepted_config_loads_and_runs(over):
    d = _tiny_dict(**over)
    transformers = pytest.importorskip("transformers")
    transformers.NemotronHConfig.from_dict(dict(d))          # the oracle: HF accepts this dict
    cfg = NemotronHConfig.from_dict(d)
    assert NemotronHConfig.from_dict(cfg.to_dict()) == cfg  # and it round-trips
    transformers.NemotronHConfig.from_dict(cfg.to_dict())   # what we write, HF reads (floats stay floats)
    with torch.no_grad():
        logits = NemotronHForCausalLM.random(cfg, seed=0)(IDS)
    assert logits.shape == (1, IDS.shape[1], 256) and torch.isfinite(logits).all()


def test_hf_legacy_names_are_read_as_hf_reads_them():
    cfg = NemotronHConfig.from_dict(_tiny_dict(**HF_ACCEPTS["legacy mamba_ names"]))
    assert (cfg.conv_kernel, cfg.chunk_size, cfg.n_groups, cfg.time_step_min) == (3, 64, 1, 0.002)
    assert NemotronHConfig.from_dict(_tiny_dict(dtype=None, torch_dtype="float16")).dtype == "float16"
    assert NemotronHConfig.from_dict(_tiny_dict(dtype="float32", torch_dtype="float16")).dtype == "float32"


def test_omitted_fields_take_hf_defaults():
    """A field a config.json leaves out means HF's default, not Super's."""
    transformers = pytest.importorskip("transformers")
    d = {"vocab_size": 96, "hidden_size": 64, "hybrid_override_pattern": "M*E"}
    ours, hf = NemotronHConfig.from_dict(d), transformers.NemotronHConfig.from_dict(dict(d))
    for f in dataclasses.fields(NemotronHConfig):
        if f.name in ("dtype", *config_mod.PACKAGE_FIELDS):
            continue      # dtype: HF None, ours None means bfloat16; PACKAGE_FIELDS: ours alone (HF ignores them)
        want = getattr(hf, f.name)
        assert getattr(ours, f.name) == (list(want) if isinstance(want, tuple) else want), f.name


def test_ints_where_floats_are_meant_are_stored_as_floats():
    """HF's strict config refuses an int for most float fields: what we write must be floats."""
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(TINY, time_step_floor=0, layer_norm_epsilon=1, initializer_range=0)
    assert [type(v) for v in (cfg.time_step_floor, cfg.layer_norm_epsilon, cfg.initializer_range)] == [float] * 3
    transformers.NemotronHConfig.from_dict(cfg.to_dict())


def test_num_hidden_layers_disagreeing_with_the_pattern_warns_and_the_pattern_wins():
    with pytest.warns(UserWarning, match=r"num_hidden_layers 3 .* 7 layers"):
        cfg = NemotronHConfig.from_dict(_tiny_dict(num_hidden_layers=3))
    assert cfg.num_hidden_layers == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # agreeing: no warning
        NemotronHConfig.from_dict(_tiny_dict(num_hidden_layers=7))


def test_config_chunk_size_does_not_change_the_logits():
    """The scan's result does not depend on the chunk; the tile is the package's, so the same
    weights give the same logits bit for bit whatever the config's chunk_size."""
    a = _scaled(NemotronHForCausalLM.random(dataclasses.replace(TINY, chunk_size=128), seed=0))
    b = NemotronHForCausalLM.random(dataclasses.replace(TINY, chunk_size=17), seed=1)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(b(ids), a(ids))


def _hf_checkpoint(path, **over):
    """A tiny HF transformers model with unit-scale weights, saved as HF writes it."""
    hf = hf_tiny(**over)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("over", [dict(attention_bias=True), dict(chunk_size=17), dict(conv_kernel=5)],
                         ids=["attention_bias", "chunk_size=17", "conv_kernel=5"])
def test_hf_checkpoint_of_such_a_config_loads_with_hf_logits(tmp_path, over):
    hf = _hf_checkpoint(tmp_path, **over)
    ours = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 96, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(ids), hf(ids, use_cache=False).logits
    # fp32 both; only the summation orders differ (HF's chunks, its expert loop)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= 1e-4 * scale, f"max error {err:.3g} > 1e-4 * {scale:.3g}"


# ---- cache and generate arguments ------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return _scaled(NemotronHForCausalLM.random(TINY, seed=2), seed=2)


@pytest.mark.parametrize("kw, match", [
    (dict(kv_dtype=torch.int8), r"^kv_dtype: "),
    (dict(kv_dtype="float16"), r"^kv_dtype: "),
    (dict(kv_dtype=torch.float64), r"^kv_dtype: "),
    (dict(ssm_dtype=torch.bfloat16), r"^ssm_dtype: "),
    (dict(ssm_dtype=torch.int32), r"^ssm_dtype: "),
    (dict(ssm_rounding="up"), r"^ssm_rounding: "),
])
def test_cache_options_are_checked(model, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.new_cache(1, 8, **kw)


@pytest.mark.parametrize("batch, max_len, field", [(True, 8, "batch"), (1, 0, "max_len"), (1, 8.0, "max_len")])
def test_cache_sizes_are_checked(model, batch, max_len, field):
    with pytest.raises((ValueError, TypeError), match=rf"^{field}: "):
        model.new_cache(batch, max_len)


BAD_GENERATE = [
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(mtp_draft_tokens=1.5), "mtp_draft_tokens"),
    (dict(mtp_draft_tokens=True), "mtp_draft_tokens"),
    (dict(mtp_draft_tokens=-1), "mtp_draft_tokens"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(prefill_chunk=2.0), "prefill_chunk"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(max_len=True), "max_len"),
    (dict(generator=0), "generator"),
    (dict(cache_kwargs=[("kv_dtype", torch.int8)]), "cache_kwargs"),
    (dict(cache_kwargs={"kv_dtype": torch.int8}), "kv_dtype"),
]


@pytest.mark.parametrize("kw, field", BAD_GENERATE, ids=[f"{f}={list(k.values())[0]!r}" for k, f in BAD_GENERATE])
def test_generate_arguments_are_checked(model, kw, field):
    with pytest.raises((ValueError, TypeError), match=rf"^{field}: "):
        model.generate(IDS, **{"max_new_tokens": 2, **kw})


def test_generate_input_ids_must_be_a_tensor(model):
    with pytest.raises(TypeError, match="^input_ids: "):
        model.generate([[1, 2, 3]], max_new_tokens=2)


def test_generate_stops_at_any_of_a_list_of_eos_ids(model):
    plain = model.generate(IDS, max_new_tokens=12)[0, IDS.shape[1]:].tolist()
    a, b = plain[6], plain[3]
    stop = min(plain.index(a), plain.index(b)) + 1
    for k in (0, 2):
        out = model.generate(IDS, max_new_tokens=12, eos_token_id=[a, b], mtp_draft_tokens=k)
        assert out[0, IDS.shape[1]:].tolist() == plain[:stop], k
