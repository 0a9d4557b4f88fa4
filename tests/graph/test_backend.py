"""The `nemotron` torch.compile backend: found through its entry point, hands graphs to Inductor."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

FRESH = textwrap.dedent("""
    import sys, torch
    assert "nemotron" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
    assert "nemotron" not in sys.modules            # listed without importing the package
    def f(x, w):
        return torch.relu(x @ w) * 2 + 1
    x, w = torch.randn(8, 32), torch.randn(32, 16)
    out = torch.compile(f, backend="nemotron")(x, w)
    torch.testing.assert_close(out, f(x, w))        # fp32 matmul, reassociation-level tolerance
    print("OK")
""")


def test_entry_point_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


@pytest.mark.parametrize("options, match", [
    ({"fusionz": []}, "unknown key"), ({"fusions": ["magic"]}, "fusions"), ({"fusions": "noop"}, "fusions"),
    ({"kernels": "cuda"}, "kernels"), ({"cudagraphs": "no"}, "cudagraphs"),
])
def test_bad_options_are_clear_errors(options, match):
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1, backend="nemotron", options=options)
    with pytest.raises(BackendCompilerFailed, match=match) as e:       # Dynamo wraps what the backend raises
        f(torch.randn(3))
    assert isinstance(e.value.inner_exception, (ValueError, TypeError)), repr(e.value.inner_exception)


FRESH_REGISTRY = textwrap.dedent("""
    import torch
    from torch._dynamo.backends.registry import _COMPILER_FNS, lookup_backend
    import nemotron.graph.backend as b
    assert "nemotron" not in _COMPILER_FNS, "importing nemotron.graph.backend registered the backend"
    assert lookup_backend("nemotron") is b.nemotron_backend     # the entry point registers it, once
    print("OK")
""")


def test_backend_is_registered_by_the_entry_point_only():
    """Importing the module must not also call register_backend: the entry point's registration
    would then fail with "duplicate name". A fresh process, so no earlier test has looked it up."""
    r = subprocess.run([sys.executable, "-c", FRESH_REGISTRY], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


FRESH_MODEL = textwrap.dedent("""
    import torch
    from nemotron.model import NemotronHConfig, NemotronHForCausalLM
    m = NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=0)
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        want = m(ids)
        got = torch.compile(m, backend="nemotron")(ids)     # nothing registered by hand
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print("OK")
""")


def test_tiny_model_compiles_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-c", FRESH_MODEL], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
