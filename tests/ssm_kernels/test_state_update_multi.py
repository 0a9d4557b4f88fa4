"""Multi-token decode updates (speculative verification): the selective state update and the causal
conv1d update over T tokens in one call, keeping the state after each token.

The references are defined as T sequential single-token references (checked bit for bit); the ops'
reference path equals T single-token op calls bit for bit; the fast torch paths (CPU's default) and
the Triton kernels match the references;
the hybrid cache's verify + accept(n) leaves exactly the states of n plain decode steps."""
import pytest
import torch
from hypothesis import given, strategies as st

from nemotron import dispatch
from nemotron import ssm_kernels as ssm
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.ssm_kernels import reference as ref

from ..close import assert_close, assert_equal, max_abs
from ..strategies import seeds

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# fp32 math in kernel and reference: per token one N-sum (state update) or <= 4 products (conv); the
# kernel's exp / log (softplus) differ from torch's by ulps, growing over <= 5 tokens, then one
# rounding to the output dtype. Relative to max |reference|; a fp16 state adds its own rounding.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def ssu_inputs(draw):
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    h = draw(st.sampled_from([1, 2, 4, 6]))
    g = draw(st.sampled_from([d for d in (1, 2, 3, 6) if h % d == 0]))
    p, n = draw(st.integers(1, 20)), draw(st.integers(1, 18))
    dtype, state_dtype, out_dtype = draw(st.sampled_from(FLOATS)), *draw(st.tuples(*[st.sampled_from(FLOATS[:2])] * 2))
    d_shape = draw(st.sampled_from([None, (h,), (h, p)]))
    has_z, has_dtb, softplus, a_full = (draw(st.booleans()) for _ in range(4))
    gen = torch.Generator().manual_seed(draw(seeds))
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    kw = dict(D=r(*d_shape) if d_shape else None, z=r(b, t, h, p).to(dtype) if has_z else None,
              dt_bias=(torch.rand(h, generator=gen) - 0.5) if has_dtb else None, dt_softplus=softplus)
    dt = (r(b, t, h) if softplus else 0.5 * torch.rand(b, t, h, generator=gen)).to(dtype)
    A = -torch.exp(r(h, p, n) if a_full else r(h))
    args = (r(b, h, p, n).to(state_dtype), r(b, t, h, p).to(dtype), dt, A, r(b, t, g, n).to(dtype),
            r(b, t, g, n).to(dtype))
    return args, kw, out_dtype


def _sequential_ops(state, x, dt, A, B, C, *, z=None, **kw):
    """T single-token selective_state_update op calls; (y [B, T, H, P], states [B, T, H, P, N])."""
    ys, states = [], []
    for j in range(x.shape[1]):
        ys.append(ssm.selective_state_update(state, x[:, j], dt[:, j], A, B[:, j], C[:, j],
                                             z=None if z is None else z[:, j], **kw))
        states.append(state.clone())
    return torch.stack(ys, 1), torch.stack(states, 1)


@given(case=ssu_inputs())
def test_ssu_reference_and_reference_op_equal_sequential_single_token_updates(case):
    (state, x, dt, A, B, C), kw, out_dtype = case
    y, states = ref.selective_state_update_multi_reference(state, x, dt, A, B, C, **kw)
    cur = state
    for j in range(x.shape[1]):      # the definition, written out: single-token references in order
        yj, new = ref.selective_state_update_reference(cur, x[:, j], dt[:, j], A, B[:, j], C[:, j],
                                                       **{**kw, "z": None if kw["z"] is None else kw["z"][:, j]})
        cur = new.to(state.dtype)
        assert_equal(y[:, j], yj, what=f"reference y, token {j}")
        assert_equal(states[:, j], cur, what=f"reference state, token {j}")
    s_multi, out = state.clone(), torch.empty(*states.shape, dtype=out_dtype)
    with dispatch.use("reference"):
        got = ssm.selective_state_update_multi(s_multi, x, dt, A, B, C, states_out=out, **kw)
        s_seq = state.clone()
        want, want_states = _sequential_ops(s_seq, x, dt, A, B, C, **kw)
    assert_equal(got, want, what="op y vs T single-token ops")
    assert_equal(s_multi, s_seq, what="op final state vs T single-token ops")
    assert_equal(out, want_states.to(out_dtype), what="op states_out vs T single-token ops")


@given(case=ssu_inputs())
def test_ssu_triton_kernel_matches_reference(kernel_device, case):
    (state, x, dt, A, B, C), kw, out_dtype = case
    y_ref, states_ref = ref.selective_state_update_multi_reference(state, x, dt, A, B, C, dtype=torch.float32, **kw)
    dv = kernel_device
    mv = lambda v: None if not isinstance(v, torch.Tensor) else v.to(dv)  # noqa: E731
    s = state.to(dv)
    out = torch.empty(*states_ref.shape, dtype=out_dtype, device=dv)
    with dispatch.use("triton"), dispatch.trace() as ran:
        y = ssm.selective_state_update_multi(s, *map(mv, (x, dt, A, B, C)), states_out=out,
                                             **{k: mv(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    assert ran == [("selective_state_update_multi", "triton")]
    tol = max(TOL[x.dtype], TOL[state.dtype], TOL[out_dtype])
    assert_close(y.cpu(), y_ref.to(x.dtype), atol=tol * max_abs(y_ref), what="y")
    assert_close(out.cpu(), states_ref.to(out_dtype), atol=tol * max_abs(states_ref), what="states_out")
    assert_close(s.cpu(), states_ref[:, -1], atol=tol * max_abs(states_ref), what="final state")


@given(case=ssu_inputs())
def test_ssu_torch_path_matches_reference_and_single_token_calls(case):
    (state, x, dt, A, B, C), kw, out_dtype = case
    y_ref, states_ref = ref.selective_state_update_multi_reference(state, x, dt, A, B, C, dtype=torch.float32, **kw)
    s, out = state.clone(), torch.empty(*states_ref.shape, dtype=out_dtype)
    with dispatch.trace() as ran:
        y = ssm.selective_state_update_multi(s, x, dt, A, B, C, states_out=out, **kw)
    assert ran == [("selective_state_update_multi", "torch")]
    tol = max(TOL[x.dtype], TOL[state.dtype], TOL[out_dtype])
    assert_close(y, y_ref.to(x.dtype), atol=tol * max_abs(y_ref), what="y")
    assert_close(out, states_ref.to(out_dtype), atol=tol * max_abs(states_ref), what="states_out")
    assert_close(s, states_ref[:, -1], atol=tol * max_abs(states_ref), what="final state")
    s_seq = state.clone()
    y_seq, states_seq = _sequential_ops(s_seq, x, dt, A, B, C, **kw)       # the torch single-token path
    assert_close(y, y_seq, atol=tol * max_abs(y_ref), what="y vs T single-token torch calls")
    assert_close(s, s_seq, atol=tol * max_abs(states_ref), what="final state vs T single-token torch calls")


def test_ssu_triton_multi_equals_single_token_kernel_calls(kernel_device):
    """The verify path's kernel does the decode kernel's arithmetic: greedy MTP equals plain greedy."""
    g = torch.Generator().manual_seed(7)
    b, t, h, p, n, gr = 2, 4, 4, 24, 16, 2
    r = lambda *s: torch.randn(*s, generator=g).to(kernel_device)  # noqa: E731
    x, dt, A, B, C = r(b, t, h, p), torch.rand(b, t, h, generator=g).to(kernel_device), -torch.rand(h).to(kernel_device), \
        r(b, t, gr, n), r(b, t, gr, n)
    D = r(h)
    for sd in (torch.float32, torch.float16):
        s0 = r(b, h, p, n).to(sd)
        with dispatch.use("triton"):
            s1, out = s0.clone(), torch.empty(b, t, h, p, n, dtype=sd, device=kernel_device)
            y = ssm.selective_state_update_multi(s1, x, dt, A, B, C, states_out=out, D=D)
            s2 = s0.clone()
            want, states = _sequential_ops(s2, x, dt, A, B, C, D=D)
        assert_equal(y, want, what=f"y ({sd} state)")
        assert_equal(out, states, what=f"states ({sd} state)")


@st.composite
def conv_inputs(draw):
    b, t, d, w = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 8, 24, 40])), \
        draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOATS))
    gen = torch.Generator().manual_seed(draw(seeds))
    bias = torch.randn(d, generator=gen) if draw(st.booleans()) else None
    act = draw(st.sampled_from([None, "silu"]))
    return (torch.randn(b, t, d, generator=gen).to(dtype), torch.randn(b, w - 1, d, generator=gen).to(dtype),
            torch.randn(d, w, generator=gen), bias, act)


@given(case=conv_inputs())
def test_conv_reference_and_reference_op_equal_sequential_single_token_updates(case):
    x, s0, w, bias, act = case
    y, states = ref.causal_conv1d_update_multi_reference(x, s0, w, bias, activation=act)
    cur = s0
    for j in range(x.shape[1]):
        yj, cur = ref.causal_conv1d_update_reference(x[:, j], cur, w, bias, activation=act)
        assert_equal(y[:, j], yj, what=f"reference y, token {j}")
        assert_equal(states[:, j], cur.to(x.dtype), what=f"reference conv state, token {j}")
    s_multi, out = s0.clone(), torch.empty_like(states)
    s_seq, ys, seq_states = s0.clone(), [], []
    with dispatch.use("reference"):
        got = ssm.causal_conv1d_update_multi(x, s_multi, w, bias, activation=act, conv_states_out=out)
        for j in range(x.shape[1]):
            ys.append(ssm.causal_conv1d_update(x[:, j], s_seq, w, bias, activation=act))
            seq_states.append(s_seq.clone())
    assert_equal(got, torch.stack(ys, 1), what="op y vs T single-token ops")
    assert_equal(s_multi, s_seq, what="op final conv state")
    assert_equal(out, torch.stack(seq_states, 1), what="op conv_states_out")


@given(case=conv_inputs())
def test_conv_triton_kernel_matches_reference(kernel_device, case):
    x, s0, w, bias, act = case
    y_ref, states_ref = ref.causal_conv1d_update_multi_reference(x, s0, w, bias, activation=act, dtype=torch.float32)
    dv = kernel_device
    s, out = s0.to(dv), torch.empty(*states_ref.shape, dtype=x.dtype, device=dv)
    with dispatch.use("triton"), dispatch.trace() as ran:
        y = ssm.causal_conv1d_update_multi(x.to(dv), s, w.to(dv), None if bias is None else bias.to(dv),
                                           activation=act, conv_states_out=out)
    assert ran == [("causal_conv1d_update_multi", "triton")]
    assert_close(y.cpu(), y_ref.to(x.dtype), atol=TOL[x.dtype] * max_abs(y_ref), what="y")
    assert_equal(out.cpu(), states_ref, what="conv_states_out (copies of inputs: exact)")
    assert_equal(s.cpu(), states_ref[:, -1], what="final conv state")


@given(case=conv_inputs())
def test_conv_torch_path_matches_reference(case):
    x, s0, w, bias, act = case
    y_ref, states_ref = ref.causal_conv1d_update_multi_reference(x, s0, w, bias, activation=act, dtype=torch.float32)
    s, out = s0.clone(), torch.empty(*states_ref.shape, dtype=x.dtype)
    with dispatch.trace() as ran:
        y = ssm.causal_conv1d_update_multi(x, s, w, bias, activation=act, conv_states_out=out)
    assert ran == [("causal_conv1d_update_multi", "torch")]
    assert_close(y, y_ref.to(x.dtype), atol=TOL[x.dtype] * max_abs(y_ref), what="y")
    assert_equal(out, states_ref, what="conv_states_out (copies of inputs: exact)")
    assert_equal(s, states_ref[:, -1], what="final conv state")


def _ssu_args(**over):
    b, t, h, p, n, g = 2, 3, 4, 8, 16, 2
    a = dict(state=torch.zeros(b, h, p, n), x=torch.zeros(b, t, h, p), dt=torch.zeros(b, t, h), A=torch.zeros(h),
             B=torch.zeros(b, t, g, n), C=torch.zeros(b, t, g, n), states_out=torch.zeros(b, t, h, p, n))
    a.update(over)
    return a


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.zeros(2, 4, 8)), "x: expected"),
    (dict(state=torch.zeros(3, 4, 8, 16)), "state: expected"),
    (dict(state=torch.zeros(2, 4, 8, 32)[..., :16]), "state: its last two dims"),
    (dict(B=torch.zeros(2, 3, 3, 16)), "B: expected"),
    (dict(C=torch.zeros(2, 2, 2, 16)), "C: expected"),
    (dict(dt=torch.zeros(2, 2, 4)), "dt: expected"),
    (dict(A=torch.zeros(5)), "A: expected"),
    (dict(D=torch.zeros(3)), "D: expected"),
    (dict(z=torch.zeros(2, 3, 4, 7)), "z: expected"),
    (dict(dt_bias=torch.zeros(4, 9)), "dt_bias: expected"),
    (dict(states_out=torch.zeros(2, 2, 4, 8, 16)), "states_out: expected shape"),
    (dict(states_out=torch.zeros(2, 3, 4, 8, 16, dtype=torch.bfloat16)), "states_out: expected dtype"),
    (dict(states_out=torch.zeros(2, 3, 4, 8, 32)[..., :16]), "states_out: the dims after"),
    (dict(x=torch.zeros(2, 3, 4, 8, dtype=torch.int32)), "x: expected dtype"),
    (dict(states_out=None), "states_out: required"),
])
def test_ssu_bad_arguments_name_the_argument(over, match):
    a = _ssu_args(**over)
    with pytest.raises((ValueError, TypeError), match=match):
        ssm.selective_state_update_multi(a.pop("state"), a.pop("x"), a.pop("dt"), a.pop("A"), a.pop("B"), a.pop("C"),
                                         **a)


def test_ssu_dt_softplus_must_be_a_bool():
    a = _ssu_args()
    with pytest.raises(TypeError, match="dt_softplus"):
        ssm.selective_state_update_multi(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"],
                                         states_out=a["states_out"], dt_softplus=1)


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.zeros(2, 3)), "x: expected"),
    (dict(conv_state=torch.zeros(2, 2, 8)), "conv_state: expected shape"),
    (dict(conv_state=torch.zeros(2, 3, 8, dtype=torch.float16)), "conv_state: expected dtype"),
    (dict(conv_states_out=torch.zeros(2, 4, 3, 8)), "conv_states_out: expected shape"),
    (dict(conv_states_out=torch.zeros(2, 3, 3, 8, dtype=torch.float16)), "conv_states_out: expected dtype"),
    (dict(conv_states_out=torch.zeros(2, 3, 3, 16)[..., :8]), "conv_states_out: the dims after"),
    (dict(weight=torch.zeros(8, 40)), "weight: expected"),
    (dict(activation="relu"), "activation"),
])
def test_conv_bad_arguments_name_the_argument(over, match):
    a = dict(x=torch.zeros(2, 3, 8), conv_state=torch.zeros(2, 3, 8), weight=torch.zeros(8, 4),
             conv_states_out=torch.zeros(2, 3, 3, 8))
    a.update(over)
    with pytest.raises((ValueError, TypeError), match=match):
        ssm.causal_conv1d_update_multi(a.pop("x"), a.pop("conv_state"), a.pop("weight"), **a)


def _mamba():
    m = NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=0)
    i = m.config.layers_block_type.index("linear_attention")
    return m, m.backbone.layers[i].mixer, i


@pytest.mark.parametrize("kernels", ["reference", "torch", "triton"])
@pytest.mark.parametrize("ssm_dtype, rounding", [(torch.float32, "nearest"), (torch.float16, "nearest"),
                                                 (torch.float16, "stochastic")])
def test_mixer_verify_then_accept_n_equals_n_decode_steps(kernel_device, kernels, ssm_dtype, rounding):
    """The verify path (one multi-token call of each update) on the same conv inputs gives the decode
    path's outputs, and accept(n) leaves its states after n tokens, bit for bit."""
    m, mixer, key = _mamba()
    cfg, dv = m.config, kernel_device if kernels == "triton" else torch.device("cpu")
    m.to(dv)
    g = torch.Generator().manual_seed(3)
    xbc, dt = torch.randn(1, 4, cfg.conv_dim, generator=g).to(dv), torch.randn(1, 4, cfg.mamba_num_heads, generator=g).to(dv)
    w, A = mixer.conv1d.weight.squeeze(1), -torch.exp(mixer.A_log.float())
    with torch.no_grad(), dispatch.use(kernels):
        for n in (1, 2, 4):
            dec, ver = (m.new_cache(1, 8, ssm_dtype=ssm_dtype, ssm_rounding=rounding) for _ in range(2))
            for c in (dec, ver):                       # a common nonzero starting state
                c.conv[key].copy_(torch.randn(c.conv[key].shape, generator=torch.Generator().manual_seed(n)))
                c.ssm[key].copy_(torch.randn(c.ssm[key].shape, generator=torch.Generator().manual_seed(n)))
            want = torch.cat([mixer._steps(xbc[:, j:j + 1], dt[:, j:j + 1], w, mixer.conv1d.bias, A, dec.layers[key])
                              for j in range(n)], 1)
            ver.begin_verify()
            got = mixer._steps(xbc, dt, w, mixer.conv1d.bias, A, ver.layers[key])
            ver.accept(n)
            assert_equal(ver.conv[key], dec.conv[key], what=f"conv state, n={n}")
            if rounding == "nearest":
                assert_equal(got[:, :n], want, what=f"y, n={n}")
                assert_equal(ver.ssm[key], dec.ssm[key], what=f"SSM state, n={n}")
            else:   # verification rounds its fp32 states once (at accept), decode after every step: ~2 fp16 ulps
                assert_close(got[:, :n], want, atol=2e-3 * max_abs(want), what=f"y, n={n}")
                assert_close(ver.ssm[key].float(), dec.ssm[key].float(), atol=2e-3 * max_abs(dec.ssm[key]),
                             what=f"SSM state, n={n}")


@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.float16])
def test_cache_verify_then_accept_n_matches_n_decode_steps(ssm_dtype):
    """Whole model: verify 4 tokens, accept(n), versus n decode steps. in_proj over 4 rows and over 1
    row sums in different orders (ulps in the conv inputs), so the states agree to fp32 rounding
    (a fp16 state: to its rounding, which those ulps can flip)."""
    m = NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=0)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    tol = 1e-5 if ssm_dtype == torch.float32 else 2e-3
    with torch.no_grad():
        for n in (1, 3, 4):
            ref_cache, cache = m.new_cache(1, 16, ssm_dtype=ssm_dtype), m.new_cache(1, 16, ssm_dtype=ssm_dtype)
            m(ids[:, :6], cache=ref_cache)
            m(ids[:, :6], cache=cache)
            for j in range(6, 6 + n):
                m(ids[:, j:j + 1], cache=ref_cache)
            cache.begin_verify()
            m.hidden_states(ids[:, 6:10], cache)
            cache.accept(n)
            assert cache.seq_len == ref_cache.seq_len == 6 + n
            for key in ref_cache.conv:
                for what, a, e in (("conv", cache.conv[key], ref_cache.conv[key]),
                                   ("SSM", cache.ssm[key], ref_cache.ssm[key])):
                    assert_close(a.float(), e.float(), atol=tol * max_abs(e), what=f"{what} state, layer {key}, n={n}")
    with torch.no_grad(), pytest.raises(ValueError, match="n: expected 1..4"):
        cache.begin_verify()
        m.hidden_states(ids[:, 6:10], cache)
        cache.accept(5)
