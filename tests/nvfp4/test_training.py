"""NVFP4 training (``nemotron/nvfp4/training.py``): operands bit for bit against an independent
emulation of Transformer Engine's recipe, outputs against that emulation, stochastic rounding
unbiased and reproducible, each recipe switch changing exactly what it names, training that works,
the modules, ``prepare_training_`` and errors."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nemotron
from nemotron import dispatch
from nemotron.nvfp4 import (MXFP8TrainingLinear, NVFP4Recipe, NVFP4TrainingLinear, mxfp8_training_linear,
                            nvfp4_training_linear)
from nemotron.nvfp4.training import final_layers, mxfp8_dequantize, mxfp8_quantize, training_operands
from tests.close import assert_equal, rms
from tests.nvfp4 import te_recipe as te

NAMES = ("x_row", "w_row", "x_col", "dy_row", "dy_col", "w_col")


def _data(m, k, n, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w = torch.randn(n, k, generator=g) * 0.05
    dy = (torch.randn(m, n, generator=g) * 1e-3).to(dtype)
    return x, w, dy


def _bytes(q):
    """(codes, scale bytes, global scale) of an NVFP4Tensor or an emulation triple."""
    if isinstance(q, tuple):
        return q[0], q[1].view(torch.uint8), q[2].float().reshape(())
    return q.codes, q.block_scales.view(torch.uint8), q.global_scale.float().reshape(())


def _assert_same_operand(got, want, name):
    for part, a, b in zip(("codes", "scales", "global scale"), _bytes(got), _bytes(want)):
        assert_equal(a, b, what=f"{name} {part}")


@settings(max_examples=8, deadline=None)
@given(m=st.sampled_from([16, 23, 48]), k=st.sampled_from([16, 64]), n=st.sampled_from([16, 32]),
       weight_2d=st.booleans(), rht=st.booleans(), seed=st.integers(0, 2**16))
def test_operands_are_te_recipe_bit_for_bit(m, k, n, weight_2d, rht, seed):
    x, w, dy = _data(m, k, n, seed)
    recipe = NVFP4Recipe(weight_2d=weight_2d, rht_wgrad=rht, stochastic_grads=False)
    ops = training_operands(x, w, dy, recipe=recipe)
    want = te.operands(x, w, dy, weight_2d=weight_2d, rht=rht)
    for name in NAMES:
        _assert_same_operand(getattr(ops, name), want[name], name)


def test_operands_under_the_triton_kernels_are_the_same_bytes():
    x, w, dy = _data(32, 64, 32, 5)
    recipe = NVFP4Recipe(stochastic_grads=False)
    want = te.operands(x, w, dy, weight_2d=True, rht=True)
    with dispatch.use("triton"):
        ops = training_operands(x, w, dy, recipe=recipe)
    for name in NAMES:
        _assert_same_operand(getattr(ops, name), want[name], name)


def _bound(a, b, out_dtype, bias=None):
    """|fp32 GEMM - fp64| <= 2 gamma_C (|a| @ |b|^T + |bias|) + one rounding to out_dtype: the
    products of E2M1 x E4M3 values are exact, only the fp32 summation order and the final rounding differ."""
    gamma = (a.shape[1] + 4) * 2.0 ** -24
    exact = a @ b.T
    mag = a.abs() @ b.abs().T
    if bias is not None:
        exact, mag = exact + bias.double(), mag + bias.double().abs()
    return exact, 2 * gamma * mag + torch.finfo(out_dtype).eps * exact.abs() + 1e-30


@pytest.mark.parametrize("weight_2d", [True, False])
@pytest.mark.parametrize("m", [16, 40])
def test_outputs_equal_the_emulation_up_to_fp32_order(weight_2d, m):
    k, n = 64, 32
    x, w, dy = _data(m, k, n, 3)
    recipe = NVFP4Recipe(weight_2d=weight_2d, stochastic_grads=False)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    bias = torch.randn(n, requires_grad=True)
    y = nvfp4_training_linear(xr, wr, bias, recipe=recipe)
    y.backward(dy)
    want = te.operands(x, w, dy, weight_2d=weight_2d, rht=True)
    d = {name: te.dequantize(v) for name, v in want.items()}
    exact, tol = _bound(d["x_row"], d["w_row"], x.dtype, bias.detach())
    assert y.dtype == x.dtype and ((y.double() - exact).abs() <= tol).all()
    exact, tol = _bound(d["dy_row"], d["w_col"].T.contiguous() if weight_2d else d["w_col"], x.dtype)
    assert xr.grad.dtype == x.dtype and ((xr.grad.double() - exact).abs() <= tol).all()
    exact, tol = _bound(d["dy_col"], d["x_col"], torch.float32)
    assert wr.grad.dtype == torch.float32 and ((wr.grad.double() - exact).abs() <= tol).all()
    assert_equal(bias.grad, dy.float().sum(0), what="bias grad: the fp32 sum of dy")


def test_gradients_follow_the_unquantized_ones():
    x, w, dy = _data(64, 128, 64, 1)
    xr, wr = x.float().requires_grad_(), w.clone().requires_grad_()
    nvfp4_training_linear(xr, wr, recipe=NVFP4Recipe()).backward(dy.float())
    # NVFP4 noise: ~10% relative RMS per operand (E2M1 has 1 mantissa bit), so < 0.35 for a product
    assert rms(xr.grad - dy.float() @ w) / rms(dy.float() @ w) < 0.35
    assert rms(wr.grad - dy.float().T @ x.float()) / rms(dy.float().T @ x.float()) < 0.35


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x, w, dy = _data(32, 32, 16, 2)
    recipe = NVFP4Recipe()
    g = torch.Generator().manual_seed(7)
    dws, dxs = [], []
    for _ in range(256):
        wr, xr = w.clone().requires_grad_(), x.clone().float().requires_grad_()
        nvfp4_training_linear(xr, wr, recipe=recipe, generator=g).backward(dy.float())
        dws.append(wr.grad)
        dxs.append(xr.grad)
    # the expectation over SR draws: the rounded operand replaced by its unrounded value (both
    # copies of dy are the SR ones; x and w keep their round-to-nearest copies)
    ops = training_operands(x.float(), w, dy.float(), recipe=dataclasses.replace(recipe, stochastic_grads=False))
    dy_rht = nemotron.nvfp4.hadamard(dy.float().t().contiguous())                      # [N, M]
    want_dw = dy_rht.double() @ ops.x_col.dequantize(torch.float64).T
    want_dx = dy.double() @ ops.w_row.dequantize(torch.float64)
    for draws, want, name in ((dws, want_dw, "dw"), (dxs, want_dx, "dx")):
        one = rms(draws[0].double() - want)
        mean = rms(torch.stack(draws).double().mean(0) - want)
        # 256 independent draws shrink the error of the mean ~16x; 0.2 leaves room for the
        # deterministic block scales, which the draws share
        assert mean < 0.2 * one, (name, mean, one)
    again = []
    for seed in (7, 7, 8):
        wr = w.clone().requires_grad_()
        nvfp4_training_linear(x.float(), wr, recipe=recipe, generator=torch.Generator().manual_seed(seed)).backward(
            dy.float())
        again.append(wr.grad)
    assert_equal(again[0], again[1], what="one generator state, one result")
    assert not torch.equal(again[0], again[2])


@pytest.mark.parametrize("switch, changed", [
    ("weight_2d", {"w_row", "w_col"}),
    ("rht_wgrad", {"x_col", "dy_col"}),
    ("stochastic_grads", {"dy_row", "dy_col"}),
])
def test_each_switch_changes_exactly_what_it_names(switch, changed):
    x, w, dy = _data(32, 64, 32, 4)
    base = NVFP4Recipe()
    flipped = dataclasses.replace(base, **{switch: not getattr(base, switch)})
    a = training_operands(x, w, dy, recipe=base, generator=torch.Generator().manual_seed(1))
    b = training_operands(x, w, dy, recipe=flipped, generator=torch.Generator().manual_seed(1))
    for name in NAMES:
        same = all(torch.equal(p, q) for p, q in zip(_bytes(getattr(a, name)), _bytes(getattr(b, name))))
        assert same == (name not in changed), (switch, name)


def _train_mlp(make, steps=150):
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    teacher = torch.randn(32, 16) / 32 ** 0.5
    y = torch.tanh(x @ teacher) + 0.5 * (x @ teacher)
    model = nn.Sequential(make(32, 64), nn.GELU(), make(64, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
    return loss.item()


def test_a_small_mlp_trains_close_to_its_high_precision_loss():
    base = _train_mlp(lambda i, o: nn.Linear(i, o))
    fp4 = _train_mlp(lambda i, o: NVFP4TrainingLinear(i, o))
    start = 0.8            # roughly the untrained loss of this regression
    # 4-bit operands add a noise floor; the stated factor: within 3x the fp32 loss, far below start
    assert fp4 < 3 * base + 1e-3 and fp4 < 0.2 * start, (fp4, base)


def test_modules_share_parameters_and_names_with_nn_linear():
    lin = nn.Linear(32, 16)
    t = NVFP4TrainingLinear.from_linear(lin, NVFP4Recipe())
    assert t.weight is lin.weight and t.bias is lin.bias
    assert list(t.state_dict()) == list(lin.state_dict())
    assert isinstance(t, nn.Linear) and "nvfp4" in repr(t)
    mx = MXFP8TrainingLinear.from_linear(nn.Linear(64, 32))
    assert list(mx.state_dict()) == ["weight", "bias"]


def test_prepare_training_applies_the_nemotron3_carve_outs():
    from nemotron.model import NemotronHConfig, NemotronHForCausalLM
    from nemotron.model.config import PRESETS
    cfg = NemotronHConfig(**{**PRESETS["tiny"], "mamba_num_heads": 16, "mamba_head_dim": 4})
    model = NemotronHForCausalLM.random(cfg, seed=0)
    before = {n: p for n, p in model.named_parameters()}
    nemotron.prepare_training_(model, NVFP4Recipe.nemotron3())
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert final_layers(7, 0.15) == 2 and final_layers(88, 0.15) == 14      # Super keeps 14 of 88
    assert kinds["backbone.layers.0.mixer.in_proj"] == "NVFP4TrainingLinear"
    assert kinds["backbone.layers.0.mixer.out_proj"] == "MXFP8TrainingLinear"
    assert kinds["backbone.layers.1.mixer.shared_experts.up_proj"] == "NVFP4TrainingLinear"
    for name in ("backbone.layers.1.mixer.fc1_latent_proj", "backbone.layers.2.mixer.q_proj",
                 "backbone.layers.2.mixer.o_proj", "backbone.layers.5.mixer.up_proj",          # final 2 of 7
                 "backbone.layers.6.mixer.shared_experts.up_proj", "mtp.layers.0.eh_proj", "lm_head"):
        assert kinds[name] == "Linear", name
    assert {n: p for n, p in model.named_parameters()} == before        # the same Parameters


def test_quantize_after_training_exports_the_trained_blocks():
    torch.manual_seed(0)
    lin = NVFP4TrainingLinear(64, 32, recipe=NVFP4Recipe(stochastic_grads=False))
    x = torch.randn(16, 64)
    y_train = lin(x)
    q = nemotron.quantize_(lin, "nvfp4", act_quant="nvfp4")
    want = nemotron.nvfp4.quantize(lin.weight.detach(), block_shape=(16, 16))
    assert_equal(q.weight, want.codes, what="exported codes are the 16x16-block training weight")
    # the same operands; the W4A4 inference path applies the global scales inside the dequantize
    assert rms(q(x) - y_train) / rms(y_train) < 1e-5


def test_mxfp8_quantize_definition():
    torch.manual_seed(0)
    x = torch.randn(4, 96) * torch.logspace(-6, 6, 96)
    x[1, :32] = 0
    q, s = mxfp8_quantize(x)
    e = s.int() - 127
    amax = x.reshape(4, 3, 32).abs().amax(-1)
    nz = amax > 0
    assert (amax <= 448 * torch.ldexp(torch.ones(e.shape), e))[nz].all()
    assert (amax > 448 * torch.ldexp(torch.ones(e.shape), e - 1))[nz].all()            # the smallest such e
    assert (e[~nz] == -127).all()
    back = mxfp8_dequantize(q, s)
    # E4M3 keeps 3 mantissa bits: each element within 2^-4 relative (or the block's subnormal step)
    step = torch.ldexp(torch.ones(e.shape), e - 9).repeat_interleave(32, 1)
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + step).all()


def test_mxfp8_training_linear_gradients():
    x, w, dy = _data(40, 64, 32, 6, torch.float32)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = mxfp8_training_linear(xr, wr)
    y.backward(dy)
    # E4M3 operands: ~2-3% relative RMS per operand
    assert rms(y - x @ w.T) / rms(x @ w.T) < 0.06
    assert rms(xr.grad - dy @ w) / rms(dy @ w) < 0.06
    assert rms(wr.grad - dy.T @ x) / rms(dy.T @ x) < 0.06


@pytest.mark.parametrize("args, match", [
    (dict(x=torch.randn(4, 24), weight=torch.randn(16, 24)), "multiples of 16"),
    (dict(x=torch.randn(4, 32), weight=torch.randn(20, 32)), "multiples of 16"),
    (dict(x=torch.randn(4, 32), weight=torch.randn(16, 48)), "x: expected a last dim of K = 48"),
    (dict(x=torch.ones(4, 32, dtype=torch.int32), weight=torch.randn(16, 32)), "x: expected dtype"),
    (dict(x=torch.randn(4, 32), weight=torch.randn(16, 32).double()), "weight: expected dtype"),
    (dict(x=torch.randn(4, 32), weight=torch.randn(16, 32), bias=torch.randn(8)), "bias: expected"),
    (dict(x=torch.randn(4, 32), weight=torch.randn(16, 32), recipe="nvfp4"), "recipe: expected an NVFP4Recipe"),
    (dict(x=torch.randn(4, 32), weight=torch.randn(16, 32), generator=3), "generator: expected"),
])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nvfp4_training_linear(**args)


def test_bad_recipes_and_layers():
    with pytest.raises(TypeError, match="weight_2d"):
        NVFP4Recipe(weight_2d=1)
    with pytest.raises(ValueError, match="high_precision_final"):
        NVFP4Recipe(high_precision_final=1.5)
    with pytest.raises(ValueError, match="multiples of 16"):
        NVFP4TrainingLinear(24, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        mxfp8_training_linear(torch.randn(2, 48), torch.randn(32, 48))
    with pytest.raises(ValueError, match="add it to recipe.high_precision"):
        nemotron.prepare_training_(nn.Sequential(nn.Linear(32, 20)))
    with pytest.raises(ValueError, match="high_precision_final"):
        nemotron.prepare_training_(nn.Sequential(nn.Linear(32, 16)), NVFP4Recipe(high_precision_final=0.5))
    seq = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 20))
    with pytest.raises(ValueError, match="^1: NVFP4 training needs"):
        nemotron.prepare_training_(seq)
    assert type(seq[0]) is nn.Linear                     # validated before the first swap


def test_training_experts_follow_the_float_experts_and_differentiate():
    from nemotron.nvfp4.training import nvfp4_training_experts
    g = torch.Generator().manual_seed(3)
    t, k, e, hdim, inter = 24, 2, 4, 32, 48
    x = torch.randn(t, hdim, generator=g).requires_grad_()
    up = (torch.randn(e, inter, hdim, generator=g) * 0.2).requires_grad_()
    down = (torch.randn(e, hdim, inter, generator=g) * 0.2).requires_grad_()
    logits = torch.randn(t, e, generator=g)
    ids = logits.topk(k, -1).indices.int()
    weights = logits.sigmoid().gather(1, ids.long()).requires_grad_()
    out = nvfp4_training_experts(x, weights, ids, up, down)
    want = torch.zeros(t, hdim)
    for j in range(k):
        for tok in range(t):
            ei = int(ids[tok, j])
            want[tok] += weights[tok, j].detach() * (down[ei].detach() @ torch.relu(up[ei].detach() @ x[tok].detach()) ** 2)
    # two NVFP4 GEMMs in a row: ~0.2 relative RMS at most
    assert rms(out.detach() - want) / rms(want) < 0.3
    out.square().sum().backward()
    for name, p in (("x", x), ("weights", weights), ("up", up), ("down", down)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    unused = set(range(e)) - set(ids.flatten().tolist())
    for ei in unused:
        assert up.grad[ei].abs().sum() == 0


@pytest.mark.gpu
def test_cuda_training_linear_equals_the_cpu_emulation():
    """On a GPU the fused row/col kernel writes the TE-recipe bytes and the GEMMs agree with the CPU
    run up to fp32 summation order (every quantized operand is the same bytes on both devices)."""
    x, w, dy = _data(100, 256, 128, 9)
    recipe = NVFP4Recipe(stochastic_grads=False)
    ops = training_operands(x.cuda(), w.cuda(), dy.cuda(), recipe=recipe)
    want = te.operands(x, w, dy, weight_2d=True, rht=True)
    for name in NAMES:
        _assert_same_operand(tuple(t.cpu() for t in _bytes(getattr(ops, name))), want[name], name)
    grads = []
    for dev in ("cpu", "cuda"):
        xr, wr = x.to(dev).clone().requires_grad_(), w.to(dev).clone().requires_grad_()
        y = nvfp4_training_linear(xr, wr, recipe=recipe)
        y.backward(dy.to(dev))
        grads.append((y.float().cpu(), xr.grad.float().cpu(), wr.grad.cpu()))
    for a, b in zip(*grads):
        # one bf16 rounding of differently ordered fp32 sums (TF32 products are exact here)
        assert rms(a - b) / rms(b) < 1e-2
