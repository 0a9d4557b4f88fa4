"""SSD scan: references against each other, the Triton kernel against the FP64 recurrence."""
import math

import pytest
import torch
from hypothesis import example, given, strategies as st

from nemotron import dispatch
from nemotron import ssm_kernels as ssm
from nemotron.ssm_kernels import reference as ref
from nemotron.ssm_kernels.triton import ssd as ssd_kernels

from ..close import assert_close, rms
from ..strategies import seeds

# Relative tolerance on max|y - y_ref| / rms(y_ref). fp32: the kernel sums <= Q fp32 products per
# MMA and carries the state over chunks (error ~ Q * 2^-24 per chunk). fp16 / bf16: like upstream it
# rounds the decay-weighted CB, the state and x*dt*decay to the input dtype before each MMA (one
# rounding of eps each), and stores y in that dtype.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _on(device, kw: dict) -> dict:
    """The tensors of a kwargs dict moved to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _close(got, want, tol, what="y"):
    """max |got - want| <= tol * rms(want), elementwise and NaN-safe."""
    assert_close(got, want, atol=tol * rms(want), what=what)


@st.composite
def ssd_problems(draw, *, dtype=None):
    seed = draw(seeds)
    g_ = torch.Generator().manual_seed(seed)
    h = draw(st.sampled_from([2, 4]))
    g = draw(st.sampled_from([1, h // 2, h]))
    p, n = draw(st.sampled_from([8, 12])), draw(st.sampled_from([8, 16]))
    chunk = draw(st.sampled_from([16, 32, 64]))
    varlen = draw(st.booleans())
    t = draw(st.sampled_from([1, chunk - 1, chunk, chunk + 1]) | st.integers(1, 70))
    b = 1 if varlen else draw(st.integers(1, 2))
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float16]))
    r = lambda *s: torch.randn(*s, generator=g_)  # noqa: E731
    kw = dict(chunk_size=chunk, dt_softplus=draw(st.booleans()))
    x, dt, B, C = r(b, t, h, p), r(b, t, h) - 1, r(b, t, g, n), r(b, t, g, n)
    A = -torch.exp(r(h))
    if draw(st.booleans()):
        kw["D"] = r(h) if draw(st.booleans()) else r(h, p)
    if draw(st.booleans()):
        kw["z"] = r(b, t, h, p).to(dtype)
    if draw(st.booleans()):
        kw["dt_bias"] = r(h)
    if not kw["dt_softplus"]:                              # the processed dt must be >= 0 (a decay)
        dt = dt.abs()
        if "dt_bias" in kw:
            kw["dt_bias"] = kw["dt_bias"].abs()
    if draw(st.booleans()):
        kw["dt_limit"] = (0.01, 2.0)
    n_seq = b
    if varlen:
        cuts = sorted(set(draw(st.lists(st.integers(0, t), max_size=3))))
        cu = torch.tensor([0] + [c for c in cuts if 0 < c < t] + [t], dtype=torch.int32)
        kw["cu_seqlens"], n_seq = cu, cu.numel() - 1
    if draw(st.booleans()):
        kw["initial_states"] = r(n_seq, h, p, n)
    return (x.to(dtype), dt.to(dtype), A, B.to(dtype), C.to(dtype)), kw


@given(ssd_problems(dtype=torch.float64))
def test_chunked_reference_equals_recurrence(prob):
    args, kw = prob
    chunk = kw.pop("chunk_size")
    y1, s1 = ref.ssd_recurrence(*args, **kw)
    y2, s2 = ref.ssd_chunked(*args, chunk_size=chunk, dtype=torch.float64, **kw)
    _close(y2, y1, 1e-10)                                     # fp64, two orders of summation
    _close(s2, s1, 1e-10, "final states")


@given(ssd_problems())
@example(prob=((torch.randn(1, 63, 2, 60), torch.rand(1, 63, 2), -torch.rand(2), torch.randn(1, 63, 1, 16),
                torch.randn(1, 63, 1, 16)), dict(chunk_size=32)))                 # T=63, P=60 found bugs upstream
def test_kernel_matches_recurrence(kernel_device, prob):
    args, kw = prob
    want_y, want_s = ref.ssd_recurrence(*args, **{k: v for k, v in kw.items() if k != "chunk_size"})
    d = kernel_device
    got_y, got_s = ssd_kernels.ssd_scan(*(a.to(d) for a in args), return_final_states=True,
                                        **_on(d, kw))
    tol = TOL[args[0].dtype]
    assert got_y.dtype == args[0].dtype and got_s.dtype == torch.float32
    _close(got_y, want_y, tol)
    _close(got_s, want_s, tol, "final states")


@given(ssd_problems(dtype=torch.float32))
def test_public_op_matches_recurrence(prob):
    args, kw = prob
    want_y, want_s = ref.ssd_recurrence(*args, **{k: v for k, v in kw.items() if k != "chunk_size"})
    y, s = ssm.ssd_scan(*args, return_final_states=True, **kw)
    _close(y, want_y, TOL[torch.float32])
    _close(s, want_s, TOL[torch.float32], "final states")


def _problem(t=50, b=2, h=4, g=2, p=16, n=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return (r(b, t, h, p).to(dtype), r(b, t, h).to(dtype), -torch.exp(r(h)), r(b, t, g, n).to(dtype),
            r(b, t, g, n).to(dtype)), dict(D=r(h), dt_bias=r(h), dt_softplus=True)


def test_chunk_size_invariance(kernel_device):
    args, kw = _problem()
    args = [a.to(kernel_device) for a in args]
    kw = _on(kernel_device, kw)
    ys = [ssd_kernels.ssd_scan(*args, chunk_size=q, **kw).cpu() for q in (16, 32, 64)]
    _close(ys[0], ys[2], 1e-5, "chunk 16 vs 64")                  # fp32, different summation order only
    _close(ys[1], ys[2], 1e-5, "chunk 32 vs 64")


def test_split_anywhere_and_carry(kernel_device):
    """Scan [0, n) then [n, T) from the carried state equals the unsplit scan."""
    args, kw = _problem(t=45)
    d = kernel_device
    args = [a.to(d) for a in args]
    kw = _on(d, kw)
    y, s = ssd_kernels.ssd_scan(*args, chunk_size=16, return_final_states=True, **kw)
    for n in (1, 16, 23):
        first = [a[:, :n] if a.dim() > 1 else a for a in args]
        rest = [a[:, n:] if a.dim() > 1 else a for a in args]
        y1, s1 = ssd_kernels.ssd_scan(*first, chunk_size=16, return_final_states=True, **kw)
        y2, s2 = ssd_kernels.ssd_scan(*rest, chunk_size=16, initial_states=s1, return_final_states=True, **kw)
        _close(torch.cat([y1, y2], 1), y, 1e-5, f"y split at {n}")
        _close(s2, s, 1e-5, f"final states split at {n}")


def test_prefill_then_decode_equals_longer_prefill():
    """Prefill n tokens, then k selective_state_update steps == prefill of n + k (mamba's key invariant)."""
    args, kw = _problem(t=40)
    x, dt, A, B, C = args
    n = 33
    y_full = ssm.ssd_scan(*args, chunk_size=16, **kw)
    _, state = ssm.ssd_scan(x[:, :n], dt[:, :n], A, B[:, :n], C[:, :n], chunk_size=16, return_final_states=True, **kw)
    for t in range(n, 40):
        y_t = ssm.selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], **kw)
        _close(y_t, y_full[:, t], 1e-4, f"decode step {t}")


def test_extreme_dt_and_negative_a_stay_finite(kernel_device):
    """dt up to 1e4 with A = -1e3: every exponent is clamped <= 0, so the output stays finite. With a
    uniform extreme dt the decays are exactly 0 off the diagonal and the kernel matches the reference;
    with mixed dt the fp32 cumsum (~1e8) cancels in cs_i - cs_j, so only finiteness is promised."""
    args, _ = _problem(t=40)
    x, dt, A, B, C = args
    A = torch.full_like(A, -1e3)
    d = kernel_device
    D = torch.ones(4)
    for mixed in (False, True):
        dt = torch.full_like(dt, 1e4)
        if mixed:
            dt[:, ::3] = 1e-6
        got = ssd_kernels.ssd_scan(x.to(d), dt.to(d), A.to(d), B.to(d), C.to(d), chunk_size=16, D=D.to(d))
        assert torch.isfinite(got).all()
        if not mixed:
            want, _ = ref.ssd_recurrence(x, dt, A, B, C, D=D)
            _close(got, want, 1e-4)


def test_long_sequence_memory_is_outputs_and_chunk_buffers(kernel_device, monkeypatch):
    """A 4K-token scan allocates y, the final states, and the chunk-parallel stages' fp32 buffers only:
    dt and its cumsum [1, H, K, Q] and one [H, P, N] state per chunk, nothing quadratic in the chunk
    (no C B^T tensor) and no per-token state."""
    args, kw = _problem(t=4096, b=1, h=2, g=1, p=16, n=16, seed=3)
    d = kernel_device
    args = [a.to(d) for a in args]
    kw = _on(d, kw)
    sizes = []
    real_empty = torch.empty

    def empty(*a, **k):
        t = real_empty(*a, **k)
        sizes.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", empty)
    y, s = ssd_kernels.ssd_scan(*args, chunk_size=64, return_final_states=True, **kw)
    k = 4096 // 64
    chunk_buffers = 2 * (2 * k * 64 * 4) + k * 2 * 16 * 16 * 4
    assert sum(sizes) == y.numel() * y.element_size() + s.numel() * s.element_size() + chunk_buffers
    want, _ = ref.ssd_chunked(*[a.cpu() for a in args], chunk_size=64,
                              **_on("cpu", kw))
    _close(y, want, 1e-4)


def test_opcheck_ssd():
    args, kw = _problem(t=20)
    torch.library.opcheck(torch.ops.nemotron.ssd_scan.default,
                          (*args, 16, kw["D"], None, kw["dt_bias"], True, 0.0, math.inf, None, None, True))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(2, 10, 4)), "x: expected"),
    (dict(B=torch.randn(2, 10, 3, 16)), "divide"),
    (dict(C=torch.randn(2, 10, 2, 8)), "C: expected shape"),
    (dict(dt=torch.randn(2, 11, 4)), "dt: expected shape"),
    (dict(A=torch.randn(4).double()), "A: expected dtype"),
    (dict(D=torch.randn(3)), "D: expected shape"),
    (dict(chunk_size=48), "chunk_size"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
    (dict(cu_seqlens=torch.tensor([0, 5, 10])), "batch 1"),
    (dict(x=torch.randn(2, 10, 4, 32)[..., ::2]), "contiguous"),
    (dict(initial_states=torch.randn(2, 4, 16, 8)), "initial_states"),
])
def test_ssd_bad_input(change, match):
    (x, dt, A, B, C), _ = _problem(t=10)
    kw = dict(x=x, dt=dt, A=A, B=B, C=C)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ssm.ssd_scan(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)


def test_varlen_bad_offsets():
    (x, dt, A, B, C), _ = _problem(t=10, b=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssm.ssd_scan(x, dt, A, B, C, cu_seqlens=torch.tensor([0, 7, 5, 10]))


def test_chunk_table_numbers_the_chunks_of_each_sequence():
    """Varlen: chunks start at each sequence's first token (none mixes two sequences), empty sequences
    have none, and the unused entries of the host-sync-free bound cdiv(T, Q) + S are empty."""
    cu = torch.tensor([0, 0, 5, 5, 40, 41], dtype=torch.int32)
    tab, off, k = ssd_kernels._chunk_table(cu, 41, 16)
    assert k == 3 + 5
    assert off.tolist() == [0, 0, 1, 1, 4, 5]
    used = [(1, 0, 5), (3, 5, 21), (3, 21, 37), (3, 37, 40), (4, 40, 41)]
    assert [tuple(r) for r in tab[:5].tolist()] == used
    assert (tab[5:, 1:] == 0).all()


def test_varlen_empty_and_short_sequences(kernel_device):
    """More sequences than chunks, empty ones among them, boundaries inside chunks: each sequence equals
    its own scan, and an empty sequence's final state is its initial state."""
    args, kw = _problem(t=37, b=1, h=4, g=2, p=16, n=16, seed=4)
    cu = torch.tensor([0, 0, 3, 4, 4, 20, 21, 37, 37], dtype=torch.int32)
    s0 = torch.randn(cu.numel() - 1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    want_y, want_s = ref.ssd_recurrence(*args, cu_seqlens=cu, initial_states=s0, **kw)
    d = kernel_device
    y, s = ssd_kernels.ssd_scan(*(a.to(d) for a in args), chunk_size=16, cu_seqlens=cu.to(d),
                                initial_states=s0.to(d), return_final_states=True, **_on(d, kw))
    _close(y, want_y, TOL[torch.float32])
    _close(s, want_s, TOL[torch.float32], "final states")
    for empty in (0, 3, 7):
        assert torch.equal(s[empty].cpu(), s0[empty]), f"sequence {empty} is empty: its state passes through"


def test_large_chunks_match_recurrence(kernel_device):
    """chunk 128 and 256 (several 64-row blocks per chunk, column blocks up to the diagonal) on a
    sequence spanning several chunks with a partial last one."""
    args, kw = _problem(t=300, b=1, h=2, g=1, p=16, n=16, seed=6)
    want_y, want_s = ref.ssd_recurrence(*args, **kw)
    d = kernel_device
    for q in (128, 256):
        y, s = ssd_kernels.ssd_scan(*(a.to(d) for a in args), chunk_size=q, return_final_states=True, **_on(d, kw))
        _close(y, want_y, TOL[torch.float32], f"y, chunk {q}")
        _close(s, want_s, TOL[torch.float32], f"final states, chunk {q}")


WRAP = 2 ** 31
WIDE_STRIDE = WRAP // 2 + 64     # < 2^31 (a 32-bit kernel argument), yet batch row 2 starts past 2^31 - 1


def _wide(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` [3, ...] copied into a view with dim-0 stride WIDE_STRIDE elements, inner dims contiguous. It
    lives at element WRAP of an untouched allocation (address space only, a few pages written), so an
    offset wrapped in 32 bits reads zeros inside the allocation instead of faulting."""
    inner = t[0].contiguous().stride()
    buf = torch.empty(WRAP + 2 * WIDE_STRIDE + t[0].numel(), dtype=t.dtype, device=device)
    v = buf.as_strided(t.shape, (WIDE_STRIDE, *inner), WRAP)
    v.copy_(t)
    assert v.stride(0) < WRAP <= 2 * v.stride(0)
    return v


def test_batch_offsets_are_64_bit(kernel_device):
    """x, dt, B, C and z with a batch stride whose row-2 offset is past 2^31 elements: the result equals,
    bit for bit, the scan of contiguous copies (same arithmetic, other addresses). 32-bit offset
    arithmetic (``i_b * stride`` in int32) wraps there and reads other memory."""
    args, kw = _problem(t=40, b=3, h=2, g=1, p=16, n=16, seed=7, dtype=torch.bfloat16)
    z = torch.randn(3, 40, 2, 16, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    d = kernel_device
    kw = _on(d, dict(kw, z=z))
    y_wide = ssd_kernels.ssd_scan(*(_wide(a, d) if a.dim() > 1 else a.to(d) for a in args), chunk_size=16,
                                  **dict(kw, z=_wide(z, d)))
    y = ssd_kernels.ssd_scan(*(a.to(d) for a in args), chunk_size=16, **kw)
    assert torch.equal(y_wide, y), "batch rows past 2^31 elements differ: a 32-bit offset wrapped"
    assert torch.isfinite(y).all() and y[2].abs().max() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_super_shape(dtype):
    """Super's mixer shape (H 128, P 64, N 128, G 8, chunk 128) at 2K tokens against the fp32 chunked reference."""
    args, kw = _problem(t=2048, b=1, h=128, g=8, p=64, n=128, seed=1, dtype=dtype)
    want, _ = ref.ssd_chunked(*args, chunk_size=128, **kw)
    got = ssm.ssd_scan(*[a.cuda() for a in args], chunk_size=128,
                       **_on("cuda", kw))
    _close(got, want, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, chunk", [(torch.bfloat16, 256), (torch.float32, 128), (torch.float32, 256)])
def test_gpu_every_accepted_chunk_and_dtype_runs(dtype, chunk):
    """chunk 256 and fp32 inputs once needed more shared memory than a block has (bench.static); the
    chunk-parallel kernels fit every configuration the API accepts, so they run on the GPU and match."""
    args, kw = _problem(t=700, b=1, h=16, g=2, p=64, n=128, seed=2, dtype=dtype)
    assert dispatch.choose("ssd_scan", args[0].cuda()).name == "triton"
    want, _ = ref.ssd_chunked(*args, chunk_size=chunk, **kw)
    got = ssm.ssd_scan(*[a.cuda() for a in args], chunk_size=chunk, **_on("cuda", kw))
    _close(got, want, TOL[dtype])
