"""Mamba-2 kernels: the chunked SSD scan, causal conv1d (+ decode update), the selective state
update and the gated grouped RMSNorm; each with its FP64 reference, Triton kernel and torch.library op.
"""
from . import autograd  # noqa: F401  (registers the ops' backward)
from .ops import (causal_conv1d, causal_conv1d_update, causal_conv1d_update_multi, gated_rmsnorm,
                  selective_state_update, selective_state_update_multi, ssd_scan)

__all__ = ["ssd_scan", "causal_conv1d", "causal_conv1d_update", "causal_conv1d_update_multi", "selective_state_update",
           "selective_state_update_multi", "gated_rmsnorm"]
