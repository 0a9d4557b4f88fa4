"""``nemotron.quantize_``: validation before conversion (atomic), the root module, round trips of
quantized layers, and quantized storage that keeps its dtypes through module dtype casts."""
import pytest
import torch
from torch import nn

import nemotron
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.moe_kernels import LatentMoE
from nemotron.nvfp4 import FP8Linear, NVFP4Linear

from .close import assert_equal, assert_rel_rms


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 17))


def test_an_error_leaves_the_model_unconverted():
    m = _mlp()
    m.add_module("odd", nn.Linear(24, 8))          # in_features 24: not a multiple of 16
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="odd: in_features 24 is not a multiple of 16"):
        nemotron.quantize_(m, "nvfp4")
    assert all(type(mod) is not NVFP4Linear for mod in m.modules()), "layers converted before the error"
    for k, v in m.state_dict().items():
        assert_equal(v, before[k], what=k)


def test_a_bad_map_entry_leaves_the_model_unconverted():
    m = _mlp()
    with pytest.raises(ValueError, match="recipe: unknown format"):
        nemotron.quantize_(m, {"0": "nvfp4", "2": "int3"})
    assert type(m[0]) is nn.Linear


def test_root_linear_is_returned_converted_and_round_trips():
    lin = nn.Linear(64, 32, bias=True)
    q = nemotron.quantize_(lin, "nvfp4")
    assert isinstance(q, NVFP4Linear) and "" not in dict(q.named_children())
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale", "weight_scale_2", "bias"}, sorted(sd)
    back = NVFP4Linear(64, 32, bias=True, dtype=torch.float32)
    back.load_state_dict(sd)
    x = torch.randn(5, 64)
    assert_equal(back(x), q(x))
    f8 = nemotron.quantize_(nn.Linear(64, 32), {"": "fp8"})
    assert isinstance(f8, FP8Linear)


def test_random_nvfp4_model_has_no_empty_child_names_and_round_trips(tmp_path):
    cfg = NemotronHConfig.preset("tiny")
    m = NemotronHForCausalLM.random(cfg, seed=0, recipe="nvfp4")
    keys = list(m.state_dict())
    assert not [k for k in keys if ".." in k or k.endswith(".")], [k for k in keys if ".." in k][:3]
    assert isinstance(m.lm_head, NVFP4Linear)
    m.save_pretrained(tmp_path / "ckpt")
    back = NemotronHForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        assert_equal(back(ids), m(ids), what="logits after the round trip")


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16(),
                                  lambda m: m.to("cpu", torch.float16), lambda m: m.float()])
def test_module_dtype_casts_keep_quantized_storage(cast):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    nemotron.quantize_(m, {"0": "nvfp4", "1": "fp8"})
    m[1].input_scale = torch.tensor(0.02)
    moe = LatentMoE(64, num_experts=4, top_k=2, intermediate_size=32, shared_intermediate_size=32, latent_size=32)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.e_score_correction_bias.zero_()
    nemotron.quantize_(moe, "nvfp4-experts")
    before = {**{f"m.{k}": v.clone() for k, v in m.state_dict().items()},
              **{f"moe.{k}": v.clone() for k, v in moe.state_dict().items()}}
    cast(m)
    cast(moe)
    after = {**{f"m.{k}": v for k, v in m.state_dict().items()}, **{f"moe.{k}": v for k, v in moe.state_dict().items()}}
    storage = [k for k, v in before.items()
               if v.dtype in (torch.uint8, torch.float8_e4m3fn) or k.rsplit(".", 1)[-1] in ("weight_scale", "weight_scale_2", "input_scale")]
    assert len(storage) == 3 + 3 + 4 * 2 * 3, storage       # NVFP4 and FP8 linear, 4 NVFP4 experts x up/down
    for k in storage:                                       # float parameters follow the cast; these may not
        v = before[k]
        assert after[k].dtype == v.dtype, f"{k}: {v.dtype} became {after[k].dtype}"
        assert_equal(after[k], v, what=k)
    dt = m[0].bias.dtype
    x = torch.randn(3, 64, dtype=dt)
    y = m(x)                                                # the forward still runs, in the new compute dtype
    assert y.dtype == dt and torch.isfinite(y).all()
    assert moe(torch.randn(3, 64, dtype=dt)).dtype == dt


def test_quantized_model_to_bf16_still_matches_its_fp32_forward():
    cfg = NemotronHConfig.preset("tiny")
    m = NemotronHForCausalLM.random(cfg, seed=0, recipe="nvfp4")
    ids = torch.randint(3, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        want = m(ids)
        got = m.to(torch.bfloat16)(ids)
    # bf16 activations (8 mantissa bits) through the tiny model's layers; weights are the same codes
    assert_rel_rms(got.float(), want, 0.05, what="bf16 logits vs fp32 logits")
