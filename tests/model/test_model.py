"""The hybrid model: parity with HF transformers' NemotronHForCausalLM, caches, checkpoints, generation."""
import json
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nemotron
from nemotron import dispatch
from nemotron.model import NemotronHConfig, NemotronHForCausalLM

from ..close import assert_close, assert_equal, max_abs
from ..strategies import seeds

transformers = pytest.importorskip("transformers")

# fp32 end to end; HF adds in other orders (its experts in fp32, ours in fp64; its SSD chunked in
# fp32 like ours): agreement to ~1e-5 of the logits' scale (max |logit|) over a few layers
REL = 1e-4


def _hf_model(pattern, seed, *, latent=32, n_group=1, topk_group=1, k=2, experts=4, mamba_groups=2):
    cfg = transformers.NemotronHConfig(
        vocab_size=96, hidden_size=64, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern),
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=mamba_groups, chunk_size=16,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=experts,
        num_experts_per_tok=k, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
        moe_latent_size=latent, intermediate_size=48, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=2.5)
    torch.manual_seed(seed)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():        # weights large enough that every layer moves the logits
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) - 2.0)
    return hf


@st.composite
def hf_configs(draw):
    pattern = draw(st.sampled_from(["ME*E", "M*EM-", "*MEM", "MEME*", "EM*M"]))
    n_group = draw(st.sampled_from([1, 2]))
    return dict(pattern=pattern, latent=draw(st.sampled_from([None, 32])), n_group=n_group,
                topk_group=1, k=draw(st.integers(1, 2)), experts=4, mamba_groups=draw(st.sampled_from([1, 2, 4])))


@settings(max_examples=6)
@given(kw=hf_configs(), t=st.integers(1, 20), seed=seeds)
def test_logits_match_hf_prefill_and_decode(tmp_path_factory, kw, t, seed):
    hf = _hf_model(seed=seed % 1000, **kw)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    ours = NemotronHForCausalLM.from_pretrained(str(path))
    ids = torch.randint(0, 96, (2, t + 3), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        assert_close(ours(ids), want, atol=REL * max_abs(want), what="prefill")
        # our cached decode, step by step, against HF's full forward over each prefix (HF's own cache
        # is not the oracle: transformers 5.25's fails on patterns that do not start with a Mamba or
        # attention layer, its get_seq_length reading layer 0)
        cache = ours.new_cache(2, t + 3)
        ours(ids[:, :t], cache=cache)
        for j in range(t, t + 3):
            out = hf(ids[:, :j + 1], use_cache=False)
            assert_close(ours(ids[:, j:j + 1], cache=cache), out.logits[:, -1:], atol=REL * max_abs(out.logits),
                         what=f"decode step {j}")


def _tiny(seed=0, **over):
    cfg = NemotronHConfig.preset("tiny")
    for k, v in over.items():
        setattr(cfg, k, v)
    return NemotronHForCausalLM.random(cfg, seed=seed)


def _scaled(model, seed=0):
    """Random weights at unit scale (the 0.02 init leaves the logits nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def test_prefill_then_decode_equals_one_prefill():
    m = _scaled(_tiny())
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(ids)
        cache = m.new_cache(2, 40)
        got = [m(ids[:, :20], cache=cache)] + [m(ids[:, j:j + 1], cache=cache) for j in range(20, 30)]
        assert_close(torch.cat(got, 1), want, atol=1e-5 * max_abs(want), what="prefill 20 + 10 decode steps")
        # chunked prefill (chunks not multiples of the SSD chunk, crossing attention offsets)
        cache = m.new_cache(2, 40)
        got = [m(ids[:, s:s + 7], cache=cache) for s in range(0, 30, 7)]
        assert_close(torch.cat(got, 1), want, atol=1e-5 * max_abs(want), what="chunked prefill")


def test_generate_chunked_prefill_and_mtp_greedy_equal_plain_greedy():
    m = _scaled(_tiny(seed=1), seed=1)
    ids = torch.randint(3, 256, (1, 17), generator=torch.Generator().manual_seed(2))
    plain = m.generate(ids, max_new_tokens=20)
    assert plain.shape == (1, 37)
    assert_equal(plain[:, :17], ids, what="prompt")
    assert_equal(m.generate(ids, max_new_tokens=20, prefill_chunk=5), plain, what="chunked prefill")
    for k in (1, 3):
        out, stats = m.generate(ids, max_new_tokens=20, mtp_draft_tokens=k, output_stats=True)
        assert_equal(out, plain, what=f"MTP k={k}")
        assert stats.drafted == k * stats.rounds


def test_mtp_rollback_with_partially_correct_drafts():
    """A drafter that is right on some positions and wrong on others exercises every accept(n):
    the output must still equal plain greedy, and the acceptance must be what the drafter earned."""
    m = _scaled(_tiny(seed=3), seed=3)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    plain = m.generate(ids, max_new_tokens=25)[0].tolist()
    from nemotron.model import generate as gen
    real_draft = gen._draft_step

    def oracle_draft(model, tok, hidden, valid, last, cache, k):
        real_draft(model, tok, hidden, valid, last, cache, k)          # the cache's bookkeeping
        p = int(cache.mtp_pos[0])                     # positions caught up: draft i predicts position p + i
        drafts = [(plain[q] if q % 4 else (plain[q] + 1) % 256) if q < len(plain) else 0   # every 4th is wrong
                  for q in range(p + 1, p + k + 1)]
        return torch.tensor([drafts])

    with mock.patch.object(gen, "_draft_step", oracle_draft):
        out, stats = m.generate(ids, max_new_tokens=25, mtp_draft_tokens=3, output_stats=True)
    assert out[0].tolist() == plain
    assert 0 < stats.accepted < stats.drafted and stats.tokens_per_round > 1.5


def test_cache_options_fp8_kv_and_fp16_ssm_state():
    m = _scaled(_tiny(seed=5), seed=5)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = m(ids)
        for kw in ({"kv_dtype": torch.float8_e4m3fn}, {"ssm_dtype": torch.float16},
                   {"ssm_dtype": torch.float16, "ssm_rounding": "stochastic"}):
            cache = m.new_cache(1, 24, **kw)
            got = torch.cat([m(ids[:, :16], cache=cache)] + [m(ids[:, j:j + 1], cache=cache) for j in range(16, 24)], 1)
            # fp8 keys/values (3 mantissa bits) and fp16 states perturb the logits by a few percent
            assert_close(got, want, atol=0.1 * max_abs(want), what=str(kw))
            assert not torch.equal(got, want)                 # the option really changes the numerics
    with pytest.raises(ValueError, match="ssm_rounding"):
        m.new_cache(1, 8, ssm_rounding="up")


def test_stochastic_rounding_is_unbiased():
    from nemotron.model.cache import HybridCache
    c = HybridCache(NemotronHConfig.preset("tiny"), 1, 4, ssm_dtype=torch.float16, ssm_rounding="stochastic")
    x = torch.full((200000,), 1.0 + 2.0 ** -12)                   # a quarter of an fp16 ulp above 1
    y = c.round_state(x).float()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2.0 ** -10}
    assert abs(y.mean().item() - x[0].item()) < 2e-6               # 4 sigma of the sampling noise


def test_save_load_round_trip_single_and_sharded(tmp_path):
    m = _scaled(_tiny(seed=7), seed=7)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        want = m(ids)
    m.save_pretrained(str(tmp_path / "one"))
    m.save_pretrained(str(tmp_path / "shards"), max_shard_bytes=64 * 1024)
    assert os.path.exists(tmp_path / "shards" / "model.safetensors.index.json")
    cfg = json.load(open(tmp_path / "one" / "config.json"))
    assert cfg["model_type"] == "nemotron_h" and cfg["hybrid_override_pattern"] == "ME*EM-E"
    for sub in ("one", "shards"):
        again = NemotronHForCausalLM.from_pretrained(str(tmp_path / sub))
        with torch.no_grad():
            assert_equal(again(ids), want, what=sub)
    assert any(k.startswith("mtp.layers.0.eh_proj") for k in again.state_dict())


def test_quantize_save_load_round_trip_with_modelopt_names(tmp_path):
    m = _scaled(_tiny(seed=8), seed=8)
    recipe = {"backbone.layers.0.mixer.in_proj": "fp8", "backbone.layers.2.mixer.o_proj": "nvfp4"}
    recipe.update({f"backbone.layers.1.mixer.experts.{e}.{p}": {"quant_algo": "NVFP4"}
                   for e in range(8) for p in ("up_proj", "down_proj")})
    nemotron.quantize_(m, recipe)
    o_proj = m.backbone.layers[2].mixer.o_proj          # W4A4 with a static (calibrated) input scale
    o_proj.act_quant, o_proj.input_scale = "nvfp4", torch.tensor(0.01)
    ids = torch.randint(0, 256, (1, 13))
    with torch.no_grad():
        want = m(ids)
    m.save_pretrained(str(tmp_path))
    from safetensors import safe_open
    f = safe_open(str(tmp_path / "model.safetensors"), "pt")
    dt = lambda k: f.get_slice(k).get_dtype()  # noqa: E731
    assert dt("backbone.layers.1.mixer.experts.5.up_proj.weight") == "U8"
    assert dt("backbone.layers.1.mixer.experts.5.up_proj.weight_scale") == "F8_E4M3"
    assert dt("backbone.layers.1.mixer.experts.5.up_proj.weight_scale_2") == "F32"
    assert dt("backbone.layers.0.mixer.in_proj.weight") == "F8_E4M3"
    assert dt("backbone.layers.2.mixer.o_proj.weight") == "U8" and dt("backbone.layers.2.mixer.o_proj.input_scale") == "F32"
    assert f.get_slice("backbone.layers.2.mixer.o_proj.weight").get_shape() == [64, 32]
    assert dt("backbone.layers.3.mixer.experts.0.up_proj.weight") == "F32"     # not in the recipe
    q = json.load(open(tmp_path / "hf_quant_config.json"))["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["quantized_layers"]["backbone.layers.0.mixer.in_proj"]["quant_algo"] == "FP8"
    again = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert again.backbone.layers[2].mixer.o_proj.act_quant == "nvfp4"
    assert again.backbone.layers[1].mixer.experts.quant == "nvfp4"
    with torch.no_grad():
        assert_equal(again(ids), want)


def test_uniform_nvfp4_modelopt_config_with_exclusions(tmp_path):
    hq = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                             "exclude_modules": ["lm_head", "*.q_proj", "mtp*"]}}
    # an NVFP4 export of this model: quantize it ourselves, then relabel the config as uniform NVFP4
    q = _scaled(_tiny(seed=9), seed=9)
    nemotron.quantize_(q, "nvfp4", exclude=["lm_head", "*.q_proj", "mtp*"])
    q.save_pretrained(str(tmp_path))
    json.dump(hq, open(tmp_path / "hf_quant_config.json", "w"))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("quantization_config")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    loaded = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert type(loaded.backbone.layers[0].mixer.in_proj).__name__ == "NVFP4Linear"
    assert type(loaded.backbone.layers[2].mixer.q_proj).__name__ == "Linear"
    assert loaded.backbone.layers[1].mixer.experts.quant == "nvfp4"
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert_equal(loaded(ids), q(ids))


def _saved_tiny(tmp_path):
    m = _tiny(seed=10)
    m.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    return load_file(str(tmp_path / "model.safetensors")), save_file


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("backbone.layers.0.mixer.A_log"), r"missing 1 tensor\(s\).*layers\.0\.mixer\.A_log"),
    (lambda sd: sd.pop("backbone.layers.1.mixer.experts.3.down_proj.weight"), r"missing.*experts\.3\.down_proj"),
    (lambda sd: sd.__setitem__("backbone.layers.0.mixer.extra", torch.zeros(2)), r"unexpected.*mixer\.extra"),
    (lambda sd: sd.__setitem__("backbone.layers.0.mixer.in_proj.weight", torch.zeros(3, 64)), r"in_proj\.weight"),
])
def test_loader_errors_name_the_tensor(tmp_path, edit, match):
    sd, save_file = _saved_tiny(tmp_path)
    edit(sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises((ValueError, RuntimeError), match=match):
        NemotronHForCausalLM.from_pretrained(str(tmp_path))


def test_unknown_quantization_entry_is_reported(tmp_path):
    _tiny(seed=11).save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                                  "quantized_layers": {"backbone.layers.0.mixer.in_proj": {"quant_algo": "INT4_AWQ"}}}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.in_proj.*INT4_AWQ"):
        NemotronHForCausalLM.from_pretrained(str(tmp_path))


def test_config_presets_and_hf_spellings():
    sup = NemotronHConfig.preset("super-120b-a12b")
    assert sup.num_hidden_layers == 88 and sup.hybrid_override_pattern.count("E") == 40
    assert sup.conv_dim == 10240 and sup.mamba_intermediate + sup.conv_dim + sup.mamba_num_heads == 18560
    nano = NemotronHConfig.preset("nano-30b-a3b")
    assert nano.num_hidden_layers == 52 and nano.moe_latent_size is None
    d = NemotronHConfig.from_dict({"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 64,
                                   "hybrid_override_pattern": "M*E",
                                   "mtp_hybrid_override_pattern": "*E", "layers_block_type": None})
    assert d.layers_block_type[1] == "full_attention"
    old = NemotronHConfig.from_dict({"vocab_size": 64, "hidden_size": 64,
                                     "layers_block_type": ["mamba", "attention", "moe"]})
    assert old.hybrid_override_pattern == "M*E"
    assert NemotronHConfig.from_dict(sup.to_dict()) == sup
    with pytest.raises(ValueError, match="preset"):
        NemotronHConfig.preset("giant")
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        NemotronHConfig.from_dict({"hybrid_override_pattern": "MX"})


def test_random_builds_quantized_units():
    m = NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), recipe="nvfp4-experts", seed=0)
    assert m.backbone.layers[1].mixer.experts.quant == "nvfp4" and m.mtp.layers[1].mixer.experts.quant == "nvfp4"
    assert isinstance(m.backbone.layers[1].mixer.shared_experts.up_proj, torch.nn.Linear)


def test_kernel_path_matches_reference_path(kernel_device):
    m = _scaled(_tiny(seed=12), seed=12)
    ids = torch.randint(0, 256, (1, 19))
    with torch.no_grad():
        want = m(ids)
        with dispatch.use("triton"):
            got = m.to(kernel_device)(ids.to(kernel_device)).cpu()
    assert_close(got, want, atol=1e-4 * max_abs(want), what="triton kernels (fp32)")


def test_generate_bad_arguments():
    m = _tiny()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="mtp_draft_tokens: 2 drafts need a model with an MTP block"):
        NemotronHForCausalLM.random(NemotronHConfig.preset("tiny-nano")).generate(ids, max_new_tokens=2,
                                                                                 mtp_draft_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        m(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="max_len"):
        cache = m.new_cache(1, 2)
        m(ids, cache=cache)


def test_cli_quantize_then_generate(tmp_path, capsys):
    from nemotron.__main__ import main
    m = _scaled(_tiny(seed=13), seed=13)
    m.save_pretrained(str(tmp_path / "bf16"))
    assert main(["quantize", "--model", str(tmp_path / "bf16"), "--recipe", "nvfp4", "--out", str(tmp_path / "q")]) == 0
    q = json.load(open(tmp_path / "q" / "hf_quant_config.json"))["quantization"]["quantized_layers"]
    assert "backbone.layers.0.mixer.in_proj" in q and "lm_head" not in q and not any(k.startswith("mtp.") for k in q)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q"), "--ids", "5,6,7", "--max-new-tokens", "4", "--mtp", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    want = NemotronHForCausalLM.from_pretrained(str(tmp_path / "q")).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert [int(t) for t in out.split(",")] == want[0, 3:].tolist()


def test_model_benchmark_runs():
    from bench import model as bench_model
    assert bench_model.main(["--preset", "tiny", "--impls", "reference", "--prefill", "8", "--contexts", "16",
                             "--steps", "1", "--no-save", "--max-len", "24,64"]) == 0
    assert bench_model.main(["--mtp", "0,2", "--batch", "1,2", "--prompts", "2", "--new-tokens", "4", "--reps", "1",
                             "--no-save"]) == 0
    assert bench_model.main(["--prefill-memory", "256,512", "--prefill-chunks", "128", "--no-save"]) == 0


@pytest.mark.gpu
def test_tiny_model_on_gpu_kernels_match_reference_and_mtp_is_exact():
    m = _scaled(_tiny(seed=14), seed=14).cuda()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(15)).cuda()
    with torch.no_grad():
        got = m(ids)
        with dispatch.use("reference"):
            want = m(ids)
    assert_close(got, want, atol=1e-3 * max_abs(want), what="GPU kernels (fp32, tf32-free) vs reference")
    assert_equal(m.generate(ids, max_new_tokens=16, mtp_draft_tokens=3), m.generate(ids, max_new_tokens=16))


def test_fp8_modelopt_checkpoint_with_fp8_experts(tmp_path):
    """ModelOpt FP8 (the Hopper checkpoint): FP8 linears load as FP8Linear, FP8 routed experts are
    dequantized (weight * weight_scale, exact in fp32) into the float expert stack."""
    from safetensors.torch import load_file, save_file
    from nemotron.nvfp4 import reference as nref
    m = _scaled(_tiny(seed=16), seed=16)
    linears = {n: "fp8" for n, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and n != "lm_head" and not n.startswith("mtp.")}
    nemotron.quantize_(m, linears)
    m.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    for key in [k for k in sd if ".mixer.experts." in k and k.startswith("backbone.") and k.endswith(".weight")]:
        w = sd[key]
        scale = nref.fp8_scale(w)
        sd[key] = nref.fp8_quantize_reference(w, scale)
        sd[key[:-len("weight")] + "weight_scale"] = scale.reshape(())
        with torch.no_grad():                  # the expected model holds exactly the dequantized values
            mod_name, e, proj = key[:-len(".weight")].rsplit(".", 2)
            stack = m.get_submodule(mod_name)
            getattr(stack, proj)[int(e)] = sd[key].float() * scale
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("quantization_config")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    json.dump({"quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head", "mtp*"]}},
              open(tmp_path / "hf_quant_config.json", "w"))
    loaded = NemotronHForCausalLM.from_pretrained(str(tmp_path))
    assert type(loaded.backbone.layers[0].mixer.in_proj).__name__ == "FP8Linear"
    assert loaded.backbone.layers[1].mixer.experts.quant is None
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert_equal(loaded(ids), m(ids))


def test_generate_eos_and_sampling():
    m = _scaled(_tiny(seed=17), seed=17)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(18))
    plain = m.generate(ids, max_new_tokens=12)[0, 12:].tolist()
    eos = plain[4]
    stop = plain.index(eos) + 1                                   # the first time eos appears
    for k in (0, 2):
        out = m.generate(ids, max_new_tokens=12, eos_token_id=eos, mtp_draft_tokens=k)[0, 12:].tolist()
        assert out == plain[:stop], k
    # sampling: reproducible with a generator, a different stream gives different tokens, MTP included
    runs = [m.generate(ids, max_new_tokens=16, temperature=1.0, top_p=0.9, mtp_draft_tokens=k,
                       generator=torch.Generator().manual_seed(s)) for k, s in ((0, 1), (0, 1), (0, 2), (2, 1))]
    assert_equal(runs[0], runs[1], what="the same generator")
    assert not torch.equal(runs[0], runs[2])
    assert runs[3].shape == (1, 28) and int(runs[3].max()) < 256
    # batch > 1 without MTP: finished rows continue with the pad token
    two = torch.cat([ids, ids.flip(1)])
    out = m.generate(two, max_new_tokens=12, eos_token_id=eos)
    assert out[0, 12:12 + stop].tolist() == plain[:stop]
    assert (out[0, 12 + stop:] == m.config.pad_token_id).all()


def test_cli_generate_with_a_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from nemotron.__main__ import main
    vocab = {f"w{i}": i for i in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    m = _scaled(_tiny(seed=19), seed=19)
    m.save_pretrained(str(tmp_path))
    tok.save(str(tmp_path / "tokenizer.json"))
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w5 w6 w7", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out.strip().splitlines()[-1]
    want = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=m.config.eos_token_id)[0, 3:]
    assert text == tok.decode(want.tolist())
