"""Attention: flash decoding over the live KV prefix (split-KV Triton kernel, torch SDPA on the live
slice, fp32 reference), GQA, bf16 / fp16 / fp32 or FP8 E4M3 caches; with its torch.library op.
"""
from .ops import decode_attention

__all__ = ["decode_attention"]
