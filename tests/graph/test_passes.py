"""The backend's passes: op counts before and after on small graphs (caches off, so passes run),
compiled == eager, the whole tiny model compiled (no recompiles over decode steps), HF's model after
the module swap, fall-through for graphs without package ops, and explain()."""
import collections

import pytest
import torch
from torch import nn
from torch._inductor.compile_fx import compile_fx

import nemotron
import nemotron.graph
from nemotron.graph.passes import NemotronPasses, _package_op
from nemotron.model import NemotronHConfig, NemotronHForCausalLM
from nemotron.model.layers import RMSNorm
from nemotron.moe_kernels import LatentMoE
from nemotron.nvfp4 import NVFP4Linear
from nemotron.ssm_kernels import gated_rmsnorm

from ..close import assert_close, assert_equal, max_abs

transformers = pytest.importorskip("transformers")


def _op_counts(graph) -> collections.Counter:
    c = collections.Counter()
    for n in graph.nodes:
        op = _package_op(n)
        if op is not None:
            c[op._opname] += 1
        elif n.op == "call_function" and n.target is torch.ops.aten.clone.default:
            c["aten.clone"] += 1
        elif n.op == "call_function" and n.target is torch.ops.aten.reshape.default:
            c["aten.reshape"] += 1
    return c


class Recording(NemotronPasses):
    """The backend's passes, with the op counts of the graph before and after them."""

    def __call__(self, graph):
        self.before = _op_counts(graph)
        super().__call__(graph)
        self.after = _op_counts(graph)


def _compile(fn, args, **kw):
    passes = Recording(**kw)

    def backend(gm, ex):
        return compile_fx(gm, ex, config_patches={"post_grad_custom_post_pass": passes, "force_disable_caches": True})
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend)(*args)
    return out, passes


class NormLinear(nn.Module):
    def __init__(self, dtype, static=True, gated=False, second_user=False):
        super().__init__()
        self.norm = RMSNorm(64, 1e-5, dtype=dtype)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(64) + 0.5)
        self.lin = NVFP4Linear.from_linear(nn.Linear(64, 48, dtype=dtype), act_quant="nvfp4",
                                           input_scale=0.02 if static else None)
        self.gated, self.second_user = gated, second_user

    def forward(self, x, z):
        h = gated_rmsnorm(x, z, self.norm.weight, group_size=32) if self.gated else self.norm(x)
        y = self.lin(h)
        return y + h[..., :48] if self.second_user else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_norm_quant_linear_fusion(dtype, gated):
    m = NormLinear(dtype, gated=gated)
    x, z = torch.randn(2, 7, 64).to(dtype), torch.randn(2, 7, 64).to(dtype)
    out, p = _compile(m, (x, z))
    norm_op = {"gated_rmsnorm": 1} if gated else {}
    assert p.before == collections.Counter({"nvfp4_linear": 1, **norm_op})
    assert p.after == collections.Counter({"norm_nvfp4_linear": 1})
    assert p.matched["norm_quant"] == 1
    with torch.no_grad():
        want = m(x, z)
    # the fused op runs the same reference math on CPU; bf16 may differ by the norm's rounding flips
    assert_close(out, want, atol=0 if dtype == torch.float32 else 0.05 * max_abs(want))


@pytest.mark.parametrize("kw", [dict(static=False), dict(second_user=True)])
def test_norm_quant_fusion_declines(kw):
    """Dynamic activation scales (the amax must come first) and a norm output used elsewhere stay unfused."""
    m = NormLinear(torch.float32, **kw)
    x = torch.randn(5, 64)
    out, p = _compile(m, (x, x))
    assert p.matched["norm_quant"] == 0 and p.after["nvfp4_linear"] == 1 and p.after["norm_nvfp4_linear"] == 0
    with torch.no_grad():
        assert_close(out, m(x, x), rtol=1e-6, atol=1e-6)


def test_moe_route_fusion():
    torch.manual_seed(0)
    m = LatentMoE(64, num_experts=6, top_k=2, intermediate_size=32, shared_intermediate_size=32, latent_size=32,
                  scaling_factor=2.0)
    with torch.no_grad():
        for p_ in m.parameters():
            p_.normal_(0, 0.2)
    x = torch.randn(11, 64)
    out, p = _compile(m, (x,))
    assert p.before["moe_route"] == 1 and p.before["moe_experts"] == 1
    assert p.after == collections.Counter({"moe_routed_experts": 1}) and p.matched["moe"] == 1
    with torch.no_grad():
        assert_equal(out, m(x))


def test_noop_elimination():
    """A reshape of a reshape feeding a package op becomes one reshape (Inductor itself already drops
    clones of contiguous inputs before the post-grad passes)."""
    w = torch.rand(64) + 0.5

    def f(x, z):
        y = x.reshape(2, 7, 2, 32).reshape(14, 64)
        return gated_rmsnorm(y, z.reshape(14, 64), w, group_size=32)
    x, z = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    out, p = _compile(f, (x, z))
    assert p.before["aten.reshape"] == 3 and p.after["aten.reshape"] == 2 and p.matched["noop"] == 1
    assert_equal(out, f(x, z))


def test_noop_pass_keeps_clones_that_matter():
    def f(x):
        y = x.t().contiguous()                                # a transpose made contiguous: a real copy
        return gated_rmsnorm(y, y, torch.ones(16), group_size=16)
    x = torch.randn(16, 8)
    out, p = _compile(f, (x,))
    assert p.after["aten.clone"] == p.before["aten.clone"]
    assert_close(out, f(x), rtol=1e-6, atol=1e-6)       # fp32, the same reference op either way


def test_lowering_reports_kernels():
    m = NormLinear(torch.float32)
    x = torch.randn(3, 64)
    # each op row: (op, implementation, description with the reason for the choice, output shape)
    for kernels, impl, word in ((None, "reference", "CPU tensor"), ("reference", "reference", "reference"),
                                ("triton", "triton", "Triton")):
        torch._dynamo.reset()
        e = nemotron.graph.explain(m, (x, x), options={"kernels": kernels} if kernels else None)
        assert e.ops and all(name == impl and word in text for _, name, text, _ in e.ops), str(e)


def test_kernels_option_pins_the_implementation(kernel_device):
    """kernels='triton' runs the Triton kernels (interpreted here) inside the compiled graph."""
    m = NormLinear(torch.float32)
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, backend="nemotron", options={"kernels": "triton", "force_disable_caches": True})(x, x)
        want = m(x, x)
    assert not torch.equal(got, want)                         # another implementation ran ...
    assert_close(got, want, rtol=1e-3, atol=1e-3 * max_abs(want))   # ... to the same result (GEMM order, code flips)


def test_pass_uuid_tracks_options_and_sources():
    a, b = NemotronPasses(), NemotronPasses(fusions=("noop",))
    assert a.uuid() != b.uuid() and a.uuid() == NemotronPasses().uuid()
    assert NemotronPasses(kernels="reference").uuid() != a.uuid()
    assert len(a.uuid()[0]) >= 32                             # a hash of the package's sources


def test_graph_without_package_ops_falls_through():
    def f(x, w):
        return torch.nn.functional.gelu(x @ w).sum(-1)
    x, w = torch.randn(6, 32), torch.randn(32, 8)
    torch._dynamo.reset()
    # fp32: Inductor fuses the gelu and reorders the sum
    assert_close(torch.compile(f, backend="nemotron")(x, w), f(x, w), rtol=1.3e-6, atol=1e-5)


def _tiny_model(seed=0):
    m = NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p_ in m.parameters():
            if p_.dim() >= 2:
                p_.copy_(torch.randn(p_.shape, generator=g) / p_.shape[-1] ** 0.5)
    nemotron.quantize_(m, "nvfp4", exclude=["lm_head"], act_quant="nvfp4")
    for mod in m.modules():
        if isinstance(mod, NVFP4Linear):
            mod.input_scale = torch.tensor(0.05)                  # static W4A4: the fusions apply
    return m


def test_tiny_model_compiled_equals_eager_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend
    m = _tiny_model()
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("nemotron")
    f = torch.compile(m, backend=cnt)
    with torch.no_grad():
        for t in (11, 19):                                        # two prompt lengths, one cache size
            ids = torch.randint(3, 256, (1, t), generator=torch.Generator().manual_seed(t))
            cache_c, cache_e = m.new_cache(1, 80), m.new_cache(1, 80)
            assert_close(f(ids, cache=cache_c), m(ids, cache=cache_e), rtol=1e-4, atol=1e-4)
            tok = ids[:, -1:].clone(memory_format=torch.contiguous_format)
            for step in range(50 if t == 11 else 5):              # decode steps
                got, want = f(tok, cache=cache_c), m(tok, cache=cache_e)
                assert_close(got, want, rtol=1e-4, atol=1e-4)
                tok = want[:, -1].argmax(-1, keepdim=True)
    # one graph for the first prefill, one for decode, one dynamic-length prefill after the second
    # prompt length: three in all, none per decode step
    assert cnt.frame_count == 3, cnt.frame_count


def test_hf_model_after_module_swap_compiles_and_matches(tmp_path):
    cfg = transformers.NemotronHConfig(
        vocab_size=96, hidden_size=64, hybrid_override_pattern="ME*E", num_hidden_layers=4, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=32)
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    ours = nemotron.model.from_hf(hf)
    ids = torch.randint(0, 96, (2, 13))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(ours, backend="nemotron")(ids)
        want = hf(ids, use_cache=False).logits
    assert_close(got, want, rtol=1e-4, atol=1e-4 * max_abs(want))


def test_explain_lists_ops_kernels_and_fusions():
    m = _tiny_model()
    ids = torch.randint(3, 256, (1, 9))
    torch._dynamo.reset()
    e = nemotron.graph.explain(m, (ids,))
    text = str(e)
    assert e.fusions["norm_quant"] == 5 and e.fusions["moe"] == 3, e.fusions
    assert "nemotron::norm_nvfp4_linear" in text and "nemotron::moe_routed_experts" in text
    assert "nemotron::ssd_scan" in text and "nemotron::moe_route " not in text


def test_compile_regions_reuses_one_graph_per_layer_kind():
    from torch._dynamo.testing import CompileCounterWithBackend
    m = _tiny_model(seed=1)
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        want = m(ids)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("nemotron")
    nemotron.graph.compile_regions(m, backend=cnt)
    with torch.no_grad():
        got = m(ids)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    kinds = set(NemotronHConfig.preset("tiny").layers_block_type)
    assert cnt.frame_count <= len(kinds) + 1 < len(m.backbone.layers), cnt.frame_count


@pytest.mark.gpu
def test_tiny_model_on_gpu_compiled_with_cudagraphs_equals_eager():
    m = _tiny_model(seed=2).cuda()
    ids = torch.randint(3, 256, (1, 24), device="cuda")
    torch._dynamo.reset()
    f = torch.compile(m, backend="nemotron", options={"cudagraphs": True})
    with torch.no_grad():
        c_cache, e_cache = m.new_cache(1, 64), m.new_cache(1, 64)
        assert_close(f(ids, cache=c_cache), m(ids, cache=e_cache), rtol=2e-3, atol=2e-3)
        tok = ids[:, -1:].clone(memory_format=torch.contiguous_format)
        for _ in range(10):
            got, want = f(tok, cache=c_cache), m(tok, cache=e_cache)
            assert_close(got, want, rtol=2e-3, atol=2e-3)   # fused kernels: rare code flips
            tok = want[:, -1].argmax(-1, keepdim=True)
    e = nemotron.graph.explain(m, (ids,))
    assert any(name == "triton" and "Triton RMSNorm+NVFP4 quantize" in text for _, name, text, _ in e.ops), str(e)


def test_generate_with_compiled_decode_steps():
    m = _tiny_model(seed=3)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    want = m.generate(ids, max_new_tokens=12)
    assert_equal(m.generate(ids, max_new_tokens=12, backend="nemotron", max_len=32), want)
    assert_equal(m.generate(ids[:, :7], max_new_tokens=12, backend="nemotron", max_len=32),
                 m.generate(ids[:, :7], max_new_tokens=12))


def test_mode_and_cudagraphs_options_compile_on_cpu():
    """CUDA graphs only apply to CUDA graphs; on CPU the options compile and change nothing."""
    m = NormLinear(torch.float32)
    x = torch.randn(6, 64)
    for kw in ({"mode": "max-autotune-no-cudagraphs"}, {"options": {"cudagraphs": True}}):
        torch._dynamo.reset()                 # torch.compile takes a mode or options, not both
        f = torch.compile(m, backend="nemotron", **kw)
        with torch.no_grad():
            assert_close(f(x, x), m(x, x), rtol=1e-6, atol=1e-6)
