"""The NVFP4Tensor container, ModelOpt names, and the 128x4 swizzled scale layout."""
import pytest
import torch
from hypothesis import given, strategies as st

import nemotron.nvfp4 as nvfp4
from nemotron.nvfp4 import NVFP4Tensor, swizzle_block_scales, unswizzle_block_scales

from ..close import assert_equal


def _t(rows=8, k=64):
    return nvfp4.quantize(torch.randn(rows, k, generator=torch.Generator().manual_seed(0)))


def test_container_fields_and_shapes():
    t = _t(8, 64)
    assert t.shape == (8, 64) and t.codes.shape == (8, 32) and t.block_scales.shape == (8, 4)
    assert t.codes.dtype == torch.uint8 and t.block_scales.dtype == torch.float8_e4m3fn
    assert t.global_scale.dtype == torch.float32 and t.global_scale.dim() == 0
    assert t.block_shape == (1, 16) and not isinstance(t, torch.Tensor)
    assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert_equal(t.to("cpu").codes, t.codes)
    assert t.device.type == "cpu"


def test_low_nibble_holds_element_zero():
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 6.0, -3.0           # codes 7 and 13 (sign 8 | 5)
    t = nvfp4.quantize(x)
    assert t.codes[0, 0].item() == 7 | (13 << 4)


def test_modelopt_round_trip():
    t = _t()
    sd = t.to_modelopt("model.layers.0.mlp.", input_scale=torch.tensor(0.5))
    assert set(sd) == {f"model.layers.0.mlp.{n}" for n in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
    sd["model.layers.0.mlp.weight_scale_2"] = sd["model.layers.0.mlp.weight_scale_2"].reshape(1)  # [1] also seen
    back = NVFP4Tensor.from_modelopt(sd, "model.layers.0.mlp.")
    assert_equal(back.dequantize(), t.dequantize())


def test_modelopt_missing_entry_is_named():
    sd = _t().to_modelopt()
    del sd["weight_scale"]
    with pytest.raises(KeyError, match="weight_scale"):
        NVFP4Tensor.from_modelopt(sd)


@pytest.mark.parametrize("make, match", [
    (lambda t: NVFP4Tensor(t.codes.int(), t.block_scales, t.global_scale), "codes"),
    (lambda t: NVFP4Tensor(t.codes, t.block_scales.float(), t.global_scale), "block_scales"),
    (lambda t: NVFP4Tensor(t.codes, t.block_scales[:, :2], t.global_scale), "block_scales"),
    (lambda t: NVFP4Tensor(t.codes, t.block_scales, t.global_scale.reshape(1)), "global_scale"),
    (lambda t: NVFP4Tensor(t.codes[:, :3], t.block_scales, t.global_scale), "multiple of 16"),
    (lambda t: NVFP4Tensor(t.codes, t.block_scales, t.global_scale, (2, 16)), "block_shape"),
])
def test_container_validates(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make(_t())


def test_swizzle_known_positions():
    """Scale (r, c) of a 128x4 tile lands at byte (r % 32) * 16 + (r // 32) * 4 + c (cuBLAS layout)."""
    m, s = 256, 8
    idx = torch.arange(m * s, dtype=torch.int32).reshape(m, s)
    sw = swizzle_block_scales(idx).flatten()
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (127, 3), (128, 0), (5, 4), (200, 7)]:
        tile = (r // 128) * (s // 4) + c // 4
        assert sw[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4].item() == idx[r, c].item()


@given(m=st.integers(1, 300), s=st.integers(1, 12), lead=st.sampled_from([(), (3,)]))
def test_swizzle_round_trip_with_padding(m, s, lead):
    x = torch.randint(0, 255, (*lead, m, s), dtype=torch.uint8).view(torch.float8_e4m3fn)
    sw = swizzle_block_scales(x)
    assert sw.shape == (*lead, -(-m // 128) * 128, -(-s // 4) * 4) and sw.dtype == x.dtype
    assert_equal(unswizzle_block_scales(sw, m, s).view(torch.uint8), x.view(torch.uint8))
    pad = sw.view(torch.uint8).sum() - x.view(torch.uint8).sum(dtype=torch.int64)
    assert pad == 0                                                             # padding is zero


def test_unswizzle_checks_shape():
    with pytest.raises(ValueError, match="swizzled"):
        unswizzle_block_scales(torch.zeros(128, 4), 200, 4)
