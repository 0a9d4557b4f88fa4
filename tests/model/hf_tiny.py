"""A tiny HF transformers NemotronH with unit-scale deterministic weights: the oracle model of the
tests that compare this package with what HF runs and writes."""
import pytest
import torch

TINY_HF = dict(vocab_size=96, hidden_size=64, hybrid_override_pattern="M*EM", mamba_num_heads=4, mamba_head_dim=16,
               ssm_state_size=16, n_groups=2, chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=48, moe_latent_size=32, intermediate_size=48,
               routed_scaling_factor=2.5)


def hf_tiny(**over):
    """``transformers.NemotronHForCausalLM`` of :data:`TINY_HF` (updated by ``over``), in eval mode;
    matrices ~ N(0, 1/fan_in), ``dt_bias`` in [-2, -1), the rest as HF initializes them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**{**TINY_HF, **over})).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) - 2.0)
    return hf
