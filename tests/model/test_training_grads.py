"""Training: for the same weights and batch, every parameter's gradient of the model equals HF
transformers' (Mamba-2, attention, MLP and LatentMoE layers), eagerly and compiled."""
import pytest
import torch
import torch.nn.functional as F

from nemotron.model import NemotronHForCausalLM

from ..close import assert_close, max_abs
from .hf_tiny import hf_tiny

# fp32 on both sides, in other orders: HF scans in chunks of 16 (ours: one chunk of 128 here), HF
# differentiates its own torch code (ours: the references' backward), and the routers and GEMMs sum
# in other orders. Seen: <= 2.1e-6 of a parameter's max |grad|; 10x margin.
REL = 2e-5

PATTERNS = {"mamba_attention_mlp": "M*-M", "mamba_attention_moe_mlp": "M*EM-"}


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _pair(pattern: str):
    hf = hf_tiny(hybrid_override_pattern=pattern, num_hidden_layers=len(pattern)).train()
    ours = NemotronHForCausalLM.from_hf(hf).train()
    # 37 tokens: three of HF's 16-token scan chunks, a ragged last one
    ids = torch.randint(0, hf.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    return hf, ours, ids


def _hf_grads(hf) -> dict:
    """HF's gradients under our names (``model.*`` -> ``backbone.*``; the rest are the same)."""
    return {("backbone." + n[len("model."):] if n.startswith("model.") else n): p.grad
            for n, p in hf.named_parameters()}


@pytest.mark.parametrize("pattern", list(PATTERNS.values()), ids=list(PATTERNS))
def test_parameter_grads_equal_hf(pattern):
    hf, ours, ids = _pair(pattern)
    want_loss = _next_token_loss(hf(ids, use_cache=False).logits, ids)
    want_loss.backward()
    loss = _next_token_loss(ours(ids), ids)
    loss.backward()
    assert_close(loss, want_loss, rtol=1e-6, what="loss")       # fp32, other summation orders; seen <= 1e-7
    want = _hf_grads(hf)
    got = dict(ours.named_parameters())
    assert set(got) == set(want)                                # every parameter matched by name
    kinds = {type(b.mixer).__name__ for b in ours.backbone.layers}
    assert len(kinds) == len(set(pattern))                      # each layer kind of the pattern is there
    for name, p in got.items():
        w = want[name]
        assert w is not None and max_abs(w) > 0, f"{name}: HF gives it no gradient"
        assert p.grad is not None, f"{name}: no gradient"
        assert_close(p.grad, w, atol=REL * max_abs(w), what=f"grad of {name}")


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """The backward AOTAutograd traces from the ops' autograd gives the eager gradients (aot_eager:
    Inductor would compile the differentiated references for ~1 min here)."""
    _, ours, ids = _pair("M*-M")
    _next_token_loss(ours(ids), ids).backward()
    want = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    _next_token_loss(torch.compile(ours, backend="aot_eager", fullgraph=True)(ids), ids).backward()
    for n, p in ours.named_parameters():
        # the same ATen ops as eager, unfused (aot_eager); seen: bit-equal
        assert_close(p.grad, want[n], atol=1e-6 * max_abs(want[n]), what=f"compiled grad of {n}")
