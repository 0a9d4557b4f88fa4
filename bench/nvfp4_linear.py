"""NVFP4 linear (Hopper FP4 GEMM) against cuBLAS bf16 and dequantize-then-cuBLAS.

Shapes: the Nemotron 3 Super linears, (M, N, K) with M the tokens. Traffic model: x (2 B/elt) +
NVFP4 weight (0.5625 B/elt) + out (2 B/elt); work 2*M*N*K. At small M the GEMM is bound by the
weight bytes (ideal 16/4.5 = 3.56x over bf16); at large M by the MMAs.
"""
from __future__ import annotations

import torch

import nemotron.nvfp4 as nvfp4
from nemotron.nvfp4 import fast
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import gemm as gemm_kernels
from nemotron.nvfp4.triton import quantize as q_kernels

from .harness import BenchOp

# (N, K): in_proj 4096->18560, out_proj 8192->4096, shared expert up/down, lm_head, routed expert up/down,
# q/o_proj, k/v_proj, fc1/fc2_latent_proj
SUPER_LINEARS = [(18560, 4096), (4096, 8192), (5376, 4096), (4096, 5376), (131072, 4096), (2688, 1024), (1024, 2688),
                 (4096, 4096), (256, 4096), (1024, 4096), (4096, 1024)]
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
SHAPES = {
    "nemotron": [(m, n, k) for n, k in SUPER_LINEARS for m in M_VALUES],
    "sweep": [(m, 18560, 4096) for m in M_VALUES],
    # a time-boxed GPU session: decode, a small batch and prefill on in_proj, out_proj, fc1_latent_proj and
    # k/v_proj (the last two: the narrow, deeply split decode launches)
    "trimmed": [(m, n, k) for n, k in [(18560, 4096), (4096, 8192), (1024, 4096), (256, 4096)] for m in (1, 32, 8192)],
    "smoke": [(3, 64, 128), (40, 48, 96)],
}
VERIFY_ROWS = 64
# the CPU decode path: Super-like and demo-like (N, K), at decode M and a few small batches
CPU_LINEARS = [(4096, 4096), (18560, 4096), (1024, 2688)]
CPU_SHAPES = {
    "nemotron": [(m, n, k) for n, k in CPU_LINEARS for m in (1, 4, 16, 64)],
    "sweep": [(m, 4096, 4096) for m in (1, 2, 4, 8, 16, 32, 64, 128, 512)],
    "smoke": [(1, 64, 128), (40, 48, 96)],
}


def _inputs(shape, device, seed):
    m, n, k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    w = nvfp4.quantize(torch.randn(n, k, device=device, generator=g) * 0.02)
    w_bf16 = w.dequantize(torch.bfloat16)
    input_scale = (ref.global_amax_reference(x) / 2688).clamp(min=1e-30)
    return x, w, w_bf16, input_scale


def _w4a16(x, w, w_bf16, input_scale):
    return gemm_kernels.gemm(x, w.codes, w.block_scales.view(torch.uint8), w.global_scale)


def _w4a4(x, w, w_bf16, input_scale):
    xc, xs, xg = q_kernels.quantize(x, tile_rows=1, global_scale=input_scale, stochastic=False, seed=0, hadamard=False)
    return gemm_kernels.gemm(xc, w.codes, w.block_scales.view(torch.uint8), w.global_scale,
                             x_scales=xs.view(torch.uint8), x_gs=xg, out_dtype=x.dtype)


def _dequant_then_mm(x, w, w_bf16, input_scale):
    wd = q_kernels.dequantize(w.codes, w.block_scales, w.global_scale, torch.bfloat16)
    return x @ wd.T


def _verify(args, outs):
    """Our kernels within the accumulation-order bound of the fp32 reference (first rows); peers too."""
    x, w, _, input_scale = args
    rows = slice(0, VERIFY_ROWS)
    w32 = w.dequantize()
    differ = []
    for name, out in outs.items():
        a4 = name == "triton_w4a4"
        xr = x[rows]
        want = ref.linear_reference(xr, w.codes, w.block_scales, w.global_scale, act_quant=a4,
                                    input_scale=input_scale if a4 else None)
        x32 = ref.dequantize_reference(*ref.quantize_reference(xr, global_scale=input_scale)) if a4 else xr.float()
        ok = bool(((out[rows].double() - want.double()).abs() <= ref.gemm_tolerance(x32, w32, None, want)).all())
        if not ok:
            if name.startswith("triton"):
                raise AssertionError(f"{name}: outside the reference's tolerance; not timing a wrong kernel")
            differ.append(name)
    return differ


def _torch_w4a16(x, w, w_bf16, input_scale):
    return fast.linear(x, w.codes, w.block_scales, w.global_scale)


def _reference(x, w, w_bf16, input_scale):
    return ref.linear_reference(x, w.codes, w.block_scales, w.global_scale)


def _verify_cpu(args, outs):
    """The torch path within its documented bound of the fp32 reference (first rows); peers flagged."""
    x, w, _, _ = args
    rows = slice(0, VERIFY_ROWS)
    xr = x[rows]
    w32 = w.dequantize()
    want = ref.linear_reference(xr, w.codes, w.block_scales, w.global_scale)
    tol = ref.gemm_tolerance(xr.float(), w32, None, want)
    if x.dtype == torch.bfloat16 and x.shape[0] > fast.LINEAR_FP32_ROWS:
        tol = tol + 2.0 ** -8 * (xr.abs().double() @ w32.abs().double().T)      # the bf16 GEMM's output rounding
    differ = []
    for name, out in outs.items():
        if not bool(((out[rows].double() - want.double()).abs() <= tol).all()):
            if name == "torch_w4a16":
                raise AssertionError(f"{name}: outside the reference's tolerance; not timing a wrong path")
            differ.append(name)
    return differ


def ops() -> dict:
    op = BenchOp(
        name="nvfp4_linear", shapes=SHAPES, make_inputs=_inputs,
        impls={"triton_w4a16": _w4a16, "triton_w4a4": _w4a4,
               "cublas_bf16": lambda x, w, w_bf16, s: x @ w_bf16.T, "dequant_cublas": _dequant_then_mm},
        peers=("cublas_bf16", "dequant_cublas"),
        bytes=lambda s: s[0] * s[2] * 2 + s[1] * s[2] * 0.5625 + s[0] * s[1] * 2,
        flops=lambda s: 2 * s[0] * s[1] * s[2], verify=_verify)
    # the CPU path (nemotron::nvfp4_linear's "torch" implementation) against a bf16 matmul with the
    # weight already dequantized and the fp32 reference (dequantizes the weight on every call)
    cpu = BenchOp(
        name="nvfp4_linear_cpu", shapes=CPU_SHAPES, make_inputs=_inputs,
        impls={"torch_w4a16": _torch_w4a16, "bf16_matmul": lambda x, w, w_bf16, s: x @ w_bf16.T,
               "reference": _reference},
        peers=("bf16_matmul", "reference"),
        bytes=lambda s: s[0] * s[2] * 2 + s[1] * s[2] * 0.5625 + s[0] * s[1] * 2,
        flops=lambda s: 2 * s[0] * s[1] * s[2], verify=_verify_cpu)
    return {op.name: op, cpu.name: cpu}
