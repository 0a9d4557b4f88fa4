"""NVFP4 / FP8 edge inputs: an empty batch (M = 0) is valid input for every reference and op."""
import pytest
import torch

from nemotron import dispatch, nvfp4
from nemotron.nvfp4 import reference as ref

K, N = 32, 8
TINY = torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("shape", [(0, K), (3, 0, K)])
def test_fp8_references_on_empty_batches(shape):
    """amax of nothing is 0, so the dynamic scale is its floor (the smallest normal)."""
    x = torch.randn(shape)
    assert ref.fp8_scale(x).item() == TINY
    w = torch.randn(N, K)
    s_w = ref.fp8_scale(w)
    out = ref.fp8_linear_reference(x, ref.fp8_quantize_reference(w, s_w), s_w, None, torch.randn(N))
    assert out.shape == (*shape[:-1], N)


@pytest.mark.parametrize("shape", [(0, K), (3, 0, K)])
def test_nvfp4_references_on_empty_batches(shape):
    x = torch.randn(shape)
    assert ref.global_amax_reference(x).item() == 0.0
    for tile_rows in (1, 16):
        codes, scales, gs = ref.quantize_reference(x, tile_rows=tile_rows, hadamard=tile_rows == 1)
        assert codes.shape == (*shape[:-1], K // 2) and scales.shape == (*shape[:-1], K // 16) and gs.shape == ()
        assert ref.dequantize_reference(codes, scales, gs).shape == shape
    w = nvfp4.quantize(torch.randn(N, K))
    for act_quant in (False, True):
        out = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, act_quant=act_quant)
        assert out.shape == (*shape[:-1], N)
    assert ref.norm_reference(x, torch.ones(K), group_size=16, eps=1e-6).shape == shape


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(0, K), (3, 0, K)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_on_empty_batches(kernel_device, kernels, shape, dtype):
    d = torch.device("cpu") if kernels == "reference" else kernel_device
    x = torch.randn(shape, device=d).to(dtype)
    w = nvfp4.quantize(torch.randn(N, K, device=d))
    lin = torch.nn.Linear(K, N, dtype=dtype, device=d)
    w8, s8 = ref.fp8_quantize_reference(lin.weight, ref.fp8_scale(lin.weight)), ref.fp8_scale(lin.weight)
    with dispatch.use(kernels):
        assert nvfp4.fp8_linear(x, w8, s8).shape == (*shape[:-1], N)
        assert nvfp4.fp8_linear(x, w8, s8, torch.tensor(0.01, device=d), lin.bias.detach()).shape == (*shape[:-1], N)
        assert nvfp4.FP8Linear.from_linear(lin)(x).shape == (*shape[:-1], N)
        assert nvfp4.linear(x, w).shape == (*shape[:-1], N)
        assert nvfp4.linear(x, w, act_quant="nvfp4").shape == (*shape[:-1], N)
        assert nvfp4.linear(x, w, act_quant="nvfp4", input_scale=0.01).shape == (*shape[:-1], N)
        for kw in (dict(), dict(block_shape=(16, 16)), dict(hadamard=True), dict(rounding="stochastic")):
            q = nvfp4.quantize(x, **kw)
            assert q.codes.shape == (*shape[:-1], K // 2) and q.dequantize(dtype).shape == shape
        assert nvfp4.global_amax(x).item() == 0.0
        assert nvfp4.hadamard(x).shape == shape
