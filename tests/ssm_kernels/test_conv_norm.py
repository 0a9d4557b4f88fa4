"""causal conv1d (+update), selective state update and gated RMSNorm against their FP64 references."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from nemotron import ssm_kernels as ssm
from nemotron.ssm_kernels import reference as ref
from nemotron.ssm_kernels.triton import conv1d, gated_rmsnorm, state_update

from ..close import assert_close, assert_equal, max_abs
from ..strategies import seeds

# fp32 math in every kernel: <= 4 products (conv), one N-sum (state update), one group sum (norm)
# per output, then one rounding to the output dtype. Relative to max |reference|.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got, want, dtype, what="values"):
    assert_close(got, want, atol=TOL[dtype] * max_abs(want), what=what)


@given(seed=seeds, b=st.integers(1, 2), t=st.integers(1, 40), d=st.sampled_from([8, 24, 40, 136]),
       w=st.integers(2, 4), silu=st.booleans(), bias=st.booleans(), init=st.booleans(), varlen=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_conv1d_kernel_matches_reference(kernel_device, seed, b, t, d, w, silu, bias, init, varlen, dtype):
    g = torch.Generator().manual_seed(seed)
    b = 1 if varlen else b
    x = torch.randn(b, t, d, generator=g).to(dtype)
    wt, bs = torch.randn(d, w, generator=g), torch.randn(d, generator=g) if bias else None
    cu = None
    n_seq = b
    if varlen:
        cut = int(torch.randint(0, t + 1, (1,), generator=g))
        cu = torch.tensor(sorted({0, cut, t}), dtype=torch.int32)
        n_seq = cu.numel() - 1
    s0 = torch.randn(n_seq, w - 1, d, generator=g).to(dtype) if init else None
    act = "silu" if silu else None
    want, want_f = ref.causal_conv1d_reference(x, wt, bs, activation=act, initial_states=s0, cu_seqlens=cu)
    dv = kernel_device
    got = conv1d.causal_conv1d(x.to(dv), wt.to(dv), bs.to(dv) if bias else None, activation=act,
                                initial_states=s0.to(dv) if init else None, cu_seqlens=cu.to(dv) if varlen else None)
    _close(got, want, dtype)
    _, f = ssm.causal_conv1d(x, wt, bs, activation=act, initial_states=s0, cu_seqlens=cu, return_final_states=True)
    assert_equal(f.double(), want_f.to(dtype).double(), what="final states")


def test_conv1d_reference_equals_torch_conv1d():
    x, w, b = torch.randn(2, 17, 12, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    want = F.conv1d(x.transpose(1, 2), w[:, None], b, padding=3, groups=12)[..., :17].transpose(1, 2)
    got, _ = ref.causal_conv1d_reference(x, w, b)
    assert_close(got, want, atol=1e-12)                 # fp64: 4 products and a bias, in another order


def test_conv1d_update_steps_equal_full_conv():
    x, w, b = torch.randn(3, 12, 40), torch.randn(40, 4), torch.randn(40)
    full = ssm.causal_conv1d(x, w, b, activation="silu")
    state = torch.zeros(3, 3, 40)
    for t in range(12):
        y = ssm.causal_conv1d_update(x[:, t], state, w, b, activation="silu")
        _close(y, full[:, t], torch.float32)
    assert_equal(state, x[:, -3:], what="conv state")


@given(seed=seeds, b=st.integers(1, 3), h=st.sampled_from([2, 4]), p=st.sampled_from([4, 12]), n=st.sampled_from([8, 16]),
       tied=st.booleans(), pad=st.booleans(), z=st.booleans(), state_dtype=st.sampled_from([torch.float32, torch.float16]))
def test_state_update_kernel_matches_reference(kernel_device, seed, b, h, p, n, tied, pad, z, state_dtype):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    groups = h // 2
    state = r(b + 1, h, p, n).to(state_dtype)
    x, B, C = r(b, h, p), r(b, groups, n), r(b, groups, n)
    if tied:   # mamba's Mamba2.step: stride-0 expanded views
        dt, A, D, dtb = r(b, h)[..., None].expand(b, h, p), (-torch.rand(h, generator=g))[:, None, None].expand(h, p, n), r(h), r(h)
    else:
        dt, A, D, dtb = r(b, h, p), -torch.rand(h, p, n, generator=g), r(h, p), r(h, p)
    idx = torch.randperm(b + 1, generator=g)[:b].to(torch.int32)
    if pad:
        idx[0] = -1
    zz = r(b, h, p) if z else None
    kw = dict(D=D, z=zz, dt_bias=dtb, dt_softplus=True, state_indices=idx)
    want_y, want_s = ref.selective_state_update_reference(state, x, dt, A, B, C, **kw)
    dv = kernel_device
    st_k = state.to(dv)
    mv = lambda v: v.to(dv) if isinstance(v, torch.Tensor) else v  # noqa: E731
    got = state_update.selective_state_update(st_k, *(mv(v) for v in (x, dt, A, B, C)), **{k: mv(v) for k, v in kw.items()})
    _close(got, want_y, torch.float32, what="y")
    _close(st_k, want_s, state_dtype, what="state")
    if pad:
        assert (got[0] == 0).all()


@given(seed=seeds, rows=st.integers(1, 9), groups=st.integers(1, 4), gs=st.sampled_from([16, 48, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_gated_rmsnorm_kernel_matches_reference(kernel_device, seed, rows, groups, gs, dtype):
    g = torch.Generator().manual_seed(seed)
    d = groups * gs
    x, z, w = torch.randn(rows, d, generator=g).to(dtype), torch.randn(rows, d, generator=g).to(dtype), torch.randn(d, generator=g)
    want = ref.gated_rmsnorm_reference(x, z, w, group_size=gs)
    got = gated_rmsnorm.gated_rmsnorm(x.to(kernel_device), z.to(kernel_device), w.to(kernel_device), group_size=gs)
    _close(got, want, dtype)
    _close(ssm.gated_rmsnorm(x, z, w, group_size=gs), want, dtype)


def test_gated_rmsnorm_is_norm_after_gate():
    x, z, w = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
    y = ref.gated_rmsnorm_reference(x, z, w, group_size=32)
    v = x * F.silu(z)
    assert_close(y, v / v.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt(), rtol=1e-12)     # fp64, another order


def test_opchecks():
    x, w = torch.randn(2, 6, 16), torch.randn(16, 4)
    torch.library.opcheck(torch.ops.nemotron.causal_conv1d.default, (x, w, None, True, None, None, True))
    torch.library.opcheck(torch.ops.nemotron.causal_conv1d_update.default, (x[:, :1], torch.randn(2, 3, 16), w, None, True))
    st_, xx = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4)
    torch.library.opcheck(torch.ops.nemotron.selective_state_update.default,
                          (st_, xx, torch.rand(2, 2), -torch.rand(2), torch.randn(2, 1, 8), torch.randn(2, 1, 8),
                           None, None, None, True, None))
    torch.library.opcheck(torch.ops.nemotron.gated_rmsnorm.default, (torch.randn(3, 32), torch.randn(3, 32), torch.randn(32), 16, 1e-5))


@pytest.mark.parametrize("call, match", [
    (lambda: ssm.causal_conv1d(torch.randn(2, 5), torch.randn(5, 4)), "x: expected"),
    (lambda: ssm.causal_conv1d(torch.randn(2, 5, 8), torch.randn(8, 33)), "width"),
    (lambda: ssm.causal_conv1d(torch.randn(2, 5, 8), torch.randn(8, 4), activation="relu"), "activation"),
    (lambda: ssm.causal_conv1d(torch.randn(2, 5, 8), torch.randn(8, 4), initial_states=torch.randn(2, 4, 8)), "initial_states"),
    (lambda: ssm.causal_conv1d_update(torch.randn(2, 8), torch.randn(2, 3, 8).half(), torch.randn(8, 4)), "conv_state"),
    (lambda: ssm.selective_state_update(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4), torch.rand(2, 2), -torch.rand(2),
                                        torch.randn(2, 3, 8), torch.randn(2, 3, 8)), "G dividing"),
    (lambda: ssm.selective_state_update(torch.randn(3, 2, 4, 8), torch.randn(2, 2, 4), torch.rand(2, 2), -torch.rand(2),
                                        torch.randn(2, 1, 8), torch.randn(2, 1, 8)), "state_indices"),
    (lambda: ssm.selective_state_update(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4), torch.rand(2, 2), -torch.rand(2),
                                        torch.randn(2, 1, 8), torch.randn(2, 1, 8), state_indices=torch.tensor([0, 5])), "< 2"),
    (lambda: ssm.gated_rmsnorm(torch.randn(2, 30), torch.randn(2, 30), torch.randn(30), group_size=16), "group_size"),
    (lambda: ssm.gated_rmsnorm(torch.randn(2, 32), torch.randn(2, 31), torch.randn(32), group_size=16), "z: expected"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
