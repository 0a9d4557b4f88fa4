"""Mamba-2 kernels (to come): chunked SSD scan, causal conv1d (+ decode update), selective state
update, gated RMSNorm; each with its FP64/FP32 reference, Triton kernels and torch.library ops."""
