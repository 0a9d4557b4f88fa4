"""Config fields that change the model: ``tie_word_embeddings`` (lm_head is the embedding table)
and ``mamba_ssm_cache_dtype`` (the default SSM state dtype of a model's cache)."""
import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemotron
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.nvfp4.linear import NVFP4Linear

from .hf_tiny import hf_tiny
from ..close import assert_close, assert_equal, max_abs

TINY = NemotronHConfig.preset("tiny")
TIED = dataclasses.replace(TINY, tie_word_embeddings=True)
IDS = torch.tensor([[1, 5, 7, 9, 11, 2, 3, 200, 17]])
# fp32 both; HF adds in other orders (its SSD chunks, its expert loop): ~1e-5 of the logits' scale
REL = 1e-4
FILE_LAYOUTS = ["both, equal", "table only", "head only"]


def _tied(model) -> bool:
    return model.lm_head.weight is model.backbone.embeddings.weight


def _hf_tied(head_is_table: bool):
    """A tiny transformers NemotronH with ``tie_word_embeddings=True`` and unit-scale weights.
    Transformers 5 builds its head untied whatever the flag says; ``head_is_table`` copies the
    table into it, the weights a tying implementation runs."""
    hf = hf_tiny(num_hidden_layers=4, tie_word_embeddings=True)
    if head_is_table:
        with torch.no_grad():
            hf.lm_head.weight.copy_(hf.model.embeddings.weight)
    return hf


def _check_logits(ours, hf, what):
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        assert_close(ours(ids), want, atol=REL * max_abs(want), what=what)


# ---- tie_word_embeddings ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", FILE_LAYOUTS)
def test_hf_tied_checkpoint_loads_tied_with_hf_logits(tmp_path, layout):
    """HF writes both tensors (equal here); older remote code wrote the table alone; either name
    alone is the one tensor too."""
    hf = _hf_tied(head_is_table=True)
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    sd = load_file(file)
    assert torch.equal(sd["lm_head.weight"], sd["backbone.embeddings.weight"])      # what HF wrote
    drop = {"both, equal": None, "table only": "lm_head.weight", "head only": "backbone.embeddings.weight"}[layout]
    if drop:
        save_file({k: v for k, v in sd.items() if k != drop}, file, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # one tensor: nothing to warn about
        ours = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert _tied(ours) and ours.config.tie_word_embeddings
    _check_logits(ours, hf, f"tied checkpoint, {layout}")


def test_hf_head_that_is_not_the_table_loads_untied_with_hf_logits(tmp_path):
    """Transformers 5 runs (and saves) its own head under a tied config: ours loads it as it is."""
    hf = _hf_tied(head_is_table=False)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"tie_word_embeddings = true but lm_head.weight is not the embedding"):
        ours = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert not _tied(ours) and not ours.config.tie_word_embeddings
    _check_logits(ours, hf, "untied head under a tied config")
    ours.save_pretrained(str(tmp_path / "again"))                 # the config now says what the weights are
    assert json.load(open(tmp_path / "again" / "config.json"))["tie_word_embeddings"] is False


@pytest.mark.parametrize("head_is_table", [True, False], ids=["head is the table", "head of its own"])
def test_from_hf_of_a_tied_config(head_is_table):
    hf = _hf_tied(head_is_table)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = NemotronHForCausalLM.from_hf(hf)
    assert _tied(ours) == head_is_table
    assert any("not the embedding table" in str(w.message) for w in seen) != head_is_table
    _check_logits(ours, hf, "from_hf")


def test_random_tied_model_round_trips_and_hf_reads_it(tmp_path):
    model = NemotronHForCausalLM.random(TIED, seed=3)
    assert _tied(model)
    with torch.no_grad():
        model.backbone.embeddings.weight.normal_(generator=torch.Generator().manual_seed(0))   # logits not flat
        want = model(IDS)
    model.save_pretrained(str(tmp_path))
    sd = load_file(tmp_path / "model.safetensors")
    assert torch.equal(sd["lm_head.weight"], sd["backbone.embeddings.weight"])   # as transformers writes it
    again = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert _tied(again)
    with torch.no_grad():
        assert_equal(again(IDS), want)
    transformers = pytest.importorskip("transformers")
    hf = transformers.NemotronHForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        got = hf(IDS, use_cache=False).logits
    assert_close(got, want, atol=REL * max_abs(want), what="transformers reading our tied save")


def test_tie_survives_to_empty_and_assign_loads():
    sd = NemotronHForCausalLM.random(TIED, seed=1).state_dict()
    with torch.device("meta"):
        model = NemotronHForCausalLM(TIED)
    assert _tied(model)
    model.to_empty(device="cpu")
    assert _tied(model)
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    assert _tied(model) and torch.equal(model.lm_head.weight, sd["backbone.embeddings.weight"])
    model.load_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"})    # strict: the table suffices
    assert _tied(model)


def test_quantizing_a_tied_model_keeps_the_head_float_and_tied(tmp_path):
    built = NemotronHForCausalLM.random(TIED, seed=0, recipe="nvfp4")
    swapped = nemotron.quantize_(NemotronHForCausalLM.random(TIED, seed=0), "nvfp4")
    for model in (built, swapped):
        assert _tied(model) and model.lm_head.weight.dtype == model.dtype
        assert isinstance(model.backbone.layers[0].mixer.in_proj, NVFP4Linear)
    swapped.save_pretrained(str(tmp_path))
    q = json.load(open(tmp_path / "hf_quant_config.json"))["quantization"]["quantized_layers"]
    assert "lm_head" not in q
    again = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert _tied(again)
    with torch.no_grad():
        assert_equal(again(IDS), swapped(IDS))
    with pytest.raises(ValueError, match=r"recipe: .*'lm_head'.*tied lm_head"):
        NemotronHForCausalLM.random(TIED, seed=0, recipe={"lm_head": "nvfp4"})


def test_random_mapping_recipe_naming_the_head_quantizes_it():
    """A unit named by itself in a mixed map (the untied lm_head) is converted, not skipped."""
    model = NemotronHForCausalLM.random(TINY, seed=0, recipe={"lm_head": "nvfp4"})
    assert isinstance(model.lm_head, NVFP4Linear)
    with pytest.raises(ValueError, match=r"recipe: 1 name\(s\) .*'backbone.nope'"):
        NemotronHForCausalLM.random(TINY, seed=0, recipe={"backbone.nope": "nvfp4"})


# ---- mamba_ssm_cache_dtype ------------------------------------------------------------------------

def _ssm_dtypes(cache) -> set:
    return {t.dtype for t in cache.ssm.values()}


@pytest.mark.parametrize("name, want", [("float32", torch.float32), ("float16", torch.float16)])
def test_cache_ssm_dtype_follows_the_config(tmp_path, name, want):
    model = NemotronHForCausalLM.random(dataclasses.replace(TINY, mamba_ssm_cache_dtype=name), seed=0)
    assert _ssm_dtypes(model.new_cache(1, 8)) == {want}
    assert _ssm_dtypes(model.new_cache(1, 8, ssm_dtype=torch.float32)) == {torch.float32}   # explicit wins
    assert _ssm_dtypes(model.new_cache(1, 8, ssm_dtype=torch.float16)) == {torch.float16}
    model.save_pretrained(str(tmp_path))                                          # and from a config.json
    assert _ssm_dtypes(NemotronHForCausalLM.from_pretrained(str(tmp_path)).new_cache(1, 8)) == {want}


def test_bfloat16_ssm_config_keeps_float32_states_and_says_so():
    model = NemotronHForCausalLM.random(dataclasses.replace(TINY, mamba_ssm_cache_dtype="bfloat16"), seed=0)
    with pytest.warns(UserWarning, match=r"^mamba_ssm_cache_dtype: .*using float32"):
        cache = model.new_cache(1, 8)
    assert _ssm_dtypes(cache) == {torch.float32}
    model.config.mamba_ssm_cache_dtype = "fp8"                 # edited after validation
    with pytest.raises(ValueError, match=r"^mamba_ssm_cache_dtype: "):
        model.new_cache(1, 8)
