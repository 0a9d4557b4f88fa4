"""LatentMoE kernels: fp32 sigmoid router, permute by expert, grouped GEMM (bf16 and NVFP4 weights)
with relu2 and the routing weight fused, deterministic combine, and the LatentMoE layer with
expert parallelism over latent vectors. Every op is differentiable (see :mod:`.autograd`)."""
from . import autograd  # noqa: F401  (registers the backward of every op)
from .layer import LatentMoE, MoEExperts
from .ops import combine, expert_slots, experts, permute, quantize_experts, route, routed_experts

__all__ = ["route", "experts", "routed_experts", "expert_slots", "combine", "permute", "quantize_experts", "LatentMoE",
           "MoEExperts"]
