"""MoE edge inputs: NaN router logits route as "never selected"; an empty batch (T = 0) is valid input."""
import math

import pytest
import torch

from nemotron import dispatch
from nemotron import moe_kernels as mk
from nemotron.moe_kernels import reference as ref

from ..close import assert_equal

E, H, I = 8, 16, 32


def _logits(t=6, seed=0):
    return torch.randn(t, E, generator=torch.Generator().manual_seed(seed))


ROUTINGS = [dict(top_k=2), dict(top_k=3, renormalize=False, scaling_factor=2.5),
            dict(top_k=2, n_group=4, topk_group=2, scaling_factor=5.0)]


@pytest.mark.parametrize("route", [ref.route_reference, mk.route], ids=["reference", "op"])
@pytest.mark.parametrize("kw", ROUTINGS, ids=["plain", "no-renorm", "grouped"])
def test_nan_logit_is_never_selected(route, kw):
    """A NaN logit routes exactly like a logit of -inf whose expert also has a bias of -inf for that
    token (ranked last, weight sigmoid(-inf) = 0), with and without a correction bias; the weights
    stay finite."""
    logits = _logits()
    logits[0, 3] = logits[1, 0] = logits[1, 5] = math.nan
    logits[2] = math.nan                                 # a token with no finite logit at all
    nan = torch.isnan(logits)
    neg = torch.where(nan, torch.full_like(logits, -math.inf), logits)
    for bias in (None, torch.linspace(-0.5, 0.5, E)):
        w, ids = route(logits, correction_bias=bias, **kw)
        assert torch.isfinite(w).all()
        for r in range(logits.shape[0]):                 # tokens route independently
            b = torch.zeros(E) if bias is None else bias.clone()
            w_r, ids_r = route(neg[r:r + 1], correction_bias=b.masked_fill(nan[r], -math.inf), **kw)
            assert_equal(ids[r:r + 1], ids_r, what=f"expert ids of token {r}")
            assert_equal(w[r:r + 1], w_r, what=f"weights of token {r}")
        chosen_nan = torch.isnan(logits).gather(1, ids.long())
        assert not chosen_nan[[0, 1, 3, 4, 5]].any()     # enough finite experts: a NaN one is never picked
        assert_equal(w[2], torch.zeros_like(w[2]), what="weights of the all-NaN token")
        assert ((ids >= 0) & (ids < E)).all()


def test_nan_bias_ranks_last():
    """A NaN correction bias makes its expert's biased score NaN: ranked last, so not selected."""
    logits = torch.zeros(3, E)
    logits[:, 1] = 5.0
    bias = torch.zeros(E)
    bias[1] = math.nan
    _, ids = ref.route_reference(logits, top_k=2, correction_bias=bias)
    assert not (ids == 1).any()


def test_nan_logit_weight_is_zero_when_picked():
    """Fewer finite logits than top_k: the NaN expert fills the slot with weight 0; renormalization
    keeps the finite expert's weight at the full scale."""
    logits = torch.full((1, E), math.nan)
    logits[0, 4] = 0.3
    w, ids = ref.route_reference(logits, top_k=2, scaling_factor=5.0)
    assert ids[0, 0].item() == 4
    assert w[0].tolist() == [pytest.approx(5.0, rel=2.0 ** -22), 0.0]   # s / (s + 1e-20) * 5, one rounding each


def _experts(nvfp4: bool):
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)
    return (mk.quantize_experts(up), mk.quantize_experts(down)) if nvfp4 else (up, down)


def test_references_on_empty_batches():
    w, ids = ref.route_reference(torch.randn(0, E), top_k=2, n_group=2, topk_group=1)
    assert w.shape == ids.shape == (0, 2)
    perm, offs = ref.permute_reference(ids, E)
    assert perm.shape == (0,) and offs.tolist() == [0] * E
    x = torch.randn(0, H)
    for up, down in (_experts(False), _experts(True)):
        slots = ref.expert_slots_reference(x, w, ids, up, down)
        assert slots.shape == (0, H) and ref.combine_reference(slots, 2, x.dtype).shape == (0, H)
        want = ref.experts_reference(x, w, ids, up, down)
        assert want.shape == (0, H) and ref.experts_tolerance(x, w, ids, up, down, want).shape == (0, H)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("nvfp4", [False, True])
def test_public_ops_on_empty_batches(kernel_device, kernels, nvfp4):
    d = torch.device("cpu") if kernels == "reference" else kernel_device
    up, down = (v.to(d) for v in _experts(nvfp4))
    x = torch.randn(0, H, dtype=torch.bfloat16, device=d)
    if not nvfp4:
        up, down = up.to(x.dtype), down.to(x.dtype)
    with dispatch.use(kernels):
        w, ids = mk.route(torch.randn(0, E, device=d), top_k=2, n_group=2, topk_group=1)
        assert w.shape == ids.shape == (0, 2)
        assert mk.experts(x, w, ids, up, down).shape == (0, H)
        slots = mk.expert_slots(x, w, ids, up, down)
        assert slots.shape == (0, H) and mk.combine(slots, 2, x.dtype).shape == (0, H)
        perm, offs = mk.permute(ids, E)
        assert perm.shape == (0,) and offs.shape == (E,)
