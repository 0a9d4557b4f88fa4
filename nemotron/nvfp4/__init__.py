"""NVFP4: the 4-bit format (E2M1 values, E4M3 scales per 16 elements, an fp32 global scale), its
reference, the 16-point random Hadamard transform, and Triton quantize/dequantize kernels.

Later: the block-scaled FP4 GEMM and the NVFP4 / FP8 linear layers.
"""
from .format import NVFP4Tensor, swizzle_block_scales, unswizzle_block_scales
from .ops import dequantize, global_amax, hadamard, quantize

__all__ = ["NVFP4Tensor", "quantize", "dequantize", "hadamard", "global_amax",
           "swizzle_block_scales", "unswizzle_block_scales"]
