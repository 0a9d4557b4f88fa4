"""Command line: ``python -m nemotron demo`` (or the ``nemotron`` console script)."""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch

import nemotron  # noqa: F401  (chooses Triton's interpreter before triton is imported)

# (label, block rows, rounding, hadamard): every NVFP4 quantize path
PATHS = [
    ("1x16 nearest", 1, "nearest", False),
    ("1x16 stochastic", 1, "stochastic", False),
    ("16x16 nearest", 16, "nearest", False),
    ("16x16 stochastic", 16, "stochastic", False),
    ("RHT + 1x16 nearest", 1, "nearest", True),
    ("RHT + 1x16 stochastic", 1, "stochastic", True),
]


def _time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def demo(argv=None) -> int:
    from nemotron.nvfp4 import reference as ref
    from nemotron.nvfp4.triton import quantize as kernels
    from nemotron import _triton

    p = argparse.ArgumentParser(prog="nemotron demo", description="Quantize a tensor through every NVFP4 path.")
    p.add_argument("--rows", type=int, default=None, help="rows of the test tensor (default 8192 on GPU, 96 on CPU)")
    p.add_argument("--cols", type=int, default=None, help="K, a multiple of 16 (default 4096 on GPU, 1024 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    gpu = not _triton.interpreting()
    dev = torch.device("cuda" if gpu else "cpu")
    rows, cols = a.rows or (8192 if gpu else 96), a.cols or (4096 if gpu else 1024)

    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(2 * torch.rand(rows, 1, generator=g))  # per-row spread
    x.view(-1)[torch.randint(x.numel(), (8,), generator=g)] *= 20                            # outliers
    x = x.to(torch.bfloat16)
    xd = x.to(dev)
    x32 = x.float()
    where = f"GPU: {torch.cuda.get_device_name()}" if gpu else "CPU: Triton kernels under the interpreter (no bandwidth)"
    print(f"NVFP4 demo: x = bf16 [{rows}, {cols}], {where}")
    print(f"{'path':24s} {'rel RMS err (ref)':>18s} {'kernel == ref':>14s}" + (f" {'kernel GB/s':>12s}" if gpu else ""))
    ok = True
    for label, tile, rounding, had in PATHS:
        args = dict(tile_rows=tile, global_scale=None, stochastic=rounding == "stochastic", seed=a.seed, hadamard=had)
        want = ref.quantize_reference(x, **args)
        got = kernels.quantize(xd, **args)
        same = all(torch.equal(u.cpu().reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
                   for u, w in zip(got, want))
        ok &= same
        xq = ref.dequantize_reference(*want)
        if had:  # compare in the original basis: undo the (orthonormal) transform
            xq = ref.hadamard_reference(xq, inverse=True)
        line = f"{label:24s} {ref.qdq_error(x32, xq):18.4f} {str(same):>14s}"
        if gpu:
            ms = _time_ms(lambda: kernels.quantize(xd, **args))
            # amax pass reads x (2 B/elt), quantize pass reads x again and writes 0.5 + 1/16 B/elt
            line += f" {x.numel() * (2 + 2 + 0.5625) / ms / 1e6:12.1f}"
        print(line)
    ydq = kernels.dequantize(*[t.to(dev) for t in ref.quantize_reference(x)], torch.bfloat16)
    same = torch.equal(ydq.cpu(), ref.dequantize_reference(*ref.quantize_reference(x), torch.bfloat16))
    ok &= same
    print(f"{'dequantize -> bf16':24s} {'':18s} {str(same):>14s}")
    ok &= _demo_linear(x, xd, gpu)
    ok &= _demo_moe(gpu)
    print("all kernels agree with the FP32 reference" if ok else "MISMATCH between kernel and reference")
    return 0 if ok else 1


def _demo_linear(x: torch.Tensor, xd: torch.Tensor, gpu: bool) -> bool:
    """NVFP4 linear (x @ W.T with W [N, K] in NVFP4), W4A16 and W4A4, kernel vs the fp32 reference."""
    from nemotron.nvfp4 import reference as ref
    from nemotron.nvfp4.triton import gemm as gemm_kernels
    from nemotron.nvfp4.triton import quantize as kernels

    m, k = min(x.shape[0], 64), x.shape[1]
    n = 4 * k if gpu else 256
    g = torch.Generator().manual_seed(1)
    w32 = torch.randn(n, k, generator=g) * 0.02
    w = ref.quantize_reference(w32)
    wd = [t.to(xd.device) for t in w]
    exact = x[:m].double() @ w32.double().T
    print(f"\nNVFP4 linear: x [{m}, {k}] bf16 @ W.T, W [{n}, {k}] NVFP4")
    print(f"{'path':24s} {'rel err vs exact':>18s} {'kernel ~ ref':>14s}" + (f" {'kernel TFLOP/s':>15s}" if gpu else ""))
    ok = True
    for label, a4 in (("W4A16", False), ("W4A4 (emulated)", True)):
        def run():
            if not a4:
                return gemm_kernels.gemm(xd[:m], wd[0], wd[1].view(torch.uint8), wd[2])
            xc, xs, xg = kernels.quantize(xd[:m], tile_rows=1, global_scale=None, stochastic=False, seed=0,
                                          hadamard=False)
            return gemm_kernels.gemm(xc, wd[0], wd[1].view(torch.uint8), wd[2], x_scales=xs.view(torch.uint8),
                                     x_gs=xg, out_dtype=x.dtype)
        got = run().cpu()
        want = ref.linear_reference(x[:m], *w, act_quant=a4)
        x32 = ref.dequantize_reference(*ref.quantize_reference(x[:m])) if a4 else x[:m].float()
        close = bool(((got.double() - want.double()).abs()
                      <= ref.gemm_tolerance(x32, ref.dequantize_reference(*w), None, want)).all())
        ok &= close
        err = ((got.double() - exact).norm() / exact.norm()).item()
        line = f"{label:24s} {err:18.4f} {str(close):>14s}"
        if gpu:
            line += f" {2 * m * n * k / _time_ms(run) / 1e9:15.2f}"
        print(line)
    return ok


def _demo_moe(gpu: bool) -> bool:
    """Routed experts (sigmoid top-k, grouped GEMM with relu2 and the routing weight fused), bf16 and
    NVFP4 weights, kernel vs the fp64 reference; Super's shapes on a GPU, a small layer on CPU."""
    from nemotron import moe_kernels as mk
    from nemotron.moe_kernels import reference as ref

    dev = torch.device("cuda" if gpu else "cpu")
    t, e, k, lat, inter = (64, 512, 22, 1024, 2688) if gpu else (24, 16, 4, 64, 96)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, lat, generator=g).to(torch.bfloat16)
    w, ids = mk.route(torch.randn(t, e, generator=g), top_k=k, scaling_factor=5.0)
    up = torch.randn(e, inter, lat, generator=g) / lat ** 0.5
    down = torch.randn(e, lat, inter, generator=g) / inter ** 0.5
    print(f"\nLatentMoE experts: x [{t}, {lat}] bf16, E {e}, top-{k}, I {inter}")
    print(f"{'weights':24s} {'rel err vs fp32 experts':>24s} {'kernel ~ ref':>14s}" + (f" {'weight GB/s':>12s}" if gpu else ""))
    exact = ref.experts_reference(x, w, ids, up, down).double()
    ok = True
    for label, (wu, wd) in (("bf16", (up.bfloat16(), down.bfloat16())),
                            ("NVFP4", (mk.quantize_experts(up), mk.quantize_experts(down)))):
        args = [a.to(dev) for a in (x, w, ids, wu, wd)]
        with mock.patch.dict(os.environ, {"NEMOTRON_KERNELS": "triton"}):
            got = mk.experts(*args).cpu()
        want = ref.experts_reference(x, w, ids, wu, wd)
        close = bool(((got.double() - want.double()).abs() <= ref.experts_tolerance(x, w, ids, wu, wd, want)).all())
        ok &= close
        err = ((got.double() - exact).norm() / exact.norm()).item()
        line = f"{label:24s} {err:24.4f} {str(close):>14s}"
        if gpu:
            touched = torch.unique(ids).numel()
            per_weight = 0.5625 if label == "NVFP4" else 2
            line += f" {touched * 2 * inter * lat * per_weight / _time_ms(lambda: mk.experts(*args)) / 1e6:12.1f}"
        print(line)
    return ok


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": demo}
    if not argv or argv[0] not in commands:
        print(f"usage: nemotron {{{','.join(commands)}}} [options]   (see nemotron <command> --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
