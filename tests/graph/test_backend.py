"""The `nemotron` torch.compile backend: found through its entry point, hands graphs to Inductor."""
import subprocess
import sys
import textwrap

import pytest
import torch

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


def test_unknown_option_is_a_clear_error():
    f = torch.compile(lambda x: x + 1, backend="nemotron", options={"fusionz": []})
    with pytest.raises(Exception, match="unknown key"):
        f(torch.randn(4))


def test_backend_is_not_double_registered():
    """Importing the module must not also call register_backend (the entry point does it)."""
    import nemotron.graph.backend as b
    from torch._dynamo.backends.registry import _COMPILER_FNS
    torch._dynamo.list_backends()
    assert _COMPILER_FNS.get("nemotron") in (None, b.nemotron_backend)


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
