"""NVFP4 quantize / fused RHT+quantize / dequantize against the torch reference and Inductor, and the
fast plain-torch quantizer (the CPU path) against a plain torch quantizer.

Traffic model (the issue's roofline): quantize reads 2 B and writes 0.5 + 1/16 B per bf16 element;
dequantize reads 0.5625 B and writes 2 B. The dynamic-scale quantize also makes an amax pass over x,
which the model does not count: its GB/s are effective GB/s of the whole operation.

``nvfp4_quantize_torch``: ``nvfp4/fast.py`` round-to-nearest (``torch_rn``) and stochastic rounding
(``torch_sr``) next to ``plain``, the quantizer one writes in a few lines of torch (tensor amax, block
amax, E4M3 block scales, a division, ``torch.bucketize`` on the E2M1 midpoints, packing); its bytes
differ from the reference (division, ties rounded down), and the table marks it so. Run it on CPU with
``python -m bench.nvfp4`` (training shapes; prints the SR / RN and RN / plain ratios).
"""
from __future__ import annotations

import functools

import torch

import nemotron  # noqa: F401  (chooses Triton's interpreter before triton is imported)
from nemotron.nvfp4 import fast
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import quantize as kernels

from . import harness
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


# training-size activations / weights / gradients (tokens x hidden, hidden x FFN)
TORCH_SHAPES = {
    "training": [(4096, 4096), (8192, 4096), (4096, 14336)],
    "nemotron": SHAPES["nemotron"],
    "smoke": [(64, 256)],
}
_SR_SEED = 1234
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def plain_quantize(x: torch.Tensor):
    """NVFP4 (1x16) as plain torch writes it: amax, block scales, division, ``torch.bucketize``, packing."""
    k = x.shape[-1]
    xb = x.float().reshape(-1, k // 16, 16)
    a = xb.abs()
    s_enc = 2688.0 / a.amax()
    scale = (a.amax(-1, keepdim=True) * (s_enc / 6)).clamp(max=448).to(torch.float8_e4m3fn)
    mag = torch.bucketize(a / (scale.float() / s_enc), _MIDPOINTS.to(x.device), out_int32=True)
    code = (mag.to(torch.uint8) | (torch.signbit(xb).to(torch.uint8) << 3)).reshape(-1, k)
    return code[:, 0::2] | (code[:, 1::2] << 4), scale.reshape(-1, k // 16), 1 / s_enc


def _torch_verify(args, outs):
    """torch_rn / torch_sr must equal the reference byte for byte (else raise: never time a wrong path)."""
    x, _ = args
    wants = {"torch_rn": ref.quantize_reference(x),
             "torch_sr": ref.quantize_reference(x, stochastic=True, seed=_SR_SEED)}
    for name, want in wants.items():
        if name in outs and not all(torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
                                    for g, w in zip(outs[name], want)):
            raise AssertionError(f"{name}: output differs from the reference; not timing a wrong path")
    return [n for n in outs if n not in wants]                        # the plain quantizer's numerics differ


def _torch_op() -> BenchOp:
    return BenchOp(
        name="nvfp4_quantize_torch", shapes=TORCH_SHAPES, make_inputs=_inputs,
        impls={"torch_rn": lambda x, gs: fast.quantize(x),
               "torch_sr": lambda x, gs: fast.quantize(x, stochastic=True, seed=_SR_SEED),
               "plain": lambda x, gs: plain_quantize(x)},
        peers=("plain", "torch_rn"), bytes=lambda s: s[0] * s[1] * (2 + 0.5625), verify=_torch_verify)


def ops() -> dict:
    return {op.name: op for op in (_quantize_op("nvfp4_quantize", False), _quantize_op("nvfp4_quantize_rht", True),
                                   _dequantize_op(), _torch_op())}


def main(argv=None) -> int:
    """``python -m bench.nvfp4 [--shapes training|smoke|nemotron] [--threads N] [--no-save]``: the fast
    torch quantizer against the plain one on this machine, with the ratios the CPU path is held to."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.nvfp4", description=main.__doc__)
    p.add_argument("--shapes", default="training", choices=list(TORCH_SHAPES))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON/PNG")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = harness.env_device()
    doc = harness.run(_torch_op(), a.shapes, device)
    harness.print_table(doc)
    ms = {(tuple(r["shape"]), r["impl"]): r["median_ms"] for r in doc["rows"]}
    where = "CPU numbers" if doc["cpu_numbers"] else f"{doc['device']['name']} numbers"
    print(f"{where} ({doc['device'].get('threads', '?')} threads), median ms; SR / RN and RN / plain (lower is faster):")
    for shape in dict.fromkeys(s for s, _ in ms):
        rn, sr, plain = ms[shape, "torch_rn"], ms[shape, "torch_sr"], ms[shape, "plain"]
        print(f"  {'x'.join(map(str, shape)):>12s} bf16: RN {rn:8.1f}  SR {sr:8.1f}  plain {plain:8.1f}   "
              f"SR/RN {sr / rn:5.2f}  RN/plain {rn / plain:5.3f}  SR/plain {sr / plain:5.3f}")
    if not a.no_save:
        print(f"wrote {harness.save(doc)}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
