"""NVFP4 quantize / fused RHT+quantize / dequantize against the torch reference and Inductor.

Traffic model (the issue's roofline): quantize reads 2 B and writes 0.5 + 1/16 B per bf16 element;
dequantize reads 0.5625 B and writes 2 B. The dynamic-scale quantize also makes an amax pass over x,
which the model does not count: its GB/s are effective GB/s of the whole operation.
"""
from __future__ import annotations

import functools

import torch

from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import quantize as kernels

from .harness import BenchOp

SHAPES = {
    "nemotron": [(8192, 4096), (16384, 14336)],         # the two shapes (hidden 4096, Nano FFN 14336-ish)
    "sweep": [(1, 4096), (64, 4096), (1024, 4096), (4096, 4096), (8192, 8192), (16384, 14336)],
    "smoke": [(64, 256)],
}


def _inputs(shape, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, device=device, generator=g, dtype=torch.float32).to(torch.bfloat16)
    return x, (ref.global_amax_reference(x) / 2688).clamp(min=1e-30)


def _compile(fn):
    """Inductor peer; it must round where the reference rounds (bf16 casts) to compute the same bytes."""
    return torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})


def _quantize_impls(hadamard: bool) -> dict:
    kw = dict(tile_rows=1, stochastic=False, seed=0, hadamard=hadamard)
    reference = functools.partial(ref.quantize_reference, global_scale=None, **kw)
    compiled = _compile(reference)
    return {
        "triton": lambda x, gs: kernels.quantize(x, global_scale=None, **kw),
        "triton_static_scale": lambda x, gs: kernels.quantize(x, global_scale=gs, **kw),
        "torch": lambda x, gs: reference(x),
        "inductor": lambda x, gs: compiled(x),
    }


def _check(outs: dict, want_for) -> list:
    """Our kernels must equal the reference byte for byte (else raise: never time a wrong kernel);
    a peer that differs is timed anyway and named in the result."""
    differ = []
    for name, got in outs.items():
        got = got if isinstance(got, tuple) else (got,)
        want = want_for(name)
        want = want if isinstance(want, tuple) else (want,)
        if not all(torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
                   for g, w in zip(got, want)):
            if name.startswith("triton"):
                raise AssertionError(f"{name}: output differs from the reference; not timing a wrong kernel")
            differ.append(name)
    return differ


def _quantize_verifier(hadamard: bool):
    def verify(args, outs):
        x, gs = args
        static = ref.quantize_reference(x, tile_rows=1, global_scale=gs, hadamard=hadamard)
        return _check(outs, lambda name: static if name.endswith("static_scale") else outs["torch"])
    return verify


def _dequantize_verify(args, outs):
    return _check(outs, lambda name: outs["torch"])


def _quantize_op(name: str, hadamard: bool) -> BenchOp:
    return BenchOp(name=name, shapes=SHAPES, make_inputs=_inputs, impls=_quantize_impls(hadamard),
                   peers=("torch", "inductor"), bytes=lambda s: s[0] * s[1] * (2 + 0.5625),
                   verify=_quantize_verifier(hadamard))


def _dq_inputs(shape, device, seed):
    x, _ = _inputs(shape, device, seed)
    return ref.quantize_reference(x)


def _dequantize_op() -> BenchOp:
    reference = functools.partial(ref.dequantize_reference, dtype=torch.bfloat16)
    compiled = _compile(reference)
    return BenchOp(
        name="nvfp4_dequantize", shapes=SHAPES, make_inputs=_dq_inputs,
        impls={"triton": lambda c, s, g: kernels.dequantize(c, s, g, torch.bfloat16),
               "torch": reference, "inductor": compiled},
        peers=("torch", "inductor"), bytes=lambda s: s[0] * s[1] * (0.5625 + 2), verify=_dequantize_verify)


def ops() -> dict:
    return {op.name: op for op in (_quantize_op("nvfp4_quantize", False), _quantize_op("nvfp4_quantize_rht", True),
                                   _dequantize_op())}
