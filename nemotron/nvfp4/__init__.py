"""NVFP4: the 4-bit format (E2M1 values, E4M3 scales per 16 elements, an fp32 global scale), its
reference, the 16-point random Hadamard transform, Triton quantize/dequantize kernels, the Hopper
FP4 GEMM (W4A16 and emulated W4A4), NVFP4 / FP8 linear layers with ModelOpt names, and NVFP4 training
(Transformer Engine's recipe as autograd).
"""
from .format import NVFP4Tensor, swizzle_block_scales, unswizzle_block_scales
from .linear import FP8Linear, NVFP4Linear
from .ops import dequantize, fp8_linear, global_amax, hadamard, linear, quantize
from .training import (MXFP8TrainingLinear, NVFP4Recipe, NVFP4TrainingLinear, mxfp8_training_linear,
                       nvfp4_training_experts, nvfp4_training_linear)

__all__ = ["NVFP4Tensor", "quantize", "dequantize", "hadamard", "global_amax", "linear", "fp8_linear",
           "NVFP4Linear", "FP8Linear", "swizzle_block_scales", "unswizzle_block_scales",
           "NVFP4Recipe", "nvfp4_training_linear", "NVFP4TrainingLinear", "mxfp8_training_linear", "MXFP8TrainingLinear",
           "nvfp4_training_experts"]
