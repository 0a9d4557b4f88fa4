"""Triton kernels of the MoE family (see grouped_gemm.py)."""
