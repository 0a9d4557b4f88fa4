"""The torch NVFP4 linear (``fast.linear``, the CPU path of ``nemotron::nvfp4_linear``) against the reference."""
import contextlib

import torch
from hypothesis import example, given, settings, strategies as st

import nemotron
import nemotron.nvfp4 as nvfp4
from nemotron import dispatch
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.nvfp4 import fast
from nemotron.nvfp4 import reference as ref

from ..close import assert_close, max_abs
from ..strategies import seeds

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def _knobs(chunk: int, fp32_rows: int):
    """Row chunks of ``chunk // K`` rows and the bf16 GEMM above ``fp32_rows`` rows, inside the block."""
    old = fast.LINEAR_CHUNK, fast.LINEAR_FP32_ROWS
    fast.LINEAR_CHUNK, fast.LINEAR_FP32_ROWS = chunk, fp32_rows
    try:
        yield
    finally:
        fast.LINEAR_CHUNK, fast.LINEAR_FP32_ROWS = old


def _make(m, n, k, dtype, bias, tile_rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = nvfp4.quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3, block_shape=(tile_rows, 16))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _tolerance(x, w, b, want, bf16_gemm):
    """The reference's fp32-summation-order bound; the bf16 GEMM's bf16 output adds one bf16 rounding of
    the unscaled sums, at most 2^-8 * (|x| @ |w|.T) once scaled."""
    w32 = w.dequantize()
    tol = ref.gemm_tolerance(x.float(), w32, b, want)
    if bf16_gemm:
        tol = tol + 2.0 ** -8 * (x.abs().double() @ w32.abs().double().T)
    return tol


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 64), n16=st.integers(1, 8), k16=st.integers(1, 12), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), tile_rows=st.sampled_from([1, 16]), chunk=st.sampled_from([1 << 20, 300, 16]),
       fp32_rows=st.sampled_from([64, 0]), seed=seeds)
@example(m=1, n16=64, k16=16, dtype=torch.bfloat16, bias=False, tile_rows=1, chunk=1 << 20, fp32_rows=64, seed=0)
@example(m=33, n16=7, k16=3, dtype=torch.bfloat16, bias=True, tile_rows=16, chunk=300, fp32_rows=0, seed=1)
def test_fast_linear_matches_reference(m, n16, k16, dtype, bias, tile_rows, chunk, fp32_rows, seed):
    n, k = 16 * n16, 16 * k16
    x, w, b = _make(m, n, k, dtype, bias, tile_rows, seed)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, b)
    with _knobs(chunk, fp32_rows), dispatch.trace() as ran:
        got = nvfp4.linear(x, w, b)
    assert ran == [("nvfp4_linear", "torch")]
    assert got.dtype == dtype and got.shape == want.shape
    bf16_gemm = dtype == torch.bfloat16 and m > fp32_rows
    assert_close(got, want, atol=_tolerance(x, w, b, want, bf16_gemm), what=f"fast linear {dtype} bf16_gemm={bf16_gemm}")


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 8), dtype=st.sampled_from(DTYPES), static=st.booleans(), seed=seeds)
def test_fast_w4a4_matches_reference(m, dtype, static, seed):
    x, w, b = _make(m, 32, 64, dtype, True, 1, seed)
    scale = torch.tensor(0.003) if static else None
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, b, act_quant=True, input_scale=scale)
    got = fast.linear(x, w.codes, w.block_scales, w.global_scale, b, act_quant=True, input_scale=scale)
    x32 = ref.dequantize_reference(*ref.quantize_reference(x, global_scale=scale))
    # x32 is the reference's own (bit-equal quantizers), so only the fp32 summation order differs
    assert_close(got, want, atol=ref.gemm_tolerance(x32, w.dequantize(), b, want), what="fast W4A4")


def test_leading_dims_and_strided_rows():
    x, w, b = _make(6, 48, 64, torch.bfloat16, True, 1, 3)
    x3 = torch.cat([x, x], -1).view(2, 3, 128)[..., :64]           # rows strided, last dim contiguous
    want = ref.linear_reference(x3, w.codes, w.block_scales, w.global_scale, b)
    got = nvfp4.linear(x3, w, b)
    assert got.shape == (2, 3, 48)
    assert_close(got, want, atol=_tolerance(x3.reshape(6, 64), w, b, want.reshape(6, 48), False).view(2, 3, 48),
                 what="leading dims")


def test_nan_block_scale_propagates_like_the_reference():
    x, w, _ = _make(3, 32, 64, torch.float32, False, 1, 4)
    scales = w.block_scales.view(torch.uint8).clone()
    scales[5, 2] = 0x7F                                            # E4M3 NaN: output column 5 is NaN
    scales[9, 0] = 0xFF
    w = nvfp4.NVFP4Tensor(w.codes, scales.view(torch.float8_e4m3fn), w.global_scale, w.block_shape)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale)
    got = nvfp4.linear(x, w)
    assert torch.isnan(want[:, [5, 9]]).all() and torch.isnan(got[:, [5, 9]]).all()
    tol = ref.gemm_tolerance(x, torch.nan_to_num(w.dequantize(), nan=0.0), None, torch.nan_to_num(want))
    assert_close(got, want, atol=tol, equal_nan=True, what="NaN block scales")


def test_empty_inputs():
    x, w, b = _make(1, 32, 64, torch.bfloat16, True, 1, 5)
    got = nvfp4.linear(x[:0], w, b)
    assert got.shape == (0, 32) and got.dtype == torch.bfloat16


def test_weights_changed_in_place_are_seen():
    # nothing is cached between calls: a weight updated in place (load_state_dict) gives the new result
    x, w, _ = _make(2, 32, 64, torch.float32, False, 1, 6)
    first = nvfp4.linear(x, w)
    w2 = nvfp4.quantize(torch.randn(32, 64, generator=torch.Generator().manual_seed(7)))
    w.codes.copy_(w2.codes)
    w.block_scales.copy_(w2.block_scales)
    w.global_scale.copy_(w2.global_scale)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale)
    got = nvfp4.linear(x, w)
    assert_close(got, want, atol=ref.gemm_tolerance(x, w.dequantize(), None, want), what="after the update")
    assert (got - first).abs().max() > 0.1                           # the update did change the result


def test_cpu_dispatch_picks_torch():
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    assert dispatch.choose("nvfp4_linear", x, record=False).name == "torch"
    with dispatch.use("reference"):
        assert dispatch.choose("nvfp4_linear", x, record=False).name == "reference"


def test_quantized_tiny_model_decode_logits_match_reference_path():
    model = nemotron.quantize_(NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=0), "nvfp4")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def run():
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, j:j + 1], cache=cache) for j in range(6, 9)]
        return torch.cat(steps, 1).float()

    with dispatch.trace() as ran:
        got = run()
    assert ("nvfp4_linear", "torch") in ran
    with dispatch.use("reference"):
        want = run()
    # per linear only the fp32 summation order differs (rounded to the model's dtype); through the
    # layers that stays a few output roundings of the logits' scale
    assert_close(got, want, atol=2e-2 * max_abs(want), what="decode logits, torch vs reference NVFP4 linear")
