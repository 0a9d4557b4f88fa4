"""The ``torch`` path of the routed experts (fp32 grouped matmuls, ``nemotron.moe_kernels.fast``) against
the fp64 references: values within the fp32 error bound, slots that depend only on the rows their
expert multiplies (what keeps expert parallelism exact), the bit-equal fast routing, fp64 inputs."""
import math

import pytest
import torch
from hypothesis import example, given, strategies as st

from nemotron import dispatch
from nemotron import moe_kernels as mk
from nemotron.moe_kernels import LatentMoE, fast
from nemotron.moe_kernels import reference as ref
from nemotron.nvfp4.format import NVFP4Tensor
from nemotron.nvfp4.reference import dequantize_reference

from ..close import assert_close, assert_equal, assert_rel_rms, max_abs
from ..strategies import seeds


@st.composite
def problems(draw):
    e = draw(st.integers(1, 10))
    nvfp4 = draw(st.booleans())
    # widths that are multiples of 16 take the grouped matmul, others the per-expert loop
    width = st.integers(1, 4).map(lambda b: 16 * b) if nvfp4 else st.one_of(st.integers(1, 4).map(lambda b: 16 * b),
                                                                            st.integers(1, 40))
    return dict(t=draw(st.sampled_from([1, 1, 2, 5, 37])), e=e, k=draw(st.integers(1, min(e, 4))), h=draw(width),
                i=draw(width), dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                nvfp4=nvfp4, skew=draw(st.sampled_from(["random", "one_expert", "half_empty"])), seed=draw(seeds))


def _inputs(p, dtype=None):
    g = torch.Generator().manual_seed(p["seed"])
    t, e, k = p["t"], p["e"], p["k"]
    dtype = dtype or p["dtype"]
    x = (torch.randn(t, p["h"], generator=g) * 2.0 ** torch.randint(-2, 3, (t, 1), generator=g)).to(dtype)
    logits = torch.randn(t, e, generator=g)
    if p["skew"] == "one_expert":
        logits[:, e - 1] += 100.0
    elif p["skew"] == "half_empty":
        logits[:, : e // 2] -= 100.0
    w, ids = mk.route(logits, top_k=k, scaling_factor=2.5)
    up = torch.randn(e, p["i"], p["h"], generator=g) / p["h"] ** 0.5
    down = torch.randn(e, p["h"], p["i"], generator=g) / p["i"] ** 0.5
    if p["nvfp4"]:
        return x, w, ids, mk.quantize_experts(up), mk.quantize_experts(down)
    return x, w, ids, up.to(dtype), down.to(dtype)


def _slot_tolerance(x, w, ids, up, down, want):
    """The fp32 error bound of each slot: the experts bound of a problem with one slot per row
    (x exact in fp32, so relu2 is rounded to fp32 as the torch path does)."""
    k = ids.shape[1]
    return ref.experts_tolerance(x.float().repeat_interleave(k, 0), w.reshape(-1, 1), ids.reshape(-1, 1), up, down,
                                 want)


@given(p=problems())
@example(p=dict(t=1, e=64, k=8, h=32, i=48, dtype=torch.bfloat16, nvfp4=True, skew="random", seed=0))    # decode
@example(p=dict(t=37, e=5, k=2, h=20, i=36, dtype=torch.float32, nvfp4=False, skew="one_expert", seed=1))
@example(p=dict(t=5, e=6, k=3, h=64, i=32, dtype=torch.float16, nvfp4=False, skew="half_empty", seed=2))
def test_torch_path_matches_reference(p):
    x, w, ids, up, down = _inputs(p)
    with dispatch.trace() as ran:
        got = mk.experts(x, w, ids, up, down)
        slots = mk.expert_slots(x, w, ids, up, down)
    assert set(ran) == {("moe_experts", "torch"), ("moe_expert_slots", "torch")}
    assert got.dtype == x.dtype and slots.dtype == torch.float32 and slots.shape == (x.shape[0] * p["k"], x.shape[1])
    want = ref.experts_reference(x, w, ids, up, down)
    # fp32 GEMMs in another summation order, then the rounding to x's dtype: the reference's bound
    assert_close(got, want, atol=ref.experts_tolerance(x, w, ids, up, down, want), what="experts")
    want_slots = ref.expert_slots_reference(x, w, ids, up, down)
    # the same fp32 bound per slot (no rounding to x's dtype inside) ...
    assert_close(slots, want_slots, atol=_slot_tolerance(x, w, ids, up, down, want_slots), what="slots")
    # ... and typical fp32 accuracy: <= 64 + 64 products rounded at u = 6e-8 give ~1e-7; 10x margin
    assert_rel_rms(slots, want_slots, 1e-6, what="slots")
    assert_equal(mk.combine(slots, p["k"], x.dtype), got, what="combine(expert_slots)")


def test_slot_checks_catch_slightly_wrong_weights():
    """The elementwise bound fails routing weights 2^-12 off; the RMS check fails them 2^-16 off."""
    p = dict(t=9, e=4, k=2, h=32, i=32, dtype=torch.float32, nvfp4=False, skew="random", seed=5)
    x, w, ids, up, down = _inputs(p)
    want = ref.expert_slots_reference(x, w, ids, up, down)
    with pytest.raises(AssertionError, match="elements not within"):
        assert_close(mk.expert_slots(x, w * (1 + 2.0 ** -12), ids, up, down), want,
                     atol=_slot_tolerance(x, w, ids, up, down, want))
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_rel_rms(mk.expert_slots(x, w * (1 + 2.0 ** -16), ids, up, down), want, 1e-6)


def _sub_stack(w, a, b):
    """Experts [a, b) in their own allocation, as a rank holds them."""
    if isinstance(w, NVFP4Tensor):
        return NVFP4Tensor(w.codes[a:b].clone(), w.block_scales[a:b].clone(), w.global_scale[a:b].clone())
    return w[a:b].clone()


@given(p=problems(), split=st.integers(0, 10), misalign=st.booleans())
@example(p=dict(t=1, e=6, k=4, h=32, i=16, dtype=torch.float32, nvfp4=False, skew="random", seed=3), split=3,
         misalign=True)
@example(p=dict(t=37, e=8, k=3, h=21, i=19, dtype=torch.float32, nvfp4=False, skew="random", seed=4), split=5,
         misalign=True)
@example(p=dict(t=1, e=8, k=6, h=21, i=19, dtype=torch.float32, nvfp4=False, skew="random", seed=4), split=3,
         misalign=False)                   # odd widths: expert matrices off 64-byte alignment in the stack
def test_slots_depend_only_on_the_rows_of_their_expert(p, split, misalign):
    """Expert parallelism in one process: the experts split at ``split`` into two "ranks", each
    computing its experts' slots from the rows routed to them (k = 1, in slot order, the rows in an
    arbitrarily aligned buffer as an exchange delivers them) equals the whole call bit for bit."""
    x, w, ids, up, down = _inputs(p)
    e, k = p["e"], p["k"]
    split = min(split, e)
    whole = mk.expert_slots(x, w, ids, up, down)
    flat, flat_w = ids.reshape(-1).long(), w.reshape(-1)
    for a, b in ((0, split), (split, e)):
        rows = ((flat >= a) & (flat < b)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xr = x.index_select(0, rows // k)
        if misalign:                       # a view one element into a buffer
            xr = torch.cat([xr.new_zeros(1), xr.reshape(-1)])[1:].view(xr.shape)
        part = mk.expert_slots(xr, flat_w[rows][:, None], (flat[rows] - a).to(torch.int32)[:, None],
                               _sub_stack(up, a, b), _sub_stack(down, a, b))
        assert_equal(part, whole[rows], what=f"slots of experts [{a}, {b})")


@given(t=st.integers(0, 40), n_group=st.sampled_from([1, 2, 4]), per_group=st.integers(2, 6), seed=seeds,
       bias=st.sampled_from(["none", "finite", "special"]), renormalize=st.booleans())
@example(t=7, n_group=1, per_group=512, seed=0, bias="finite", renormalize=True)        # Super: E 512
def test_fast_route_is_the_reference_bit_for_bit(t, n_group, per_group, seed, bias, renormalize):
    g = torch.Generator().manual_seed(seed)
    e = n_group * per_group
    topk_group = 1 + seed % n_group
    k = 1 + seed % (topk_group * per_group)
    logits = torch.randn(t, e, generator=g) * 4
    for value, frac in ((math.nan, 0.15), (math.inf, 0.05), (-math.inf, 0.05)):
        logits[torch.rand(t, e, generator=g) < frac] = value
    b = None if bias == "none" else torch.randn(e, generator=g)
    if bias == "special":
        b[0], b[-1] = math.nan, math.inf
    want = ref.route_reference(logits, top_k=k, correction_bias=b, n_group=n_group, topk_group=topk_group,
                               renormalize=renormalize, scaling_factor=2.5)
    got = fast.route(logits, k, b, n_group, topk_group, renormalize, 2.5)
    assert_equal(got[1], want[1], what="ids")
    assert_equal(got[0], want[0], what="weights")
    # the differentiable weights the backward differentiates are these weights too
    assert_equal(ref.route_weights_reference(logits, want[1], renormalize=renormalize, scaling_factor=2.5), want[0],
                 what="route_weights_reference")


@pytest.mark.parametrize("per_matrix", [True, False])
def test_dequantize_expert_is_the_reference(per_matrix):
    g = torch.Generator().manual_seed(0)
    q = mk.quantize_experts(torch.randn(3, 24, 48, generator=g) * torch.logspace(-3, 3, 48))
    if not per_matrix:
        q = NVFP4Tensor(q.codes, q.block_scales, q.global_scale[1])
    for e in range(3):
        gs = q.global_scale[e] if per_matrix else q.global_scale
        assert_equal(fast.dequantize_expert(q, e), dequantize_reference(q.codes[e], q.block_scales[e], gs))


@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nvfp4_experts_equal_their_dequantized_float_experts(t, dtype):
    """Dequantization is exact and both stacks take the same matmuls, on every path."""
    p = dict(t=t, e=6, k=3, h=32, i=48, dtype=dtype, nvfp4=True, skew="random", seed=6)
    x, w, ids, up, down = _inputs(p)
    got = mk.expert_slots(x, w, ids, up, down)
    assert_equal(got, mk.expert_slots(x, w, ids, up.dequantize(dtype), down.dequantize(dtype)))


@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.parametrize("nvfp4", [False, True])
def test_float64_inputs_compute_in_float64(t, nvfp4):
    p = dict(t=t, e=5, k=2, h=16, i=32, dtype=torch.float64, nvfp4=nvfp4, skew="random", seed=7)
    x, w, ids, up, down = _inputs(p)
    w = w.double()
    for kernels in ("torch", "reference"):          # fp64 always takes the fp64 grouped matmuls
        with dispatch.use(kernels):
            slots, out = mk.expert_slots(x, w, ids, up, down), mk.experts(x, w, ids, up, down)
        assert slots.dtype == out.dtype == torch.float64
        want = ref.expert_slots_grad_reference(x, w, ids, up, down)
        # fp64 matmuls in another order: ~1e-16 relative, far below any fp32 effect (~6e-8)
        assert_close(slots, want, atol=1e-13 * max_abs(want), what=f"fp64 slots ({kernels})")
        assert_equal(out, mk.combine(slots, 2, torch.float64))
    wd, idd = mk.route(torch.randn(t, 5, dtype=torch.float64), top_k=2)
    assert wd.dtype == torch.float64 and idd.dtype == torch.int32


def test_forced_reference_runs_the_reference():
    p = dict(t=11, e=6, k=2, h=32, i=48, dtype=torch.bfloat16, nvfp4=False, skew="random", seed=8)
    x, w, ids, up, down = _inputs(p)
    with dispatch.use("reference"), dispatch.trace() as ran:
        got = mk.experts(x, w, ids, up, down)
    assert ran == [("moe_experts", "reference")]
    assert_equal(got, ref.experts_reference(x, w, ids, up, down))


@pytest.mark.parametrize("nvfp4", [False, True])
def test_empty_batch_on_the_torch_path(nvfp4):
    p = dict(t=0, e=4, k=2, h=16, i=32, dtype=torch.float32, nvfp4=nvfp4, skew="random", seed=0)
    x, w, ids, up, down = _inputs(p)
    assert mk.experts(x, w, ids, up, down).shape == (0, 16)
    assert mk.expert_slots(x, w, ids, up, down).shape == (0, 16)
    assert mk.routed_experts(x, torch.zeros(0, 4), up, down, top_k=2).shape == (0, 16)


@pytest.mark.parametrize("t", [1, 13])
def test_routed_experts_equals_route_then_experts(t):
    p = dict(t=t, e=8, k=3, h=32, i=16, dtype=torch.float32, nvfp4=False, skew="random", seed=9)
    x, _, _, up, down = _inputs(p)
    logits, bias = torch.randn(t, 8), torch.linspace(-0.3, 0.3, 8)
    kw = dict(top_k=3, correction_bias=bias, n_group=2, topk_group=1, scaling_factor=2.5)
    w, ids = mk.route(logits, **kw)
    assert_equal(mk.routed_experts(x, logits, up, down, **kw), mk.experts(x, w, ids, up, down))
    with pytest.raises(ValueError, match="logits"):
        mk.routed_experts(x, logits[:, :6], up, down, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        mk.routed_experts(x, logits, up, down, top_k=9)


def test_layer_forward_is_route_then_experts():
    """The layer's eager call of the fused op equals the route + experts pair a graph shows."""
    m = LatentMoE(48, num_experts=6, top_k=2, intermediate_size=32, shared_intermediate_size=16, latent_size=32,
                  scaling_factor=2.0)
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    h = torch.randn(2, 5, 48, generator=g)
    with torch.no_grad():
        x = h.reshape(-1, 48)
        w, ids = mk.route(m.gate(x), correction_bias=m.gate.e_score_correction_bias, **m.route_args)
        y = m.fc2_latent_proj(m.experts(m.fc1_latent_proj(x), w, ids)).view(h.shape) + m.shared_experts(h)
        assert_equal(m(h), y)
        xl, logits = m.fc1_latent_proj(x), m.gate(x)
        with pytest.raises(TypeError, match="not both"):
            m.experts(xl, w, ids, logits=logits, top_k=2)
        with pytest.raises(TypeError, match="expected weights and ids"):
            m.experts(xl, w)
