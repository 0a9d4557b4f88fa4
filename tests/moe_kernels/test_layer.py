"""The LatentMoE layer against HF transformers' NemotronHMoE; checkpoint names; NVFP4 experts; errors."""

import pytest
import torch
from hypothesis import example, given, strategies as st

import nemotron
from nemotron import dispatch
from nemotron.moe_kernels import LatentMoE

from ..close import assert_close, assert_equal, max_abs
from ..strategies import seeds

hf_moe = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig  # noqa: E402


def _config(**kw):
    base = dict(hidden_size=64, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                moe_latent_size=32, moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5,
                mlp_hidden_act="relu2", layers_block_type=["moe"], num_hidden_layers=1)
    return NemotronHConfig(**{**base, **kw})


def _hf_layer(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    hf = hf_moe.NemotronHMoE(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        hf.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.05)
    return hf


@st.composite
def layer_configs(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    e = n_group * draw(st.integers(2, 4))
    topk_group = draw(st.integers(1, n_group))
    return dict(n_routed_experts=e, num_experts_per_tok=draw(st.integers(1, min(topk_group * (e // n_group), 6))),
                n_group=n_group, topk_group=topk_group, moe_latent_size=draw(st.sampled_from([None, 16, 32])),
                norm_topk_prob=draw(st.booleans()), mlp_bias=draw(st.booleans()))


@given(kw=layer_configs(), tokens=st.integers(1, 40), seed=seeds)
@example(kw=dict(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1, moe_latent_size=16,
                 norm_topk_prob=True, mlp_bias=False), tokens=33, seed=0)
def test_layer_matches_hf_nemotron_h_moe(kw, tokens, seed):
    cfg = _config(**kw)
    hf = _hf_layer(cfg, seed)
    ours = LatentMoE.from_config(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)       # HF's stacked in-memory names
    h = torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        want, got = hf(h), ours(h)
    assert got.shape == h.shape and got.dtype == h.dtype
    # fp32 throughout; HF adds its products and slots in other orders (and its experts in fp32, ours
    # in fp64): agreement to a few fp32 ulps of the output scale
    assert_close(got, want, atol=1e-5 * max_abs(want))


def test_kernel_path_matches_reference_path(kernel_device):
    cfg = _config(n_routed_experts=6, num_experts_per_tok=2)
    ours = LatentMoE.from_config(cfg)
    ours.load_state_dict(_hf_layer(cfg, 0).state_dict())
    h = torch.randn(3, 11, 64)
    with torch.no_grad():
        want = ours(h)
        with dispatch.use("triton"):
            got = ours.to(kernel_device)(h.to(kernel_device)).cpu()
    assert_close(got, want, atol=1e-5 * max_abs(want))      # fp32: the same math, another summation order


def test_state_dict_uses_checkpoint_names_and_round_trips():
    cfg = _config()
    ours = LatentMoE.from_config(cfg)
    ours.load_state_dict(_hf_layer(cfg, 1).state_dict())
    sd = ours.state_dict()
    assert sd["experts.7.up_proj.weight"].shape == (32, 32) and sd["experts.0.down_proj.weight"].shape == (32, 32)
    assert {"gate.weight", "gate.e_score_correction_bias", "fc1_latent_proj.weight", "fc2_latent_proj.weight",
            "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"} <= set(sd)
    assert not any(k in sd for k in ("experts.up_proj", "experts.down_proj"))
    again = LatentMoE.from_config(cfg)
    again.load_state_dict(sd, strict=True)
    h = torch.randn(5, 64)
    with torch.no_grad():
        assert_equal(again(h), ours(h))


def test_nvfp4_experts_layer_and_modelopt_names():
    cfg = _config()
    ours = LatentMoE.from_config(cfg)
    ours.load_state_dict(_hf_layer(cfg, 2).state_dict())
    h = torch.randn(7, 64)
    nemotron.quantize_(ours, "nvfp4-experts")
    assert ours.experts.quant == "nvfp4" and isinstance(ours.shared_experts.up_proj, torch.nn.Linear)
    sd = ours.state_dict()
    assert sd["experts.3.up_proj.weight"].dtype == torch.uint8 and sd["experts.3.up_proj.weight"].shape == (32, 16)
    assert sd["experts.3.up_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert sd["experts.3.up_proj.weight_scale"].shape == (32, 2)
    assert sd["experts.3.down_proj.weight_scale_2"].dtype == torch.float32 and sd["experts.3.down_proj.weight_scale_2"].dim() == 0
    # the quantized layer equals HF's layer holding the dequantized expert weights
    up, down = ours.experts.weights()
    hf_sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("experts.")}
    hf_sd["experts.up_proj"], hf_sd["experts.down_proj"] = up.dequantize(), down.dequantize()
    hf = hf_moe.NemotronHMoE(cfg)
    hf.load_state_dict(hf_sd)
    with torch.no_grad():
        want = hf(h)
        assert_close(ours(h), want, atol=1e-5 * max_abs(want))     # fp32, other summation orders
    # NVFP4 state dict loads into another NVFP4 layer bit for bit, input scales included
    sd["experts.0.up_proj.input_scale"] = torch.tensor(0.5)
    with pytest.raises(RuntimeError, match="input_scale: present for some experts only"):
        _quantized(cfg).load_state_dict(sd)
    for e in range(8):
        for p in ("up_proj", "down_proj"):
            sd[f"experts.{e}.{p}.input_scale"] = torch.tensor(0.25 + e)
    other = _quantized(cfg)
    other.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert_equal(other(h), ours(h))
    assert other.state_dict()["experts.5.down_proj.input_scale"].item() == 5.25


def _quantized(cfg):
    m = LatentMoE.from_config(cfg)
    m.experts.quantize_()
    return m


def test_quantize_mixed_map_per_expert_entries():
    cfg = _config(n_routed_experts=4)
    entries = {f"experts.{e}.{p}": {"quant_algo": "NVFP4"} for e in range(4) for p in ("up_proj", "down_proj")}
    m = LatentMoE.from_config(cfg)
    nemotron.quantize_(m, {**entries, "shared_experts.up_proj": "fp8"})
    assert m.experts.quant == "nvfp4" and type(m.shared_experts.up_proj).__name__ == "FP8Linear"
    entries.pop("experts.2.down_proj")
    with pytest.raises(ValueError, match="list all 8"):
        nemotron.quantize_(LatentMoE.from_config(cfg), entries)


def test_loader_reports_missing_extra_and_misshaped_entries():
    cfg = _config(n_routed_experts=4)
    sd = LatentMoE.from_config(cfg).state_dict()
    m = LatentMoE.from_config(cfg)
    bad = dict(sd)
    del bad["experts.2.down_proj.weight"]
    bad["experts.9.up_proj.weight"] = sd["experts.0.up_proj.weight"]
    result = m.load_state_dict(bad, strict=False)
    assert result.missing_keys == ["experts.2.down_proj.weight"]
    assert result.unexpected_keys == ["experts.9.up_proj.weight"]
    bad = dict(sd)
    bad["experts.1.up_proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(RuntimeError, match=r"experts\.1\.up_proj\.weight: expected a float tensor of shape \[32, 32\]"):
        m.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="NVFP4 experts"):
        _quantized(cfg).load_state_dict({**sd, "experts.up_proj": torch.zeros(4, 32, 32)}, strict=False)


def test_layer_without_latent_projection_is_nano_style():
    cfg = _config(moe_latent_size=None)
    ours = LatentMoE.from_config(cfg)
    assert isinstance(ours.fc1_latent_proj, torch.nn.Identity)
    assert ours.experts.up_proj.shape == (8, 32, 64)
    assert "fc1_latent_proj.weight" not in ours.state_dict()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="top_k"):
        LatentMoE(64, num_experts=4, top_k=5, intermediate_size=32, shared_intermediate_size=32)
