"""Backward of the Mamba-2 ops (``nemotron.ssm_kernels.autograd``): fp64 gradcheck against the
references, equality with autograd through the reference whichever kernel ran the forward,
``torch.library.opcheck`` (AOTAutograd, as torch.compile runs it)."""
import math

import pytest
import torch

from nemotron import dispatch
from nemotron import ssm_kernels as ssm
from nemotron.ssm_kernels import reference as ref

from ..close import assert_close, assert_equal, max_abs

OPS = torch.ops.nemotron
INF = math.inf


def _rand(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _value_of(exact, op):
    """``f(*args)`` whose value is ``exact(*args)`` and whose backward is the op's.

    The ops' forward runs in fp32 even on fp64 inputs (and the public functions take no fp64), far too
    coarse for finite differences; with this ``gradcheck`` compares the op's backward with the
    numerical Jacobian of the fp64 reference, which is what the backward claims to differentiate."""
    def f(*args):
        got = op(*args)
        with torch.no_grad():
            want = exact(*args)
        return tuple(w + (o - o.detach()) for o, w in zip(got, want))
    return f


def _gradcheck(f, inputs):
    # fast mode: one random projection of the Jacobian per input, not a backward per output element.
    # Central differences of an fp64 function at eps 1e-6 are good to ~1e-10; the SSD's fp32 final
    # states round their incoming gradient to fp32 (~6e-8). A 1e-4 error in a gradient fails (checked).
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- ssd_scan ------------------------------------------------------------------------------------

SSD_CASES = {
    # name: (b, t, h, g, D shape, z, dt_bias, softplus, dt_limit, initial states, final states, cu_seqlens)
    "plain": (2, 20, 2, 1, None, False, False, False, (0.0, INF), False, False, None),
    "all_options": (2, 20, 4, 2, "h", True, True, True, (0.01, 2.0), True, True, None),
    "varlen": (1, 23, 2, 2, "hp", True, True, True, (0.0, INF), True, True, [0, 5, 5, 19, 23]),
    "one_sequence": (1, 20, 2, 1, "h", True, True, True, (0.0, INF), True, True, None),
}


def _ssd_problem(case, dtype=torch.float64, seed=0):
    b, t, h, g, d_shape, has_z, has_bias, softplus, limit, init, final, cu = SSD_CASES[case]
    p, n = 3, 4
    gen = torch.Generator().manual_seed(seed)
    x = _rand(gen, b, t, h, p, dtype=dtype)
    B, C = _rand(gen, b, t, g, n, dtype=dtype), _rand(gen, b, t, g, n, dtype=dtype)
    dt = _rand(gen, b, t, h) - 1.0
    dt = (dt if softplus else dt.abs()).to(dtype)               # without softplus dt itself must be >= 0 (a decay)
    A = -torch.exp(_rand(gen, h))                               # fp32 in the model, fp64 here
    A = A.to(dtype) if dtype == torch.float64 else A.float()
    D = {None: None, "h": _rand(gen, h), "hp": _rand(gen, h, p)}[d_shape]
    D = D.to(dtype) if D is not None else None
    z = _rand(gen, b, t, h, p, dtype=dtype) if has_z else None
    dt_bias = _rand(gen, h, dtype=dtype) if has_bias else None
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    n_seq = cu.numel() - 1 if cu is not None else b
    s0 = _rand(gen, n_seq, h, p, n, dtype=dtype if dtype == torch.float64 else torch.float32) if init else None
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=s0)
    cfg = dict(dt_softplus=softplus, dt_limit=limit, cu_seqlens=cu, final=final)
    return tensors, cfg


SSD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _ssd_op(cfg, chunk=16):
    lo, hi = cfg["dt_limit"]

    def op(x, dt, A, B, C, D, z, dt_bias, s0):
        y, final = OPS.ssd_scan(x, dt, A, B, C, chunk, D, z, dt_bias, cfg["dt_softplus"], lo, hi, s0,
                                cfg["cu_seqlens"], cfg["final"])
        return (y, final) if cfg["final"] else (y,)
    return op


def _ssd_exact(cfg):
    def exact(x, dt, A, B, C, D, z, dt_bias, s0):
        y, final = ref.ssd_recurrence(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=cfg["dt_softplus"],
                                      dt_limit=cfg["dt_limit"], initial_states=s0, cu_seqlens=cfg["cu_seqlens"])
        return (y, final) if cfg["final"] else (y,)
    return exact


@pytest.mark.parametrize("case", list(SSD_CASES))
def test_ssd_scan_gradcheck_fp64_against_the_recurrence(case):
    """The backward differentiates the chunked form; its gradients must be those of the
    token-by-token recurrence (the definition), chunk boundaries and sequence bounds included."""
    tensors, cfg = _ssd_problem(case)
    args = [tensors[k] for k in SSD_NAMES]
    for a in args:
        if a is not None:
            a.requires_grad_(True)
    _gradcheck(_value_of(_ssd_exact(cfg), _ssd_op(cfg)), tuple(args))


# ---- causal_conv1d -------------------------------------------------------------------------------

CONV_CASES = {
    # name: (b, t, d, w, bias, silu, initial states, final states, cu_seqlens)
    "plain": (2, 9, 5, 4, False, False, False, False, None),
    "all_options": (2, 9, 5, 4, True, True, True, True, None),
    "varlen": (1, 11, 3, 3, True, True, True, True, [0, 1, 1, 7, 11]),
}


def _conv_problem(case, dtype=torch.float64, seed=0):
    b, t, d, w, bias, silu, init, final, cu = CONV_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor(cu, dtype=torch.int64) if cu is not None else None
    n_seq = cu.numel() - 1 if cu is not None else b
    tensors = dict(x=_rand(gen, b, t, d, dtype=dtype), weight=_rand(gen, d, w, dtype=dtype),
                   bias=_rand(gen, d, dtype=dtype) if bias else None,
                   initial_states=_rand(gen, n_seq, w - 1, d, dtype=dtype) if init else None)
    return tensors, dict(silu=silu, final=final, cu_seqlens=cu)


CONV_NAMES = ("x", "weight", "bias", "initial_states")


def _conv_op(cfg):
    def op(x, weight, bias, s0):
        y, final = OPS.causal_conv1d(x, weight, bias, cfg["silu"], s0, cfg["cu_seqlens"], cfg["final"])
        return (y, final) if cfg["final"] else (y,)
    return op


def _conv_exact(cfg):
    def exact(x, weight, bias, s0):
        y, final = ref.causal_conv1d_reference(x, weight, bias, activation="silu" if cfg["silu"] else None,
                                               initial_states=s0, cu_seqlens=cfg["cu_seqlens"])
        return (y, final) if cfg["final"] else (y,)
    return exact


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_causal_conv1d_gradcheck_fp64(case):
    tensors, cfg = _conv_problem(case)
    args = [tensors[k] for k in CONV_NAMES]
    for a in args:
        if a is not None:
            a.requires_grad_(True)
    _gradcheck(_value_of(_conv_exact(cfg), _conv_op(cfg)), tuple(args))


# ---- gated_rmsnorm -------------------------------------------------------------------------------

def _norm_problem(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(x=_rand(gen, 2, 3, 12, dtype=dtype), z=_rand(gen, 2, 3, 12, dtype=dtype),
                weight=_rand(gen, 12, dtype=dtype)), dict(group_size=4, eps=1e-5)


NORM_NAMES = ("x", "z", "weight")


@pytest.mark.parametrize("group_size", [4, 12])
def test_gated_rmsnorm_gradcheck_fp64(group_size):
    tensors, _ = _norm_problem()
    args = tuple(tensors[k].requires_grad_(True) for k in NORM_NAMES)
    op = lambda x, z, w: (OPS.gated_rmsnorm(x, z, w, group_size, 1e-5),)  # noqa: E731
    exact = lambda x, z, w: (ref.gated_rmsnorm_reference(x, z, w, group_size=group_size, eps=1e-5),)  # noqa: E731
    _gradcheck(_value_of(exact, op), args)


# ---- the public API in fp32 / bf16: the op's gradients are autograd's through the reference -------

def _public(op_name, cfg):
    """(call of the public function -> outputs, the same through the fp32 reference under autograd)."""
    if op_name == "ssd_scan":
        kw = dict(chunk_size=16, dt_softplus=cfg["dt_softplus"], dt_limit=cfg["dt_limit"],
                  cu_seqlens=cfg["cu_seqlens"])

        def api(x, dt, A, B, C, D, z, dt_bias, s0):
            return ssm.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_states=s0,
                                return_final_states=True, **kw)

        def through_ref(x, dt, A, B, C, D, z, dt_bias, s0):
            y, final = ref.ssd_chunked(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_states=s0,
                                       dtype=torch.float32, **kw)
            return y.to(x.dtype), final
        return api, through_ref
    if op_name == "causal_conv1d":
        act = "silu" if cfg["silu"] else None

        def api(x, weight, bias, s0):
            return ssm.causal_conv1d(x, weight, bias, activation=act, initial_states=s0, cu_seqlens=cfg["cu_seqlens"],
                                     return_final_states=True)

        def through_ref(x, weight, bias, s0):
            y, final = ref.causal_conv1d_reference(x, weight, bias, activation=act, initial_states=s0,
                                                   cu_seqlens=cfg["cu_seqlens"], dtype=torch.float32)
            return y.to(x.dtype), final.to(x.dtype)
        return api, through_ref

    def api(x, z, weight):
        return (ssm.gated_rmsnorm(x, z, weight, group_size=cfg["group_size"], eps=cfg["eps"]),)

    def through_ref(x, z, weight):
        return (ref.gated_rmsnorm_reference(x, z, weight, group_size=cfg["group_size"], eps=cfg["eps"],
                                            dtype=torch.float32).to(x.dtype),)
    return api, through_ref


def _problem(op_name, case, dtype):
    if op_name == "ssd_scan":
        t, cfg = _ssd_problem(case, dtype)
        return [t[k] for k in SSD_NAMES], cfg
    if op_name == "causal_conv1d":
        t, cfg = _conv_problem(case, dtype)
        return [t[k] for k in CONV_NAMES], cfg
    t, cfg = _norm_problem(dtype)
    return [t[k] for k in NORM_NAMES], cfg


def _grads(fn, args, cotangents, use):
    """Gradients of ``sum_i <out_i, cotangent_i>`` over the outputs named in ``use`` (0 = y, 1 = final)."""
    leaves = [a.detach().requires_grad_(True) if a is not None else None for a in args]
    outs = fn(*leaves)
    loss = sum((outs[i].float() * cotangents[i]).sum() for i in use)
    wrt = [a for a in leaves if a is not None]
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def _cotangents(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g) for o in outs]


@pytest.mark.parametrize("op_name,case,impl,dtype", [
    ("ssd_scan", "all_options", "reference", torch.float32),
    ("ssd_scan", "all_options", "reference", torch.bfloat16),
    ("ssd_scan", "all_options", "triton", torch.float16),
    ("ssd_scan", "varlen", "reference", torch.bfloat16),
    ("ssd_scan", "varlen", "triton", torch.float32),
    ("causal_conv1d", "all_options", "reference", torch.bfloat16),
    ("causal_conv1d", "varlen", "triton", torch.float32),
    ("causal_conv1d", "varlen", "reference", torch.float32),
    ("gated_rmsnorm", None, "reference", torch.bfloat16),
    ("gated_rmsnorm", None, "triton", torch.float32),
])
def test_grads_equal_autograd_through_the_reference(op_name, case, impl, dtype):
    """Whichever implementation ran the forward, the gradients are autograd's through the fp32
    reference (the backward recomputes that reference), in each input's dtype; with
    the y gradient only, the final-state gradient only, or both."""
    args, cfg = _problem(op_name, case, dtype)
    api, through_ref = _public(op_name, cfg)
    with dispatch.trace() as ran, dispatch.use(impl):
        outs = api(*args)
    assert (op_name, impl) in ran                                       # the forward ran the kernel asked for
    cts = _cotangents(outs)
    uses = [(0,), (1,), (0, 1)] if len(outs) == 2 else [(0,)]
    present = [a for a in args if a is not None]
    for use in uses:
        with dispatch.use(impl):
            got = _grads(api, args, cts, use)
        want = _grads(through_ref, args, cts, use)
        for a, g, w in zip(present, got, want):
            if w is None:                   # an input that does not reach these outputs (z, D: not the final states)
                w = torch.zeros_like(a)
            assert g.dtype == a.dtype
            # the same fp32 formulas; autograd may add a gradient's contributions in another order
            # (seen: 1 fp32 ulp in the final-state-only SSD case), so a few ulps of the gradient's dtype
            assert_close(g, w, atol=4 * torch.finfo(g.dtype).eps * max_abs(w), what=f"{op_name} grad (outputs {use})")


def test_only_some_inputs_need_grad():
    tensors, _ = _ssd_problem("all_options", torch.float32)
    x = tensors["x"].requires_grad_(True)
    dt_bias = tensors["dt_bias"].requires_grad_(True)
    y = ssm.ssd_scan(tensors["x"], tensors["dt"], tensors["A"], tensors["B"], tensors["C"], chunk_size=16,
                     D=tensors["D"], z=tensors["z"], dt_bias=dt_bias, dt_softplus=True,
                     initial_states=tensors["initial_states"])
    gx, gb = torch.autograd.grad(y.sum(), (x, dt_bias))
    want = ref.ssd_chunked(x, tensors["dt"], tensors["A"], tensors["B"], tensors["C"], chunk_size=16, D=tensors["D"],
                           z=tensors["z"], dt_bias=dt_bias, dt_softplus=True,
                           initial_states=tensors["initial_states"])[0]
    wx, wb = torch.autograd.grad(want.sum(), (x, dt_bias))
    assert_equal(gx, wx, what="x grad")
    assert_equal(gb, wb, what="dt_bias grad")


# ---- torch.library.opcheck and torch.compile -------------------------------------------------------

def _op_args(op_name, case):
    """The raw op's positional arguments, fp32 with every float tensor requiring grad."""
    args, cfg = _problem(op_name, case, torch.float32)
    args = [a.requires_grad_(True) if a is not None else None for a in args]
    if op_name == "ssd_scan":
        x, dt, A, B, C, D, z, dt_bias, s0 = args
        lo, hi = cfg["dt_limit"]
        return OPS.ssd_scan.default, (x, dt, A, B, C, 16, D, z, dt_bias, cfg["dt_softplus"], lo, hi, s0,
                                      cfg["cu_seqlens"], cfg["final"])
    if op_name == "causal_conv1d":
        x, w, b, s0 = args
        return OPS.causal_conv1d.default, (x, w, b, cfg["silu"], s0, cfg["cu_seqlens"], cfg["final"])
    return OPS.gated_rmsnorm.default, (*args, cfg["group_size"], cfg["eps"])


# AOT dispatch with dynamic shapes traces the references' per-sequence and per-chunk loops under
# symbolic sizes, 20+ s for the SSD on 2 cores: static shapes there, dynamic for the norm
STATIC = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("op_name,case,utils", [("ssd_scan", "one_sequence", STATIC),
                                                ("causal_conv1d", "all_options", STATIC),
                                                ("gated_rmsnorm", None, None)])
def test_opcheck(op_name, case, utils):
    """Schema, fake tensor, autograd registration and AOT dispatch: the backward traced into an
    AOTAutograd graph (how torch.compile runs it) gives eager's outputs and gradients."""
    op, args = _op_args(op_name, case)
    kw = {} if utils is None else dict(test_utils=utils)
    torch.library.opcheck(op, args, **kw)


@pytest.mark.filterwarnings("ignore:Error detected in")        # autograd's anomaly note on the refusal
@pytest.mark.parametrize("op_name", ["ssd_scan", "causal_conv1d"])
def test_packed_sequences_backward_under_compile_is_refused_clearly(op_name):
    op, args = _op_args(op_name, "varlen")
    f = torch.compile(lambda *a: op(*a)[0].sum(), backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="cu_seqlens: the backward .* runs eagerly only"):
        f(*args)
