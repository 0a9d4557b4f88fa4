"""The one kernel dispatch (``nemotron.dispatch``): the table covers every op, the choice and its
reasons, the forcing rules, and that a compiled graph runs exactly what its lowering report says."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import nemotron
import nemotron.graph
from nemotron import dispatch
from nemotron import moe_kernels as mk
from nemotron import nvfp4
from nemotron import ssm_kernels as ssm


def _every_op(x16, ssm_in, moe_in):
    """One call of each public op family entry point: together they reach every ``nemotron::`` op."""
    w = nvfp4.quantize(x16)
    out = [w.dequantize(torch.float32), nvfp4.hadamard(x16), nvfp4.global_amax(x16),
           nvfp4.linear(x16, w), nvfp4.linear(x16, w, act_quant="nvfp4", input_scale=torch.tensor(0.01))]
    normed = ssm.gated_rmsnorm(x16, x16, torch.ones(x16.shape[-1]), group_size=16)
    out.append(nvfp4.linear(normed, w, act_quant="nvfp4", input_scale=torch.tensor(0.01)))  # fused: norm_nvfp4_linear
    f8 = nvfp4.fp8_linear(x16, (x16.float() * 4).to(torch.float8_e4m3fn), torch.tensor(0.25))
    out.append(f8)
    out.extend(torch.ops.nemotron.nvfp4_quantize_row_col(x16.repeat(4, 1), True, False, 0, 0))    # [16, 32]
    x, dt, A, B, C, xc, cw, state, conv_state = ssm_in
    out.append(ssm.ssd_scan(x, dt, A, B, C, chunk_size=16))
    out.append(ssm.causal_conv1d(xc, cw, activation="silu"))
    out.append(ssm.causal_conv1d_update(xc[:, 0], conv_state.clone(), cw, activation="silu"))
    out.append(ssm.selective_state_update(state.clone(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0]))
    out.append(ssm.selective_state_update_multi(state.clone(), x[:, :3], dt[:, :3], A, B[:, :3], C[:, :3],
                                                states_out=state.new_empty(1, 3, *state.shape[1:])))
    out.append(ssm.causal_conv1d_update_multi(xc[:, :3], conv_state.clone(), cw, activation="silu",
                                              conv_states_out=conv_state.new_empty(1, 3, *conv_state.shape[1:])))
    out.append(ssm.gated_rmsnorm(x16, x16, torch.ones(x16.shape[-1]), group_size=16))
    h, logits, up, down = moe_in
    wts, ids = mk.route(logits, top_k=2)
    out.append(mk.experts(h, wts, ids, up, down))
    out.append(mk.combine(mk.expert_slots(h, wts, ids, up, down), 2, h.dtype))
    out.append(mk.permute(ids, up.shape[0])[1])
    out.append(mk.experts(h, *mk.route(logits, top_k=3), up, down))          # fused: moe_routed_experts
    kv = x16.reshape(2, 1, 4, 16)                                             # [B, Hkv, L, D]
    out.append(nemotron.attention.decode_attention(x16[:2].reshape(2, 2, 16), kv, kv * 0.5, torch.tensor([3, 4])))
    return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x16 = r(4, 32)
    b, t, h, p, n = 1, 16, 2, 16, 16
    ssm_in = (r(b, t, h, p), torch.rand(b, t, h, generator=g), -torch.rand(h, generator=g), r(b, t, 1, n),
              r(b, t, 1, n), r(b, t, 32), r(32, 4), r(b, h, p, n), r(b, 3, 32))
    moe_in = (r(5, 32), r(5, 4), r(4, 32, 32) * 0.1, r(4, 32, 32) * 0.1)
    return x16, ssm_in, moe_in


def test_table_covers_every_registered_op():
    import nemotron.graph  # noqa: F401  (registers every family)
    registered = {name for name in dir(torch.ops.nemotron) if isinstance(getattr(torch.ops.nemotron, name),
                                                                         torch._ops.OpOverloadPacket)}
    assert registered == set(dispatch.TABLE), (registered ^ set(dispatch.TABLE))
    for name in registered:
        schema = getattr(torch.ops.nemotron, name).default._schema
        assert schema.arguments[-1].name == "impl", f"{name}: the last argument must be impl"


def test_eager_default_runs_plain_torch_on_cpu_and_says_why():
    with dispatch.trace() as ran:
        _every_op(*_inputs())
    assert {op for op, _ in ran} == set(dispatch.TABLE) - {"norm_nvfp4_linear", "moe_routed_experts"}
    for op, impl in ran:       # the fast torch path where an op has one, else its reference
        assert impl == ("torch" if any(i.name == "torch" for i in dispatch.TABLE[op]) else "reference"), (op, impl)
    with dispatch.use("reference"), dispatch.trace() as ran:
        _every_op(*_inputs())
    assert {impl for _, impl in ran} == {"reference"}          # forcing the oracles reaches every op
    c = dispatch.choose("fp8_linear", torch.zeros(2, 16), record=False)
    assert c.name == "reference" and ("scaled_mm", "torch._scaled_mm needs a CUDA device") in c.rejected
    assert "not scaled_mm" in str(c)


def test_forced_triton_runs_the_kernels_and_keeps_torch_only_ops():
    with dispatch.use("triton"), dispatch.trace() as ran:
        _every_op(*_inputs())
    got = dict(ran)
    for op, impls in dispatch.TABLE.items():
        if op not in got:
            continue
        # CPU tensors: the ops without a Triton kernel keep their own order (scaled_mm needs CUDA)
        names = [i.name for i in impls]
        want = "triton" if "triton" in names else "torch" if "torch" in names else "reference"
        assert got[op] == want, (op, got[op])
    # the FP8 GEMM has no Triton kernel: forcing 'triton' keeps its own order, and says why
    c = dispatch.choose("fp8_linear", torch.zeros(2, 16), kernels="triton", record=False)
    assert c.name == "reference" and c.rejected[0][0] == "scaled_mm"


def test_explicit_impl_that_cannot_run_raises():
    with pytest.raises(ValueError, match="scaled_mm implementation cannot run here"):
        dispatch.choose("fp8_linear", torch.zeros(2, 16), "scaled_mm")
    with pytest.raises(ValueError, match="impl: nvfp4_linear has implementations"):
        dispatch.choose("nvfp4_linear", torch.zeros(2, 16), "cutlass")


def test_no_triton_without_the_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with dispatch.use("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nvfp4.quantize(torch.randn(2, 16))
    assert nvfp4.quantize(torch.randn(2, 16)).codes.shape == (2, 8)      # the reference still runs


def test_use_validates_and_is_thread_local():
    with pytest.raises(ValueError, match="kernels: expected one of"):
        with dispatch.use("cutlass"):
            pass
    seen = {}
    with dispatch.use("triton"):
        t = threading.Thread(target=lambda: seen.setdefault("other", dispatch.forced()))
        t.start()
        t.join()
        seen["here"] = dispatch.forced()
    assert seen == {"other": dispatch.forced(), "here": "triton"}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("NEMOTRON_KERNELS", "TRITON_INTERPRET")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=e)


def test_environment_override_is_read_once_and_validated():
    r = _run("""
        import os, torch, nemotron
        from nemotron import dispatch
        assert dispatch.forced() == "reference"
        os.environ["NEMOTRON_KERNELS"] = "triton"          # too late: read at import
        assert dispatch.forced() == "reference"
        print("OK")
    """, NEMOTRON_KERNELS="reference")
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]
    r = _run("""
        import torch, nemotron
        nemotron.nvfp4.quantize(torch.randn(2, 16))
    """, NEMOTRON_KERNELS="cuda-magic")
    assert r.returncode != 0 and "NEMOTRON_KERNELS: expected one of ['triton', 'torch', 'reference']" in r.stderr


def test_triton_imported_first_gives_a_clear_error():
    r = _run("""
        import triton, torch, nemotron
        from nemotron import dispatch
        x = torch.randn(2, 16)
        assert nemotron.nvfp4.quantize(x).codes.shape == (2, 8)     # by device: the reference
        try:
            with dispatch.use("triton"):
                nemotron.nvfp4.quantize(x)
        except ValueError as e:
            print("ERR", e)
    """)
    if torch.cuda.is_available():
        pytest.skip("a GPU machine compiles Triton kernels; the interpreter is not needed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERR" in r.stdout and "import nemotron before triton" in r.stdout


@pytest.mark.parametrize("kernels, fusions", [(None, ("noop",)), (None, nemotron.graph.FUSIONS),
                                              ("triton", nemotron.graph.FUSIONS), ("reference", ("noop",))])
def test_compiled_graph_runs_what_explain_prints(kernels, fusions):
    """Every op's pinned implementation in the lowering report is what ran (the trace), op by op;
    with the fusions on, every op of the table is lowered."""
    report: list = []
    opts = {"report": report, "force_disable_caches": True, "fusions": list(fusions)}
    if kernels:
        opts["kernels"] = kernels
    torch._dynamo.reset()
    f = torch.compile(lambda *a: _every_op(*a), backend="nemotron", options=opts)
    args = _inputs()
    with dispatch.trace() as ran:
        got = f(*args)
    rows = nemotron.graph.Explanation(report).ops
    assert rows, "no package op reached the lowering pass"
    printed = sorted((op.split("::")[1], impl) for op, impl, _, _ in rows)
    top = {op for op, _ in printed}
    assert sorted(r for r in ran if r[0] in top) == printed
    with dispatch.use(kernels):
        want = _every_op(*args)
    for a, b in zip(got, want):           # the same implementations eagerly; Inductor only moves glue ops
        torch.testing.assert_close(a, b)
    fused = {"norm_nvfp4_linear", "moe_routed_experts"}        # only the fusion passes create these
    assert top == (set(dispatch.TABLE) if "moe" in fusions else set(dispatch.TABLE) - fused)
    text = str(nemotron.graph.Explanation(report))
    for op, impl, kernel, _ in rows:
        assert kernel.split("  [")[0] in text
        if kernels == "reference":
            assert impl == "reference", (op, impl)


@pytest.mark.parametrize("options, err", [
    ({"cudagraphs": "no"}, "options\\['cudagraphs'\\]: expected a bool"),
    ({"kernels": "cutlass"}, "options\\['kernels'\\]: expected one of"),
    ({"fusions": "noop"}, "options\\['fusions'\\]"),
    ({"report": {}}, "options\\['report'\\]"),
])
def test_backend_options_are_validated(options, err):
    from nemotron.graph.backend import _check_options
    with pytest.raises((TypeError, ValueError), match=err):
        _check_options(options)


def test_backend_options_must_be_a_mapping():
    f = torch.compile(lambda x: x + 1, backend="nemotron", options=["noop"])
    with pytest.raises(Exception, match="options: expected a dict"):
        f(torch.randn(4))


def test_families_import_only_the_dispatch_and_formats():
    """The kernel families do not reach into each other's private helpers or ``quantize_``."""
    root = os.path.dirname(nemotron.__file__)
    bad = []
    for fam in ("nvfp4", "ssm_kernels", "moe_kernels"):
        for dirpath, _, files in os.walk(os.path.join(root, fam)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                text = open(os.path.join(dirpath, name)).read()
                for other in {"nvfp4", "ssm_kernels", "moe_kernels"} - {fam}:
                    for line in text.splitlines():
                        if f"{other}." in line and "import" in line and f"{other}.format" not in line \
                                and not (fam == "moe_kernels" and other == "nvfp4"
                                         and any(s in line for s in ("nvfp4.reference", "nvfp4.triton.gemm",
                                                                     "nvfp4.ops import quantize"))):
                            bad.append(f"{fam}/{name}: {line.strip()}")
                if "quantize_" in text and "import" in text and "from ..quantize" in text:
                    bad.append(f"{fam}/{name}: imports quantize_")
    assert not bad, bad


def test_ssd_scan_on_cuda_takes_every_input_dtype_for_the_kernel(monkeypatch):
    """The chunk-parallel scan fits a Hopper block's shared memory for fp32 inputs too (bench.static:
    no ssd_scan case over the limit), so the table no longer refuses them (checked on a Call, as a
    compiling machine sees it)."""
    from nemotron.dispatch import TABLE, Call
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    triton_impl = TABLE["ssd_scan"][0]
    for forced in (None, "triton"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert triton_impl.needs(Call("cuda", (9, 0), dtype, 128, forced)) is None
