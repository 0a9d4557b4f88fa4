"""Checkpoint I/O that never loses data and says what is wrong: the atomic save, the checks on
what a load reads (paths, duplicates, broken files, dtypes) and checkpoints without MTP weights."""
import errno
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import nemotron
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.model.checkpoint import INDEX, CheckpointError


def _tiny(seed=0):
    return NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=seed)


def _same_weights(model, other):
    """Bitwise equal state dicts (fp8 compared as bytes: torch.equal has no fp8 kernel on CPU)."""
    a, b = model.state_dict(), other.state_dict()
    raw = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])) for k in a)


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---- the atomic save --------------------------------------------------------------------------

def test_disk_full_during_a_sharded_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = _tiny(seed=1)
    old.save_pretrained(str(path), max_shard_bytes=64 * 1024)
    before = sorted(os.listdir(path))
    real_save, calls = safetensors.torch.save_file, []

    def disk_full_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:
            return real_save(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:              # a partial file, then the disk is full
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        _tiny(seed=2).save_pretrained(str(path), max_shard_bytes=64 * 1024)
    assert len(calls) == 2 and not str(calls[1]).startswith(str(path) + os.sep)   # never wrote into the old one
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before and _leftovers(tmp_path) == []
    assert _same_weights(NemotronHForCausalLM.from_pretrained(str(path)), old)


def test_single_file_save_over_a_sharded_one_drops_the_stale_shards_and_keeps_user_files(tmp_path):
    path = tmp_path / "ckpt"
    _tiny(seed=1).save_pretrained(str(path), max_shard_bytes=64 * 1024)
    (path / "README.md").write_text("my notes")
    (path / "tokenizer.json").write_text("{}")
    (path / "extra").mkdir()
    (path / "extra" / "log.txt").write_text("kept")
    new = _tiny(seed=2)
    new.save_pretrained(str(path))
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "extra", "model.safetensors", "tokenizer.json"]
    assert (path / "README.md").read_text() == "my notes" and (path / "extra" / "log.txt").read_text() == "kept"
    assert _same_weights(NemotronHForCausalLM.from_pretrained(str(path)), new) and _leftovers(tmp_path) == []


def test_plain_save_over_an_nvfp4_one_drops_the_quant_config(tmp_path):
    q = nemotron.quantize_(_tiny(seed=1), "nvfp4", exclude=["lm_head"])
    q.save_pretrained(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "hf_quant_config.json").exists()
    plain = _tiny(seed=2)
    plain.save_pretrained(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt" / "hf_quant_config.json").exists()
    again = NemotronHForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert type(again.backbone.layers[0].mixer.in_proj) is torch.nn.Linear and _same_weights(again, plain)


def test_save_over_the_directory_the_model_was_loaded_from(tmp_path):
    _tiny(seed=3).save_pretrained(str(tmp_path / "ckpt"))
    m = NemotronHForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    nemotron.quantize_(m, "nvfp4-experts")
    m.save_pretrained(str(tmp_path / "ckpt"), max_shard_bytes=32 * 1024)
    again = NemotronHForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert again.backbone.layers[1].mixer.experts.quant == "nvfp4" and _same_weights(again, m)


# ---- what a load reads ------------------------------------------------------------------------

def _sharded(tmp_path, seed=4):
    path = tmp_path / "ckpt"
    _tiny(seed=seed).save_pretrained(str(path), max_shard_bytes=64 * 1024)
    return path, json.loads((path / INDEX).read_text())


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_index_entries_outside_the_checkpoint_are_refused(tmp_path, outside):
    path, index = _sharded(tmp_path)
    key, shard = next(iter(index["weight_map"].items()))
    (tmp_path / "elsewhere").mkdir()
    os.replace(path / shard, tmp_path / "elsewhere" / shard)       # the tensors exist, outside the checkpoint
    target = f"../elsewhere/{shard}" if outside == "relative" else str(tmp_path / "elsewhere" / shard)
    index["weight_map"] = {k: target if v == shard else v for k, v in index["weight_map"].items()}
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map entry .*elsewhere.* not a \.safetensors file inside"):
        NemotronHForCausalLM.from_pretrained(str(path))


def test_a_tensor_in_two_files_is_refused(tmp_path):
    _tiny(seed=5).save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:10]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in keys[9:]}, str(tmp_path / "model.safetensors"))    # keys[9] in both
    with pytest.raises(CheckpointError, match=rf"tensor {keys[9]} is in both a\.safetensors and model\.safetensors"):
        NemotronHForCausalLM.from_pretrained(str(tmp_path))


def test_a_shard_holding_a_tensor_the_index_puts_elsewhere_is_refused(tmp_path):
    path, index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    first, second = load_file(str(path / shards[0])), load_file(str(path / shards[1]))
    key = next(iter(second))
    save_file({**first, key: second[key]}, str(path / shards[0]))     # an old shard's copy of a tensor
    with pytest.raises(CheckpointError, match=rf"{shards[0]} holds {key}, which the index maps to {shards[1]}"):
        NemotronHForCausalLM.from_pretrained(str(path))


def _break(tmp_path, what):
    st = tmp_path / "model.safetensors"
    if what == "empty safetensors":
        st.write_bytes(b"")
    elif what == "truncated safetensors":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif what == "garbled safetensors":
        st.write_bytes(b"\x10\0\0\0\0\0\0\0{not json}" + st.read_bytes()[18:])
    elif what == "config.json":
        (tmp_path / "config.json").write_text('{"model_type": "nemotron_h",')
    elif what == "index":
        (tmp_path / INDEX).write_text("{weight_map: 1}")
    elif what == "index shape":
        (tmp_path / INDEX).write_text('{"weight_map": ["model.safetensors"]}')
    elif what == "hf_quant_config shape":
        (tmp_path / "hf_quant_config.json").write_text('{"quantization": "NVFP4"}')
    elif what == "hf_quant_config exclude":
        (tmp_path / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "NVFP4", '
                                                       '"exclude_modules": "lm_head"}}')
    elif what == "quantization_config shape":
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": ["NVFP4"]}))


@pytest.mark.parametrize("what, file, fault", [
    ("empty safetensors", "model.safetensors", "not a valid safetensors file"),
    ("truncated safetensors", "model.safetensors", "not a valid safetensors file"),
    ("garbled safetensors", "model.safetensors", "not a valid safetensors file"),
    ("config.json", "config.json", "not valid JSON"),
    ("index", INDEX, "not valid JSON"),
    ("index shape", INDEX, "expected {\"weight_map\""),
    ("hf_quant_config shape", "hf_quant_config.json", "expected {\"quantization\""),
    ("hf_quant_config exclude", "hf_quant_config.json", "exclude_modules must be a list"),
    ("quantization_config shape", "config.json", "quantization_config must be an object"),
])
def test_broken_files_are_errors_that_name_the_file(tmp_path, what, file, fault):
    _tiny(seed=6).save_pretrained(str(tmp_path))
    _break(tmp_path, what)
    with pytest.raises(CheckpointError) as info:
        NemotronHForCausalLM.from_pretrained(str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / file) in msg and fault in msg, msg


def _nvfp4_checkpoint(tmp_path):
    m = nemotron.quantize_(_tiny(seed=7), {"backbone.layers.0.mixer.in_proj": "nvfp4",
                                           "backbone.layers.2.mixer.o_proj": "fp8"})
    m.save_pretrained(str(tmp_path))
    return load_file(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("key, cast, want", [
    ("backbone.norm_f.weight", lambda t: t.long(), "a float tensor"),
    ("backbone.layers.0.norm.weight", lambda t: t.bool(), "a float tensor"),
    ("backbone.layers.0.mixer.in_proj.weight", lambda t: t.float(), "torch.uint8"),
    ("backbone.layers.0.mixer.in_proj.weight_scale", lambda t: t.view(torch.uint8), "torch.float8_e4m3fn"),
    ("backbone.layers.2.mixer.o_proj.weight", lambda t: t.to(torch.bfloat16), "torch.float8_e4m3fn"),
    ("backbone.layers.2.mixer.q_proj.weight", lambda t: t.to(torch.float8_e4m3fn), "a float tensor"),
    ("backbone.layers.0.mixer.in_proj.weight_scale_2", lambda t: t.to(torch.int32), "a float tensor"),
])
def test_tensors_of_the_wrong_dtype_are_refused_by_name(tmp_path, key, cast, want):
    sd = _nvfp4_checkpoint(tmp_path)
    got = cast(sd[key])
    sd[key] = got
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{key}: expected {want}.*got {got.dtype}"):
        NemotronHForCausalLM.from_pretrained(str(tmp_path))


def test_float_checkpoints_load_into_any_float_model_dtype(tmp_path):
    sd = _nvfp4_checkpoint(tmp_path)
    save_file({k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in sd.items()},
              str(tmp_path / "model.safetensors"))
    m = NemotronHForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert m.dtype == torch.float32
    assert torch.equal(m.backbone.norm_f.weight, sd["backbone.norm_f.weight"].to(torch.bfloat16).float())


# ---- checkpoints whose config has MTP but whose weights do not --------------------------------

def test_checkpoint_without_mtp_weights_loads_without_mtp_and_warns(tmp_path):
    m = _tiny(seed=8)
    m.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("mtp.")}, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"num_nextn_predict_layers = 1 .* no mtp\.\* tensors; loading without MTP"):
        again = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert again.mtp is None and again.config.num_nextn_predict_layers == 0
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(again(ids), m(ids))
    sd = {k: v for k, v in sd.items() if not k.startswith("mtp.layers.1.")}     # part of the MTP: an error
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing .* tensor\(s\).*mtp\.layers\.1"):
        NemotronHForCausalLM.from_pretrained(str(tmp_path))


def test_from_hf_with_mtp_in_the_config_warns_the_same_way():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.NemotronHConfig(
        vocab_size=96, hidden_size=64, hybrid_override_pattern="ME*", num_hidden_layers=3, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=32, intermediate_size=48, num_nextn_predict_layers=1)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match=r"hf_model: .* no mtp\.\* tensors; loading without MTP"):
        ours = NemotronHForCausalLM.from_hf(hf)
    assert ours.mtp is None
