"""Mamba-2 edge inputs: non-finite values stay causal, extreme decays stay finite, empty batches work."""
import math

import pytest
import torch

from nemotron import dispatch
from nemotron import ssm_kernels as ssm
from nemotron.ssm_kernels import reference as ref
from nemotron.ssm_kernels.triton import ssd as ssd_kernels

from ..close import assert_equal

Q = 16
T = 44                       # not a multiple of Q: the last chunk is padded


def _problem(t=T, b=2, h=2, g=1, p=8, n=8, seed=0, full=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = dict(x=r(b, t, h, p), dt=torch.rand(b, t, h, generator=gen), A=-torch.exp(r(h)), B=r(b, t, g, n),
                C=r(b, t, g, n))
    kw = dict(D=r(h), z=r(b, t, h, p), dt_bias=r(h), dt_softplus=True, dt_limit=(0.0, 8.0)) if full else {}
    return args, kw


def _ssd(impl, args, **kw):
    """(y, final states) of one SSD implementation, y in fp64 for comparisons."""
    a = (args["x"], args["dt"], args["A"], args["B"], args["C"])
    if impl == "recurrence":
        y, s = ref.ssd_recurrence(*a, **kw)
    elif impl == "chunked":
        y, s = ref.ssd_chunked(*a, chunk_size=Q, **kw)
    else:                                    # the kernel: interpreted here, on the GPU where there is one
        dev = "cpu" if dispatch.interpreting() else "cuda"
        kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        y, s = ssd_kernels.ssd_scan(*(v.to(dev) for v in a), chunk_size=Q, return_final_states=True, **kw)
    return y.cpu().double(), s.cpu().double()


def _rel(got, want):
    return ((got - want).abs().max() / (want.pow(2).mean().sqrt() + 1e-30)).item()


IMPLS = ["recurrence", "chunked", "kernel"]
# (problem, poisoned input): z exists only in the full problem (D, z, dt_bias, softplus, dt_limit)
INPUTS = [(False, n) for n in ("x", "B", "C", "dt")] + [(True, n) for n in ("x", "B", "C", "dt", "z")]

# the interpreter's numpy warns on the inf / NaN arithmetic these tests are about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("full, name", INPUTS, ids=[f"{'full' if f else 'plain'}-{n}" for f, n in INPUTS])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("t", [0, 9, Q, 2 * Q + 8])     # first chunk, a chunk start, the padded last chunk
def test_nonfinite_input_is_causal(impl, full, name, value, t):
    """A NaN / inf in batch row 1 at token t: row 0 and row 1's tokens < t equal the clean run
    exactly; which outputs are non-finite is what the FP64 recurrence says (the state carries it)."""
    args, kw = _problem(full=full)
    clean_y, clean_s = _ssd(impl, args, **kw)
    bad = {k: v.clone() for k, v in args.items()}
    bad_kw = dict(kw, z=kw["z"].clone()) if full else kw
    target = bad_kw["z"] if name == "z" else bad[name]
    target[1, t].view(-1)[0] = value                     # head/group 0, element 0 of token t
    y, s = _ssd(impl, bad, **bad_kw)
    assert_equal(y[0], clean_y[0], what="the other batch row")
    assert_equal(s[0], clean_s[0], what="the other batch row's final state")
    assert_equal(y[1, :t], clean_y[1, :t], what="the tokens before t")
    want, _ = _ssd("recurrence", bad, **bad_kw)
    fin = torch.isfinite(want)
    mism = (torch.isfinite(y) != fin).nonzero()
    assert mism.numel() == 0, (f"{mism.shape[0]} outputs differ in finiteness from the recurrence, "
                               f"first {mism[:3].tolist()}")
    assert _rel(y[fin], want[fin]) < 1e-4               # fp32 chunked sums vs the fp64 recurrence


@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_stays_in_its_packed_sequence(impl):
    """cu_seqlens with boundaries inside chunks: NaN / inf in sequence 1 leaves sequences 0 and 2
    (outputs and final states) and sequence 1's earlier tokens exactly as in the clean run."""
    cu = torch.tensor([0, 13, 30, T], dtype=torch.int32)
    args, kw = _problem(b=1, full=True)
    kw["cu_seqlens"] = cu
    clean_y, clean_s = _ssd(impl, args, **kw)
    bad = {k: v.clone() for k, v in args.items()}
    bad["x"][0, 20, 0, 3] = math.nan
    bad["B"][0, 24, 0, 1] = math.inf
    bad["dt"][0, 27, 1] = math.nan
    y, s = _ssd(impl, bad, **kw)
    for lo, hi in ((0, 20), (30, T)):
        assert_equal(y[0, lo:hi], clean_y[0, lo:hi], what=f"tokens {lo}..{hi}")
    assert_equal(s[[0, 2]], clean_s[[0, 2]], what="final states of sequences 0 and 2")
    assert not torch.isfinite(y[0, 20:30]).all() and not torch.isfinite(s[1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nonfinite_is_causal_in_16_bit(dtype):
    """The kernel's 16-bit path (x, B, C, z and y in the input dtype) masks the same way."""
    args, kw = _problem(full=True)
    args = {k: (v.to(dtype) if k != "A" else v) for k, v in args.items()}
    kw["z"] = kw["z"].to(dtype)
    clean, _ = _ssd("kernel", args, **kw)
    args["x"][1, 9, 1, 2] = math.nan
    args["B"][1, 20, 0, 5] = -math.inf
    y, _ = _ssd("kernel", args, **kw)
    assert_equal(y[0], clean[0], what="the other batch row")
    assert_equal(y[1, :9], clean[1, :9], what="the tokens before the NaN")
    assert torch.isfinite(y[1, 9:20, 0]).all() and not torch.isfinite(y[1, 9:, 1, 2]).any()


@pytest.mark.parametrize("impl", ["chunked", "kernel"])
def test_extreme_decays_are_finite_and_match_the_recurrence(impl):
    """A = -inf and A = -3e38 (dt * A overflows fp32) with zero dt at some tokens and in the padded
    tail: the decay floor gives exp(dt * A) ~ 0, a zero step decays by 1, and the output matches the
    FP64 recurrence (tolerance: fp32 sums, as in test_ssd)."""
    args, _ = _problem(h=4, g=2)
    args["A"] = torch.tensor([-math.inf, -3e38, -1e3, -0.5])
    args["dt"][:, ::5] = 0.0
    y, s = _ssd(impl, args)
    want_y, want_s = _ssd("recurrence", args)
    assert torch.isfinite(y).all() and torch.isfinite(s).all() and torch.isfinite(want_y).all()
    assert _rel(y, want_y) < 1e-4 and _rel(s, want_s) < 1e-4


@pytest.mark.parametrize("impl", ["chunked", "kernel"])
def test_huge_mixed_dt_matches_the_recurrence(impl):
    """dt of 1e4 (dt * A = -1e7) mixed with 1e-6, and dt = +inf clamped by dt_limit to 1e30: the
    floored log decays keep each chunk's fp32 cumsum within Q * 185, so cs_i - cs_j loses at most
    a few ulp(3e3) ~ 1e-3 of the exponent (tolerance 5e-3 relative)."""
    args, _ = _problem()
    args["A"] = torch.full((2,), -1e3)
    args["dt"] = torch.full_like(args["dt"], 1e4)
    args["dt"][:, ::3] = 1e-6
    args["dt"][:, 7] = math.inf
    kw = dict(dt_limit=(0.0, 1e30))
    y, _ = _ssd(impl, args, **kw)
    want, _ = _ssd("recurrence", args, **kw)
    assert torch.isfinite(y).all() and _rel(y, want) < 5e-3


def test_log_decay_definition():
    dt = torch.tensor([0.0, 0.0, 1.0, math.inf, 1e30, 2.0, math.nan])
    A = torch.tensor([-math.inf, -1.0, -math.inf, -1.0, -1e30, -0.25, -1.0])
    got = ref.log_decay(dt, A)
    assert got[:6].tolist() == [0.0, 0.0, ref.LOG_DECAY_MIN, ref.LOG_DECAY_MIN, ref.LOG_DECAY_MIN, -0.5]
    assert math.isnan(got[6])


def _ssu_problem(b=3, h=2, p=4, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=torch.rand(b, h, generator=gen), A=-torch.exp(r(h)),
                B=r(b, 1, n), C=r(b, 1, n))


def test_state_update_reference_extreme_decay():
    """A = -inf: dt = 0 keeps the state (decay exp(0) = 1), dt > 0 replaces it by the input."""
    a = _ssu_problem()
    a["A"] = torch.tensor([-math.inf, -math.inf])
    a["dt"][0] = 0.0
    y, new = ref.selective_state_update_reference(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"])
    assert torch.isfinite(y).all() and torch.isfinite(new).all()
    assert torch.equal(new[0], a["state"][0].double())
    dt, x, B = (a[k][1:].double() for k in ("dt", "x", "B"))
    inp = dt[:, :, None, None] * x[:, :, :, None] * B[:, :, None, :]
    assert torch.allclose(new[1:], inp, rtol=1e-12, atol=0)    # exp(-128) * state is far below fp64 eps


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_state_update_extreme_decay(kernels):
    """The public op on both implementations: A = -inf or -3e38 with dt = 0 and dt > 0, finite and
    equal to the FP64 reference up to fp32 rounding."""
    a = _ssu_problem()
    a["A"] = torch.tensor([-math.inf, -3e38])
    a["dt"][0] = 0.0
    _, want = ref.selective_state_update_reference(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"])
    state = a["state"].clone()
    with dispatch.use(kernels):
        y = ssm.selective_state_update(state, a["x"], a["dt"], a["A"], a["B"], a["C"])
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    # fp32 state arithmetic against the FP64 reference: a few ulps of the |state| ~ 1 entries
    torch.testing.assert_close(state.double(), want, rtol=1e-6, atol=1e-6)


def test_state_update_reference_nonfinite_stays_in_its_row():
    """NaN in one batch entry's x / B / dt touches only its own state row and y; a padding entry
    (index < 0) with NaN input writes nothing and returns 0."""
    a = _ssu_problem(b=4)
    idx = torch.tensor([2, -1, 0, 1])
    clean_y, clean_s = ref.selective_state_update_reference(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"],
                                                            state_indices=idx)
    a["x"][1] = math.nan                     # the padding entry
    a["B"][3, 0, 2] = math.inf               # entry 3 -> state row 1
    a["dt"][3, 0] = math.nan
    y, s = ref.selective_state_update_reference(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"],
                                                state_indices=idx)
    assert_equal(y[:3], clean_y[:3], what="y of entries 0..2")
    assert_equal(y[1], torch.zeros_like(y[1]), what="y of the padding entry")
    assert_equal(s[[0, 2, 3]], clean_s[[0, 2, 3]], what="untouched state rows")
    assert not torch.isfinite(s[1]).all()


def test_conv_reference_nonfinite_is_causal():
    """A NaN at token t reaches y[t .. t+W-1] only; the other packed sequence is untouched."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 30, 6, generator=gen), torch.randn(6, 4, generator=gen)
    cu = torch.tensor([0, 12, 30])
    clean, clean_f = ref.causal_conv1d_reference(x, w, cu_seqlens=cu)
    x[0, 5, 2] = math.nan
    y, f = ref.causal_conv1d_reference(x, w, cu_seqlens=cu)
    nonfinite = (~torch.isfinite(y[0])).nonzero()[:, 0].unique().tolist()
    assert nonfinite == [5, 6, 7, 8]
    assert_equal(y[0, 12:], clean[0, 12:], what="the other sequence")
    assert_equal(f[1], clean_f[1], what="the other sequence's final state")


# ---- empty batches: every op and reference returns empty outputs of the right shape ------------------

H, P, N, G, D_CH, W = 2, 4, 8, 1, 6, 4


def _ssd_args(b, t, device="cpu"):
    return tuple(v.to(device) for v in (torch.randn(b, t, H, P), torch.rand(b, t, H), -torch.rand(H),
                                        torch.randn(b, t, G, N), torch.randn(b, t, G, N)))


def _device(kernels, kernel_device):
    return torch.device("cpu") if kernels == "reference" else kernel_device


EMPTY = [(0, 5, None), (1, 0, None), (0, 0, None), (1, 0, [0, 0]), (1, 5, [0, 0, 5, 5])]


@pytest.mark.parametrize("b, t, cu", EMPTY)
def test_ssd_references_on_empty_batches(b, t, cu):
    cu = None if cu is None else torch.tensor(cu)
    n_seq = b if cu is None else cu.numel() - 1
    s0 = torch.randn(n_seq, H, P, N)
    for fn in (ref.ssd_recurrence, lambda *a, **k: ref.ssd_chunked(*a, chunk_size=Q, **k)):
        y, s = fn(*_ssd_args(b, t), initial_states=s0, cu_seqlens=cu)
        assert y.shape == (b, t, H, P) and s.shape == (n_seq, H, P, N)
        if cu is not None:                   # an empty sequence hands its initial state on
            assert torch.equal(s[0], s0[0].to(s.dtype))


@pytest.mark.parametrize("b, t, cu", EMPTY)
def test_conv_reference_on_empty_batches(b, t, cu):
    cu = None if cu is None else torch.tensor(cu)
    n_seq = b if cu is None else cu.numel() - 1
    y, f = ref.causal_conv1d_reference(torch.randn(b, t, D_CH), torch.randn(D_CH, W), cu_seqlens=cu)
    assert y.shape == (b, t, D_CH) and f.shape == (n_seq, W - 1, D_CH)
    y, f = ref.causal_conv1d_update_reference(torch.randn(0, D_CH), torch.randn(0, W - 1, D_CH), torch.randn(D_CH, W))
    assert y.shape == (0, D_CH) and f.shape == (0, W - 1, D_CH)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("b, t, cu", EMPTY)
def test_public_ops_on_empty_batches(kernel_device, kernels, b, t, cu):
    d = _device(kernels, kernel_device)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=d)
    n_seq = b if cu is None else cu.numel() - 1
    xz = torch.randn(b, t, D_CH, device=d)
    with dispatch.use(kernels):
        y, s = ssm.ssd_scan(*_ssd_args(b, t, d), chunk_size=Q, cu_seqlens=cu, return_final_states=True)
        assert y.shape == (b, t, H, P) and s.shape == (n_seq, H, P, N)
        assert ssm.gated_rmsnorm(xz, xz, torch.ones(D_CH, device=d), group_size=3).shape == (b, t, D_CH)
        y = ssm.selective_state_update(*(v.to(d) for v in (torch.zeros(0, H, P, N), torch.randn(0, H, P),
                                                           torch.rand(0, H), -torch.rand(H), torch.randn(0, G, N),
                                                           torch.randn(0, G, N))))
        assert y.shape == (0, H, P)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("b, t, cu", EMPTY)
def test_public_conv_on_empty_batches(kernel_device, kernels, b, t, cu):
    d = _device(kernels, kernel_device)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=d)
    n_seq = b if cu is None else cu.numel() - 1
    w = torch.randn(D_CH, W, device=d)
    with dispatch.use(kernels):
        y, f = ssm.causal_conv1d(torch.randn(b, t, D_CH, device=d), w, cu_seqlens=cu, return_final_states=True)
        assert y.shape == (b, t, D_CH) and f.shape == (n_seq, W - 1, D_CH)
        if b == 0:
            y = ssm.causal_conv1d_update(torch.randn(0, D_CH, device=d), torch.zeros(0, W - 1, D_CH, device=d), w)
            assert y.shape == (0, D_CH)
