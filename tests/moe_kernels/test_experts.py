"""Routing, permutation and the grouped-GEMM experts against the references and HF transformers."""

import pytest
import torch
from hypothesis import example, given, strategies as st

from nemotron import dispatch
from nemotron import moe_kernels as mk
from nemotron.moe_kernels import reference as ref
from nemotron.moe_kernels.triton import grouped_gemm as kernels

from ..close import assert_close, assert_equal, max_abs
from ..strategies import seeds

hf_moe = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig  # noqa: E402


def _hf_config(**kw):
    base = dict(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                moe_shared_expert_intermediate_size=32, mlp_hidden_act="relu2", layers_block_type=["moe"],
                num_hidden_layers=1)
    return NemotronHConfig(**{**base, **kw})


@st.composite
def routing_problems(draw):
    n_group = draw(st.sampled_from([1, 1, 2, 4]))
    per_group = draw(st.integers(2, 6))
    e = n_group * per_group
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * per_group))
    return dict(t=draw(st.integers(1, 300)), e=e, k=k, n_group=n_group, topk_group=topk_group,
                renormalize=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 2.5, 5.0])), seed=draw(seeds))


@given(p=routing_problems())
@example(p=dict(t=7, e=512, k=22, n_group=1, topk_group=1, renormalize=True, scale=5.0, seed=0))   # Super
def test_route_matches_hf_router(p):
    g = torch.Generator().manual_seed(p["seed"])
    cfg = _hf_config(hidden_size=16, n_routed_experts=p["e"], num_experts_per_tok=p["k"], n_group=p["n_group"],
                     topk_group=p["topk_group"], norm_topk_prob=p["renormalize"], routed_scaling_factor=p["scale"])
    router = hf_moe.NemotronHTopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(p["e"], 16, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(p["e"], generator=g) * 0.3)
    h = torch.randn(p["t"], 16, generator=g)
    logits, w_hf, ids_hf = router(h)
    w, ids = mk.route(logits, top_k=p["k"], correction_bias=router.e_score_correction_bias, n_group=p["n_group"],
                      topk_group=p["topk_group"], renormalize=p["renormalize"], scaling_factor=p["scale"])
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (p["t"], p["k"])
    # same expert sets; HF's top-k is unsorted, so compare in id order
    order, order_hf = ids.long().sort(1), ids_hf.sort(1)
    assert_equal(order.values, order_hf.values, what="expert ids")
    # the renormalizing sum may add in another order: 1 ulp per add, k adds
    assert_close(w.gather(1, order.indices), w_hf.gather(1, order_hf.indices), rtol=p["k"] * 2.0 ** -23,
                 what="routing weights")


def test_route_semantics():
    """Bias selects but does not weigh; groups restrict; renormalized weights sum to the scale."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    w, ids = mk.route(logits, top_k=2, correction_bias=bias, renormalize=False)
    assert ids.tolist() == [[0, 3]]
    assert_equal(w, torch.sigmoid(torch.tensor([[0.0, 3.0]])))               # unbiased sigmoid, no renorm
    w, ids = mk.route(logits, top_k=2, n_group=2, topk_group=1, scaling_factor=5.0)
    assert sorted(ids.tolist()[0]) == [2, 3]
    assert_close(w.sum(), torch.tensor(5.0), rtol=2 * 2.0 ** -23)            # two weights renormalized, summed


@given(t=st.integers(0, 200), e=st.integers(1, 40), k=st.integers(1, 6), seed=seeds)
def test_permute_groups_slots_by_expert(t, e, k, seed):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(e, (t, k), generator=g, dtype=torch.int32)
    perm, offs = mk.permute(ids, e)
    assert perm.dtype == offs.dtype == torch.int32 and offs.shape == (e,)
    assert sorted(perm.tolist()) == list(range(t * k))
    sorted_ids = ids.reshape(-1)[perm.long()]
    assert_equal(offs.long(), torch.bincount(ids.reshape(-1).long(), minlength=e).cumsum(0), what="offs")
    start = 0
    for i, end in enumerate(offs.tolist()):
        assert (sorted_ids[start:end] == i).all() and (perm[start:end].diff() > 0).all()   # stable
        start = end


def test_offs_follow_grouped_mm_convention():
    """torch._grouped_mm with our (perm, offs) equals the per-expert loop: the same offs convention."""
    g = torch.Generator().manual_seed(3)
    t, e, k, h, n = 40, 6, 2, 16, 24
    ids = torch.randint(e, (t, k), generator=g, dtype=torch.int32)
    ids[:, 0] = 0                                          # expert 0 busy; some experts likely empty
    x, w = torch.randn(t, h, generator=g), torch.randn(e, n, h, generator=g)
    perm, offs = mk.permute(ids, e)
    rows = x[perm.long() // k]
    got = torch._grouped_mm(rows, w.transpose(1, 2), offs=offs)
    want = torch.stack([x[s // k] @ w[ids.reshape(-1)[s]].T for s in perm.tolist()])
    assert_close(got, want, rtol=1e-5, atol=1e-5 * max_abs(want))     # fp32: another GEMM summation order


@pytest.mark.parametrize("rows, e, bm", [(0, 5, 16), (1, 5, 16), (37, 6, 16), (300, 4, 64), (50, 64, 16)])
def test_block_table_covers_each_row_once(rows, e, bm):
    g = torch.Generator().manual_seed(rows + e)
    ids = torch.randint(e, (rows, 1), generator=g)
    if rows > 10:
        ids[: rows // 2] = e - 1                             # one busy expert
    _, offs = mk.permute(ids, e)
    blk_e, blk_r = kernels.block_table(offs, rows, bm)
    assert blk_e.shape[0] == -(-rows // bm) + min(rows, e)
    seen = torch.zeros(rows, dtype=torch.int64)
    for ex, r0 in zip(blk_e.tolist(), blk_r.tolist()):
        if ex < 0:
            continue
        start = offs[ex - 1].item() if ex else 0
        end = offs[ex].item()
        assert start <= r0 < end
        seen[r0:min(r0 + bm, end)] += 1
    assert (seen == 1).all()


@st.composite
def expert_problems(draw):
    e = draw(st.integers(1, 12))
    k = draw(st.integers(1, min(e, 4)))
    t = draw(st.integers(1, 300 // k))
    h = 16 * draw(st.integers(1, 5))
    i = 16 * draw(st.integers(1, 6))
    skew = draw(st.sampled_from(["random", "one_expert", "half_empty"]))
    return dict(t=t, e=e, k=k, h=h, i=i, skew=skew, dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                nvfp4=draw(st.booleans()), seed=draw(seeds))


def _expert_inputs(p):
    g = torch.Generator().manual_seed(p["seed"])
    t, e, k = p["t"], p["e"], p["k"]
    x = (torch.randn(t, p["h"], generator=g) * 2.0 ** torch.randint(-2, 3, (t, 1), generator=g)).to(p["dtype"])
    logits = torch.randn(t, e, generator=g)
    if p["skew"] == "one_expert":
        logits[:, e - 1] += 100.0                            # every token picks expert E-1
    elif p["skew"] == "half_empty":
        logits[:, : e // 2] -= 100.0                         # the first half receives nothing (when k allows)
    w, ids = mk.route(logits, top_k=k, scaling_factor=2.5)
    up = torch.randn(e, p["i"], p["h"], generator=g) / p["h"] ** 0.5
    down = torch.randn(e, p["h"], p["i"], generator=g) / p["i"] ** 0.5
    if p["nvfp4"]:
        return x, w, ids, mk.quantize_experts(up), mk.quantize_experts(down)
    return x, w, ids, up.to(p["dtype"]), down.to(p["dtype"])


@given(p=expert_problems())
@example(p=dict(t=64, e=64, k=4, h=32, i=48, skew="random", dtype=torch.bfloat16, nvfp4=True, seed=0))   # decode-like
@example(p=dict(t=1, e=3, k=3, h=16, i=16, skew="random", dtype=torch.float32, nvfp4=False, seed=1))
@example(p=dict(t=150, e=5, k=2, h=80, i=96, skew="one_expert", dtype=torch.float16, nvfp4=False, seed=2))
def test_experts_kernel_matches_reference(kernel_device, p):
    x, w, ids, up, down = _expert_inputs(p)
    want = ref.experts_reference(x, w, ids, up, down)
    d = kernel_device
    with dispatch.use("triton"):
        got = mk.experts(x.to(d), w.to(d), ids.to(d), up.to(d), down.to(d))
        slots = mk.expert_slots(x.to(d), w.to(d), ids.to(d), up.to(d), down.to(d))
    assert got.dtype == x.dtype and got.shape == x.shape
    assert_close(got, want, atol=ref.experts_tolerance(x, w, ids, up, down, want), what="experts")
    assert_equal(mk.combine(slots, p["k"], x.dtype), got, what="combine(expert_slots)")


def test_tolerance_is_tight_enough_to_catch_a_wrong_expert():
    """The bound is far below the effect of one mis-routed slot: the comparison can fail."""
    p = dict(t=20, e=4, k=2, h=32, i=32, skew="random", dtype=torch.bfloat16, nvfp4=False, seed=4)
    x, w, ids, up, down = _expert_inputs(p)
    want = ref.experts_reference(x, w, ids, up, down)
    wrong_ids = ids.clone()
    wrong_ids[0, 0] = (wrong_ids[0, 0] + 1) % 4 if (wrong_ids[0, 0] + 1) % 4 != wrong_ids[0, 1] else (wrong_ids[0, 0] + 2) % 4
    wrong = ref.experts_reference(x, w, wrong_ids, up, down)
    tol = ref.experts_tolerance(x, w, ids, up, down, want)
    with pytest.raises(AssertionError, match="elements not within"):
        assert_close(wrong, want, atol=tol)


@given(t=st.integers(1, 40), e=st.integers(2, 10), seed=seeds, latent=st.booleans())
def test_experts_reference_matches_hf_experts(t, e, seed, latent):
    """The fp64 reference equals HF's NemotronHExperts loop (fp32) to fp32 rounding."""
    k = min(3, e)
    cfg = _hf_config(hidden_size=32, n_routed_experts=e, num_experts_per_tok=k, moe_intermediate_size=48,
                     moe_latent_size=16 if latent else None)
    hf = hf_moe.NemotronHExperts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hf.up_proj.copy_(torch.randn(hf.up_proj.shape, generator=g) / 4)
        hf.down_proj.copy_(torch.randn(hf.down_proj.shape, generator=g) / 6)
    x = torch.randn(t, hf.up_proj.shape[2], generator=g)
    w, ids = mk.route(torch.randn(t, e, generator=g), top_k=k, scaling_factor=2.0)
    want = hf(x, ids.long(), w)
    got = ref.experts_reference(x, w, ids, hf.up_proj.detach(), hf.down_proj.detach())
    # HF sums in fp32 (I + H products and k slots): a few fp32 ulps of the magnitudes involved
    scale = ref.experts_reference(x.abs(), w.abs(), ids, hf.up_proj.detach().abs(), hf.down_proj.detach().abs())
    assert_close(got, want, atol=scale.double() * 64 * 2.0 ** -24 + 1e-30)


def test_nvfp4_experts_read_the_quantized_values():
    """NVFP4 experts equal float experts holding the dequantized weights (dequantization is exact)."""
    p = dict(t=30, e=5, k=2, h=32, i=48, skew="random", dtype=torch.float32, nvfp4=True, seed=7)
    x, w, ids, up, down = _expert_inputs(p)
    assert_equal(mk.experts(x, w, ids, up, down), mk.experts(x, w, ids, up.dequantize(), down.dequantize()))


def test_opcheck_moe_ops():
    p = dict(t=9, e=4, k=2, h=16, i=32, skew="random", dtype=torch.float32, nvfp4=False, seed=0)
    x, w, ids, up, down = _expert_inputs(p)
    torch.library.opcheck(torch.ops.nemotron.moe_route.default, (torch.randn(9, 4), 2, torch.zeros(4), 2, 1, True, 2.0))
    torch.library.opcheck(torch.ops.nemotron.moe_experts.default, (x, w, ids, up, None, None, down, None, None))
    torch.library.opcheck(torch.ops.nemotron.moe_permute.default, (ids, 4))
    torch.library.opcheck(torch.ops.nemotron.moe_combine.default, (torch.randn(18, 16), 2, torch.bfloat16))
    qu, qd = mk.quantize_experts(up), mk.quantize_experts(down)
    args = (x, w, ids, qu.codes, qu.block_scales.view(torch.uint8), qu.global_scale,
            qd.codes, qd.block_scales.view(torch.uint8), qd.global_scale)
    torch.library.opcheck(torch.ops.nemotron.moe_expert_slots.default, args)
    torch.library.opcheck(torch.ops.nemotron.moe_experts.default, args)


def _bad_inputs():
    x, w, ids = torch.randn(4, 16), torch.rand(4, 2), torch.randint(3, (4, 2), dtype=torch.int32)
    up, down = torch.randn(3, 32, 16), torch.randn(3, 16, 32)
    return x, w, ids, up, down


@pytest.mark.parametrize("call, match", [
    (lambda x, w, i, u, d: mk.route(torch.randn(4, 8), top_k=9), "top_k"),
    (lambda x, w, i, u, d: mk.route(torch.randn(4, 8), top_k=2, n_group=3), "n_group"),
    (lambda x, w, i, u, d: mk.route(torch.randn(4, 8), top_k=2, n_group=8), "n_group"),
    (lambda x, w, i, u, d: mk.route(torch.randn(4, 8), top_k=5, n_group=2, topk_group=1), "top_k"),
    (lambda x, w, i, u, d: mk.route(torch.randn(4, 8), top_k=2, correction_bias=torch.zeros(7)), "correction_bias"),
    (lambda x, w, i, u, d: mk.route(torch.randn(8), top_k=2), "logits"),
    (lambda x, w, i, u, d: mk.experts(x[:, :8], w, i, u, d), "up"),
    (lambda x, w, i, u, d: mk.experts(x, w[:3], i, u, d), "weights, ids"),
    (lambda x, w, i, u, d: mk.experts(x, w, i.float(), u, d), "ids"),
    (lambda x, w, i, u, d: mk.experts(x, w, i + 1, u, d), "ids"),
    (lambda x, w, i, u, d: mk.experts(x, w, i, u, d[:2]), "down"),
    (lambda x, w, i, u, d: mk.experts(x, w, i, u, d.transpose(1, 2)), "down"),
    (lambda x, w, i, u, d: mk.experts(x, w, i, u, d, activation="silu"), "activation"),
    (lambda x, w, i, u, d: mk.experts(x, w, i, mk.quantize_experts(u), d), "both"),
    (lambda x, w, i, u, d: mk.experts(x.t(), w, i, u, d), "x"),
    (lambda x, w, i, u, d: mk.combine(torch.zeros(5, 4), 2, torch.float32), "top_k"),
    (lambda x, w, i, u, d: mk.quantize_experts(u[0]), "w"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(*_bad_inputs())


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 600])
@pytest.mark.parametrize("nvfp4", [False, True])
def test_super_shape_experts_on_gpu(t, nvfp4):
    """Super's expert shapes (E 512, k 22, l 1024, I 2688) with bf16 wgmma, against the reference."""
    g = torch.Generator(device="cuda").manual_seed(t)
    e, k, lat, inter = 512, 22, 1024, 2688
    x = torch.randn(t, lat, device="cuda", generator=g).bfloat16()
    w, ids = mk.route(torch.randn(t, e, device="cuda", generator=g), top_k=k, scaling_factor=5.0)
    up = torch.randn(e, inter, lat, device="cuda", generator=g) / lat ** 0.5
    down = torch.randn(e, lat, inter, device="cuda", generator=g) / inter ** 0.5
    up, down = (mk.quantize_experts(up), mk.quantize_experts(down)) if nvfp4 else (up.bfloat16(), down.bfloat16())
    got = mk.experts(x, w, ids, up, down)
    n = slice(0, 4)                                   # the fp64 reference on the first tokens
    want = ref.experts_reference(x[n], w[n], ids[n], up, down)
    assert_close(got[n], want, atol=ref.experts_tolerance(x[n], w[n], ids[n], up, down, want))
