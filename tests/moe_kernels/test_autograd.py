"""Backward of the MoE ops (``nemotron.moe_kernels.autograd``): fp64 ``gradcheck`` through the public
functions, the same gradients whichever implementation ran the forward, and the LatentMoE layer's
parameter gradients against autograd through a plain-torch fp64 formulation of the layer."""
import math

import pytest
import torch
import torch.nn.functional as F

from nemotron import dispatch
from nemotron import moe_kernels as mk
from nemotron.moe_kernels import LatentMoE, fast
from nemotron.moe_kernels import reference as ref

from ..close import assert_close, assert_equal, assert_rel_rms, max_abs

E, K, H, I = 6, 2, 8, 12


def _rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


def _gradcheck(f, inputs, fast_mode=False):
    # the ops compute in fp64 for fp64 inputs: central differences at eps 1e-6 agree with the
    # analytical Jacobian to ~1e-9 here, while a wrong term in a backward is O(1e-1) off
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


def _experts_problem(t, seed=0, nvfp4=False, h=H, i=I):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, t, h)
    w, ids = mk.route(torch.randn(t, E, generator=g, dtype=torch.float64), top_k=K, scaling_factor=2.5)
    up, down = _rand(g, E, i, h, scale=0.4), _rand(g, E, h, i, scale=0.3)
    if nvfp4:
        up, down = mk.quantize_experts(up.detach().float()), mk.quantize_experts(down.detach().float())
    return x, w.detach().requires_grad_(), ids, up, down


@pytest.mark.parametrize("kw", [dict(), dict(renormalize=False, scaling_factor=2.5),
                                dict(n_group=2, topk_group=1, scaling_factor=5.0), dict(bias=True)],
                         ids=["plain", "no-renorm", "groups", "bias"])
def test_route_gradcheck(kw):
    kw = dict(kw)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.3 if kw.pop("bias", False) else None
    logits = _rand(g, 5, E)
    weights, _ = mk.route(logits, top_k=3, correction_bias=bias, **kw)
    assert weights.dtype == torch.float64 and weights.requires_grad
    _gradcheck(lambda lg: mk.route(lg, top_k=3, correction_bias=bias, **kw)[0], (logits,))


def test_route_gradient_is_zero_at_nan_logits():
    logits = torch.randn(3, E, dtype=torch.float64)
    logits[0, :E - 1] = math.nan                 # token 0 must route one NaN expert (weight 0)
    logits[1, 2] = math.nan
    logits.requires_grad_()
    w, ids = mk.route(logits, top_k=2, scaling_factor=2.0)
    w.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert_equal(logits.grad[torch.isnan(logits.detach())], torch.zeros(E, dtype=torch.float64), what="NaN grads")


def test_combine_gradcheck():
    slots = _rand(torch.Generator().manual_seed(2), 4 * K, H)
    _gradcheck(lambda s: mk.combine(s, K, torch.float64), (slots,))
    s32 = slots.detach().float().requires_grad_()
    mk.combine(s32, K, torch.bfloat16).float().sum().backward()
    assert s32.grad.dtype == torch.float32


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("fn", ["experts", "expert_slots"])
def test_experts_gradcheck(fn, t):
    x, w, ids, up, down = _experts_problem(t, seed=t)
    op = getattr(mk, fn)
    _gradcheck(lambda x_, w_, u_, d_: op(x_, w_, ids, u_, d_), (x, w, up, down))


@pytest.mark.parametrize("fn", ["experts", "expert_slots"])
def test_nvfp4_experts_gradcheck_and_no_weight_gradient(fn):
    """NVFP4 stacks are constants: gradients reach x and the routing weights only."""
    x, w, ids, up, down = _experts_problem(4, seed=3, nvfp4=True, h=16, i=16)     # NVFP4: widths of 16
    op = getattr(mk, fn)
    # fast mode (random projections of the Jacobian): the float-stack checks cover every element
    _gradcheck(lambda x_, w_: op(x_, w_, ids, up, down), (x, w), fast_mode=True)


def test_routed_experts_gradcheck():
    g = torch.Generator().manual_seed(4)
    x, logits = _rand(g, 5, H), _rand(g, 5, E)
    up, down = _rand(g, E, I, H, scale=0.4), _rand(g, E, H, I, scale=0.3)
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.2
    _gradcheck(lambda x_, l_, u_, d_: mk.routed_experts(x_, l_, u_, d_, top_k=3, correction_bias=bias,
                                                        scaling_factor=2.5), (x, logits, up, down))


def _grads(kernels, x, logits, up, down, g_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, logits, up, down)]
    with dispatch.use(kernels):
        w, ids = mk.route(leaves[1], top_k=K, scaling_factor=2.5)
        out = mk.combine(mk.expert_slots(leaves[0], w, ids, leaves[2], leaves[3]), K, x.dtype)
        fused = mk.routed_experts(leaves[0], leaves[1], leaves[2], leaves[3], top_k=K, scaling_factor=2.5)
    pair = torch.autograd.grad(out, leaves, g_out)
    return pair, torch.autograd.grad(fused, leaves, g_out)


def test_backward_does_not_depend_on_the_forward_implementation(kernel_device):
    g = torch.Generator().manual_seed(5)
    x, logits = torch.randn(7, 32, generator=g), torch.randn(7, E, generator=g)
    up, down = torch.randn(E, 48, 32, generator=g) / 6, torch.randn(E, 32, 48, generator=g) / 7
    g_out = torch.randn(7, 32, generator=g)
    want, want_fused = _grads("torch", x, logits, up, down, g_out)
    for name, got in zip(("x", "logits", "up", "down"), want_fused):    # the fused op: the same backward
        assert_equal(got, want[list(("x", "logits", "up", "down")).index(name)], what=f"fused d{name}")
    for kernels in ("reference", "triton"):
        d = kernel_device if kernels == "triton" else torch.device("cpu")
        got, _ = _grads(kernels, *(t.to(d) for t in (x, logits, up, down, g_out)))
        for name, a, b in zip(("x", "logits", "up", "down"), got, want):
            assert_equal(a.cpu(), b, what=f"d{name} after the {kernels} forward")


@pytest.mark.parametrize("nvfp4", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_traced_backward_formulation_equals_the_eager_one(per_token, nvfp4):
    """The static-shape backward (what AOTAutograd traces) against the per-expert loop, in fp64."""
    x, w, ids, up, down = _experts_problem(7, seed=11, nvfp4=nvfp4, h=16, i=32)
    grad = torch.randn(7 if per_token else 7 * K, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    args = (grad, per_token, x.detach(), w.detach(), ids, up, down)
    eager = fast.expert_slots_backward(*args, (True, True, True, True))
    static = fast._backward_static(*args, torch.float64, (True, True, not nvfp4, not nvfp4))
    for name, a, b in zip(("x", "weights", "up", "down"), static, eager):
        if b is None:
            assert nvfp4 and name in ("up", "down")
            continue
        # fp64, the same products summed in other orders
        assert_close(a.view(b.shape), b, atol=1e-12 * max_abs(b), what=f"d {name}")


def test_opcheck_with_gradients():
    """``torch.library.opcheck`` with inputs that need gradients: the registered autograd, and the
    backward traced by AOTAutograd (as torch.compile differentiates a graph) equal to eager."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    logits = torch.randn(5, E, generator=g, requires_grad=True)
    w, ids = mk.route(logits.detach(), top_k=K)
    w.requires_grad_()
    up = (torch.randn(E, 32, 16, generator=g) / 4).requires_grad_()
    down = (torch.randn(E, 16, 32, generator=g) / 6).requires_grad_()
    ops = torch.ops.nemotron
    torch.library.opcheck(ops.moe_route.default, (logits, K, torch.zeros(E), 2, 1, True, 2.0))
    torch.library.opcheck(ops.moe_combine.default, (torch.randn(10, 16, requires_grad=True), K, torch.float32))
    for op in (ops.moe_expert_slots.default, ops.moe_experts.default):
        torch.library.opcheck(op, (x, w, ids, up, None, None, down, None, None))
    torch.library.opcheck(ops.moe_routed_experts.default,
                          (x, logits, None, K, 1, 1, True, 2.5, up, None, None, down, None, None))


def test_compiled_layer_training_equals_eager():
    """One graph (fullgraph) for forward and backward of the layer, aot_eager: the eager gradients."""
    m = _layer(torch.float32)
    h = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(13))
    m(h).square().sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch._dynamo.reset()
    torch.compile(m, backend="aot_eager", fullgraph=True)(h).square().sum().backward()
    for n, p in m.named_parameters():
        # route + experts ops (eager: the fused op) and the traced backward's per-slot matmuls: fp32 orders
        assert_close(p.grad, want[n], atol=1e-5 * max_abs(want[n]), what=f"compiled d {n}")


def test_gradient_dtypes_follow_the_inputs():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 32, generator=g).bfloat16().requires_grad_()
    up = (torch.randn(E, 16, 32, generator=g) / 6).bfloat16().requires_grad_()
    down = (torch.randn(E, 32, 16, generator=g) / 4).bfloat16().requires_grad_()
    logits = torch.randn(6, E, generator=g, dtype=torch.bfloat16).requires_grad_()
    w, ids = mk.route(logits, top_k=K)
    mk.experts(x, w, ids, up, down).float().square().sum().backward()
    assert x.grad.dtype == up.grad.dtype == down.grad.dtype == logits.grad.dtype == torch.bfloat16
    assert all(bool(t.grad.abs().sum() > 0) for t in (x, up, down, logits))


def test_backward_of_an_empty_batch():
    x = torch.zeros(0, 16, requires_grad=True)
    logits = torch.zeros(0, E, requires_grad=True)
    up = torch.randn(E, 32, 16, requires_grad=True)
    down = torch.randn(E, 16, 32, requires_grad=True)
    mk.routed_experts(x, logits, up, down, top_k=K).sum().backward()
    assert x.grad.shape == (0, 16) and logits.grad.shape == (0, E)
    assert_equal(up.grad, torch.zeros_like(up), what="d up of no tokens")


# ---- the layer -------------------------------------------------------------------------------------

def _layer(dtype, latent=16, bias=False, seed=0):
    m = LatentMoE(24, num_experts=E, top_k=3, intermediate_size=16, shared_intermediate_size=20, latent_size=latent,
                  n_group=2, topk_group=2, scaling_factor=2.5, bias=bias, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
        m.gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    return m


def _plain_layer_grads(m, h, g_out, ids):
    """Autograd through the layer written in plain fp64 torch (routing ids given: they carry no gradient)."""
    p = {n: t.detach().double().requires_grad_() for n, t in m.named_parameters()}
    lin = lambda v, name: F.linear(v, p[name + ".weight"], p.get(name + ".bias"))  # noqa: E731
    x = h.detach().double().reshape(-1, 24)
    logits = x @ p["gate.weight"].T
    w = ref.route_weights_reference(logits, ids, renormalize=True, scaling_factor=2.5)
    xl = lin(x, "fc1_latent_proj") if m.latent_size else x
    if m.experts.quant is None:
        up, down = p["experts.up_proj"], p["experts.down_proj"]
    else:
        up, down = m.experts.weights()
    y = ref.expert_slots_grad_reference(xl, w, ids, up, down).view(x.shape[0], 3, -1).sum(1)
    y = lin(y, "fc2_latent_proj") if m.latent_size else y
    shared = lin(torch.relu(lin(x, "shared_experts.up_proj")).square(), "shared_experts.down_proj")
    out = (y + shared).view(h.shape)
    grads = torch.autograd.grad(out, list(p.values()), g_out.double())
    return dict(zip(p, grads))


def _layer_grads(m, h, g_out):
    m.zero_grad()
    out = m(h)
    out.backward(g_out)
    with torch.no_grad():
        x = h.reshape(-1, 24)
        _, ids = mk.route(m.gate(x), correction_bias=m.gate.e_score_correction_bias, **m.route_args)
    return {n: t.grad for n, t in m.named_parameters()}, ids


@pytest.mark.parametrize("latent, bias", [(16, False), (16, True), (None, False)], ids=["latent", "bias", "nano"])
def test_layer_gradients_equal_the_plain_fp64_layer(latent, bias):
    g = torch.Generator().manual_seed(7)
    h, g_out = torch.randn(2, 5, 24, generator=g, dtype=torch.float64), torch.randn(2, 5, 24, generator=g)
    m = _layer(torch.float64, latent, bias)
    got, ids = _layer_grads(m, h, g_out.double())
    want = _plain_layer_grads(m, h, g_out, ids)
    assert set(got) == set(want) and {"gate.weight", "experts.up_proj", "experts.down_proj"} <= set(got)
    for name, grad in got.items():
        # fp64 end to end (router included), the same math in other orders: ~1e-15 relative
        assert_close(grad, want[name], atol=1e-11 * max_abs(want[name]), what=f"d {name} (fp64 layer)")
    m32 = _layer(torch.float32, latent, bias)
    got32, ids32 = _layer_grads(m32, h.float(), g_out)
    want32 = _plain_layer_grads(m32, h.float(), g_out, ids32)
    for name, grad in got32.items():
        assert grad.dtype == torch.float32
        # fp32 forward and backward: ~1e-7 per rounding through ~10 ops and sums of <= 24 terms
        assert_rel_rms(grad, want32[name], 1e-5, what=f"d {name} (fp32 layer)")


def test_nvfp4_layer_trains_everything_but_the_experts():
    g = torch.Generator().manual_seed(8)
    m = _layer(torch.float32)
    m.experts.quantize_()
    h, g_out = torch.randn(9, 24, generator=g), torch.randn(9, 24, generator=g)
    got, ids = _layer_grads(m, h, g_out)
    assert not any(n.startswith("experts.") for n in got)       # the codes and scales are buffers
    want = _plain_layer_grads(m, h, g_out, ids)
    for name, grad in got.items():
        assert_rel_rms(grad, want[name], 1e-5, what=f"d {name}")   # fp32, as in the float layer


def test_moe_experts_module_is_differentiable():
    m = _layer(torch.float32)
    x, g = torch.randn(4, 16), torch.Generator().manual_seed(9)
    w, ids = mk.route(torch.randn(4, E, generator=g), top_k=3)
    w.requires_grad_()
    m.experts(x, w, ids).square().sum().backward()
    assert m.experts.up_proj.grad.abs().sum() > 0 and m.experts.down_proj.grad.abs().sum() > 0
    assert w.grad.shape == w.shape


class _OneRankGroup:
    def size(self):
        return 1

    def rank(self):
        return 0


def test_expert_parallel_forward_refuses_to_record_a_backward():
    m = LatentMoE(24, num_experts=E, top_k=2, intermediate_size=16, shared_intermediate_size=16, latent_size=16,
                  ep_group=_OneRankGroup())
    with pytest.raises(RuntimeError, match="forward only"):
        m(torch.randn(3, 24))
