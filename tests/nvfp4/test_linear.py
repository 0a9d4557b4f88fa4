"""NVFP4 GEMM and linear layers against the fp32 reference; FP8 linear; quantize_ recipes."""
import pytest
import torch
from hypothesis import example, given, strategies as st
from torch import nn

import nemotron
import nemotron.nvfp4 as nvfp4
from nemotron.nvfp4 import FP8Linear, NVFP4Linear, NVFP4Tensor
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import gemm as gemm_kernels
from nemotron.nvfp4.triton import quantize as q_kernels

from ..close import assert_close, assert_equal, assert_rel_rms, rel_rms_error
from ..strategies import seeds


def _make(m, n, k, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2.0 ** torch.randint(-3, 4, (m, 1), generator=g)).to(dtype)
    w = torch.randn(n, k, generator=g) * 2.0 ** torch.randint(-6, 2, (n, 1), generator=g)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return x, nvfp4.quantize(w), b


dims = st.integers(1, 9).map(lambda b: 16 * b) | st.sampled_from([16 * 13, 16 * 21])


@given(m=st.integers(1, 300), n=dims, k=dims, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       with_bias=st.booleans(), w4a4=st.booleans(), static=st.booleans(), seed=seeds)
@example(m=1, n=64, k=128, dtype=torch.bfloat16, with_bias=False, w4a4=False, static=False, seed=0)
@example(m=65, n=48, k=80, dtype=torch.float16, with_bias=True, w4a4=True, static=True, seed=1)
def test_gemm_kernel_matches_reference(kernel_device, m, n, k, dtype, with_bias, w4a4, static, seed):
    x, w, b = _make(m, n, k, dtype, with_bias, seed)
    input_scale = (ref.global_amax_reference(x) / 2000).clamp(min=1e-30) if (w4a4 and static) else None
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, b, act_quant=w4a4, input_scale=input_scale)
    d = kernel_device
    args = (w.codes.to(d), w.block_scales.view(torch.uint8).to(d), w.global_scale.to(d), b.to(d) if with_bias else None)
    if w4a4:
        xc, xs, xg = q_kernels.quantize(x.to(d), tile_rows=1, global_scale=None if input_scale is None else input_scale.to(d),
                                        stochastic=False, seed=0, hadamard=False)
        got = gemm_kernels.gemm(xc, *args, x_scales=xs.view(torch.uint8), x_gs=xg, out_dtype=dtype)
        x32 = ref.dequantize_reference(*ref.quantize_reference(x, global_scale=input_scale))
    else:
        got = gemm_kernels.gemm(x.to(d), *args)
        x32 = x.float()
    assert got.dtype == dtype and got.shape == (m, n)
    assert_close(got, want, atol=ref.gemm_tolerance(x32, w.dequantize(), b, want), what="gemm")


@pytest.mark.parametrize("m, n, k", [(17, 512, 512), (32, 256, 512)])
def test_few_rows_on_64_row_tiles_match_reference(kernel_device, m, n, k):
    # 17..32 rows at BN >= 32 run one 64-row (wgmma) tile with the rows past M masked, split over K
    cfg = gemm_kernels.pick_config(m, n, k, gemm_kernels._num_sms(torch.device(kernel_device)))
    assert cfg.bm == 64 and cfg.bn >= gemm_kernels.WGMMA_MIN_BN and cfg.split > 1, cfg
    x, w, b = _make(m, n, k, torch.bfloat16, True, 5)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, b)
    d = kernel_device
    got = gemm_kernels.gemm(x.to(d), w.codes.to(d), w.block_scales.view(torch.uint8).to(d), w.global_scale.to(d), b.to(d))
    assert_close(got, want, atol=ref.gemm_tolerance(x.float(), w.dequantize(), b, want), what="gemm, 64-row tiles")


def test_persistent_grid_covers_every_tile(kernel_device, monkeypatch):
    """Fewer programs than output tiles: each program walks several tiles (grouped order)."""
    monkeypatch.setattr(gemm_kernels, "_num_sms", lambda device: 1)            # 2 programs
    x, w, b = _make(300, 272, 64, torch.float32, True, 5)                       # 3 x 3 tiles of 128
    got = gemm_kernels.gemm(x.to(kernel_device), w.codes.to(kernel_device),
                            w.block_scales.view(torch.uint8).to(kernel_device), w.global_scale.to(kernel_device),
                            b.to(kernel_device))
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, b)
    assert_close(got, want, atol=ref.gemm_tolerance(x.float(), w.dequantize(), b, want), what="gemm, 2 programs")


class _NeverLaunches:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_an_unwritten_output_fails_the_check(kernel_device, monkeypatch):
    """The GEMM's output starts as NaN (conftest's poison) and the check rejects NaN: a kernel that
    never writes a tile cannot pass. Here the kernel never runs at all."""
    monkeypatch.setattr(gemm_kernels, "_nvfp4_gemm_fwd_kernel", _NeverLaunches())
    x, w, _ = _make(200, 64, 64, torch.float32, False, 6)        # several M tiles: no split-K
    got = gemm_kernels.gemm(x.to(kernel_device), w.codes.to(kernel_device),
                            w.block_scales.view(torch.uint8).to(kernel_device), w.global_scale.to(kernel_device))
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale)
    assert torch.isnan(got).all()
    with pytest.raises(AssertionError, match="12800 NaN/inf in actual"):
        assert_close(got, want, atol=ref.gemm_tolerance(x.float(), w.dequantize(), None, want))


@given(m=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]), w4a4=st.booleans(), seed=seeds)
def test_public_linear_matches_reference(m, dtype, w4a4, seed):
    x, w, b = _make(m, 48, 96, dtype, True, seed)
    x = x.reshape(m, 1, 96)                                         # leading dims are flattened
    got = nvfp4.linear(x, w, b, act_quant="nvfp4" if w4a4 else None)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, b, act_quant=w4a4)
    assert got.shape == (m, 1, 48)
    x32 = ref.dequantize_reference(*ref.quantize_reference(x)) if w4a4 else x.float()
    tol = ref.gemm_tolerance(x32.reshape(m, 96), w.dequantize(), b, want.reshape(m, 48))
    assert_close(got.reshape(m, 48), want.reshape(m, 48), atol=tol, what="nvfp4.linear")


def test_w4a4_differs_from_w4a16():
    """The activation quantize really happens: W4A4 output is further from the bf16 product."""
    x, w, _ = _make(8, 64, 256, torch.float32, False, 3)
    exact = x @ w.dequantize().T
    assert_rel_rms(nvfp4.linear(x, w), exact, 1e-5, what="W4A16")       # fp32 GEMM of the same values
    e4 = rel_rms_error(nvfp4.linear(x, w, act_quant="nvfp4"), exact)
    assert 0.02 < e4 < 0.3, f"W4A4 relative RMS error {e4:.3g}: NVFP4 activations cost ~10%"


def test_opcheck_linear_ops():
    x, w, b = _make(5, 32, 64, torch.float32, True, 0)
    s = w.block_scales.view(torch.uint8)
    torch.library.opcheck(torch.ops.nemotron.nvfp4_linear.default, (x, w.codes, s, w.global_scale, b, False, None))
    torch.library.opcheck(torch.ops.nemotron.nvfp4_linear.default,
                          (x, w.codes, s, w.global_scale, None, True, torch.tensor(0.01)))
    lin = FP8Linear.from_linear(nn.Linear(64, 32))
    torch.library.opcheck(torch.ops.nemotron.fp8_linear.default, (x, lin.weight.view(torch.uint8), lin.weight_scale, None, b))


@pytest.mark.parametrize("call, match", [
    (lambda x, w: nvfp4.linear(x[:, :32], w), "does not match"),
    (lambda x, w: nvfp4.linear(x.int(), w), "dtype"),
    (lambda x, w: nvfp4.linear(x, w.codes), "NVFP4Tensor"),
    (lambda x, w: nvfp4.linear(x, w, torch.zeros(3)), "bias"),
    (lambda x, w: nvfp4.linear(x, w, act_quant="fp8"), "act_quant"),
    (lambda x, w: nvfp4.linear(x, w, input_scale=0.1), "input_scale"),
    (lambda x, w: nvfp4.linear(x, w, act_quant="nvfp4", input_scale=-1.0), "global_scale"),
    (lambda x, w: nvfp4.linear(x.to("meta"), w), "device"),
    (lambda x, w: nvfp4.linear(torch.randn(4, 40), w), "multiple of 16"),
    (lambda x, w: NVFP4Tensor(w.codes, w.block_scales[:, :-1], w.global_scale), "block_scales"),
    (lambda x, w: nvfp4.fp8_linear(x, w.codes, torch.tensor(1.0)), "float8_e4m3fn"),
    (lambda x, w: NVFP4Linear(40, 8), "multiple of 16"),
])
def test_linear_bad_input(call, match):
    x, w, _ = _make(4, 32, 64, torch.float32, False, 0)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


def test_nvfp4_linear_from_linear_round_trip():
    lin = nn.Linear(96, 40, bias=True)
    m = NVFP4Linear.from_linear(lin)
    w = nvfp4.quantize(lin.weight.detach())
    x = torch.randn(7, 96)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale, lin.bias.detach())
    assert_equal(m.weight, w.codes, what="codes")
    assert_equal(m.weight_scale.view(torch.uint8), w.block_scales.view(torch.uint8), what="block scales")
    assert_equal(m(x), want)                                  # CPU: the module runs the reference itself


def test_nvfp4_linear_loads_modelopt_state_dict():
    src = NVFP4Linear.from_linear(nn.Linear(64, 32, bias=False), act_quant="nvfp4", input_scale=0.02)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["weight_scale_2"] = sd["weight_scale_2"].reshape(1)       # checkpoints also store [1]
    dst = NVFP4Linear(64, 32, act_quant="nvfp4")
    assert dst.input_scale is None
    dst.load_state_dict(sd)
    assert dst.input_scale.item() == pytest.approx(0.02)
    x = torch.randn(3, 64)
    assert_equal(dst(x), src(x))
    assert set(sd) == {"weight", "weight_scale", "weight_scale_2", "input_scale"}


def test_fp8_linear_matches_reference_and_loads():
    lin = nn.Linear(64, 48)
    m = FP8Linear.from_linear(lin, input_scale=0.05)
    x = torch.randn(5, 64)
    want = ref.fp8_linear_reference(x, m.weight, m.weight_scale, m.input_scale, m.bias)
    assert_equal(m(x), want)
    assert_rel_rms(m(x), lin(x), 0.1)                             # FP8 E4M3: ~3 mantissa bits
    dst = FP8Linear(64, 48, bias=True, dtype=torch.float32)
    dst.load_state_dict({k: v.reshape(1) if v.dim() == 0 else v for k, v in m.state_dict().items()})
    assert_equal(dst(x), m(x))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.experts = nn.ModuleList([nn.Linear(32, 16) for _ in range(2)])
        self.mixer.shared_experts = nn.Linear(32, 16)
        self.lm_head = nn.Linear(32, 8)


def test_quantize_recipes():
    m = nemotron.quantize_(_Toy(), "nvfp4", exclude=("lm_head",))
    assert isinstance(m.mixer.experts[0], NVFP4Linear) and isinstance(m.mixer.shared_experts, NVFP4Linear)
    assert type(m.lm_head) is nn.Linear
    m = nemotron.quantize_(_Toy(), "nvfp4-experts")
    assert isinstance(m.mixer.experts[1], NVFP4Linear) and type(m.mixer.shared_experts) is nn.Linear
    m = nemotron.quantize_(_Toy(), {"mixer.experts.0": {"quant_algo": "NVFP4"}, "mixer.shared_experts": "fp8",
                                    "lm_head": "keep"}, act_quant="nvfp4")
    assert isinstance(m.mixer.experts[0], NVFP4Linear) and m.mixer.experts[0].act_quant == "nvfp4"
    assert type(m.mixer.experts[1]) is nn.Linear and isinstance(m.mixer.shared_experts, FP8Linear)
    assert type(m.lm_head) is nn.Linear


def test_quantize_weight_only_round_trip_against_reference():
    toy = _Toy()
    x = torch.randn(4, 32)
    refs = {n: ref.linear_reference(x, *(lambda t: (t.codes, t.block_scales, t.global_scale))(nvfp4.quantize(l.weight.detach())),
                                    l.bias.detach()) for n, l in toy.named_modules() if isinstance(l, nn.Linear)}
    nemotron.quantize_(toy, "nvfp4")
    for name, mod in toy.named_modules():
        if name in refs:
            assert_equal(mod(x), refs[name], what=name)


@pytest.mark.parametrize("recipe, match", [
    ("int4", "recipe"), ({"nope": "nvfp4"}, "not nn.Linear"), ({"lm_head": "int8"}, "unknown format"), (3, "recipe"),
])
def test_quantize_bad_recipe(recipe, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nemotron.quantize_(_Toy(), recipe)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 32, 64, 65, 512])
@pytest.mark.parametrize("n, k", [(18560, 4096), (4096, 8192), (2688, 1024), (1024, 2688)])
def test_gpu_gemm_nemotron_shapes(m, n, k):
    x, w, b = _make(m, n, k, torch.bfloat16, False, m)
    want = ref.linear_reference(x, w.codes, w.block_scales, w.global_scale)
    got = nvfp4.linear(x.cuda(), w.to("cuda"))
    assert_close(got, want, atol=ref.gemm_tolerance(x.float(), w.dequantize(), None, want), what=f"gemm {m}x{n}x{k}")


@pytest.mark.gpu
def test_gpu_fp8_linear_uses_scaled_mm_and_matches():
    lin = nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    m = FP8Linear.from_linear(lin, input_scale=0.01)
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    want = ref.fp8_linear_reference(x.cpu(), m.weight.cpu(), m.weight_scale.cpu(), m.input_scale.cpu(), m.bias.cpu())
    tol = ref.gemm_tolerance(ref.fp8_quantize_reference(x.cpu(), m.input_scale.cpu()).float() * 0.01,
                             m.weight.cpu().float() * m.weight_scale.cpu(), m.bias.cpu(), want)
    assert_close(m(x), want, atol=tol)
