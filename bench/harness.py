"""Timing, rooflines, tables and result files shared by every benchmark.

Method: each implementation runs on the same inputs in the same process; a few input sets (together
larger than the L2 cache on a GPU) are rotated so no call finds its data cached; CUDA events time
each call after a warm-up; the median and p20/p80 are reported. The roofline is measured in the same
run: a device-to-device copy (bandwidth) and a large bf16 matmul (tensor-core FLOP rate). On CPU
everything runs the same way and the output says the numbers are CPU numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class BenchOp:
    """One kernel benchmark, declared as data.

    make_inputs(shape, device, seed) -> tuple of args; impls: name -> fn(*args); peers: the impl
    names the ratios are taken against; bytes/flops(shape) -> the op's ideal traffic / work;
    verify(args, outputs by impl) raises if one of our kernels disagrees with the reference and
    returns the names of peers that do (they are timed and flagged).
    """
    name: str
    shapes: dict                       # shape-set name -> list of shapes
    make_inputs: Callable
    impls: dict
    peers: Sequence[str]
    bytes: Callable
    flops: Callable = lambda shape: 0
    verify: Callable | None = None


def device_info(device: torch.device) -> dict:
    import triton
    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(kind="cuda", name=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,power.limit",
                                "--format=csv,noheader", "-i", str(device.index or 0)],
                               capture_output=True, text=True, timeout=10)
            info["clocks"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["clocks"] = "unknown"
    else:
        info.update(kind="cpu", name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def slug(info: dict) -> str:
    return "cpu" if info["kind"] == "cpu" else re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, input_sets: Sequence[tuple], device: torch.device, *, warmup: int = 3,
            reps: int = 30, max_seconds: float = 10.0) -> dict:
    """Median / p20 / p80 milliseconds of ``fn(*inputs)``, rotating through ``input_sets``."""
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    _sync(device)
    times, start_all = [], time.perf_counter()
    for i in range(reps):
        args = input_sets[i % len(input_sets)]
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*args)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return dict(median_ms=statistics.median(times), p20_ms=q[1], p80_ms=q[7], reps=len(times))


def measure_roofline(device: torch.device) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s, measured now on ``device``."""
    gpu = device.type == "cuda"
    n = (1 << 28) if gpu else (1 << 23)                          # 512 MiB / 16 MiB of bf16
    srcs = [torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0) for _ in range(2)]
    dsts = [torch.empty_like(s) for s in srcs]
    t = time_fn(lambda s, d: d.copy_(s), list(zip(srcs, dsts)), device, reps=20 if gpu else 5)
    copy_gbps = 2 * n * 2 / (t["median_ms"] * 1e6)
    del srcs, dsts
    m = 8192 if gpu else 512
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t2 = time_fn(lambda x, y: x @ y, [(a, b)], device, reps=20 if gpu else 3)
    return dict(copy_gbps=copy_gbps, bf16_tflops=2 * m**3 / (t2["median_ms"] * 1e9),
                copy_bytes=2 * n * 2, matmul_shape=[m, m, m])


TRIMMED_DEFAULT = 3      # the "trimmed" set of an op that declares none: its first Nemotron shapes


def shapes_for(op: BenchOp, shape_set: str) -> list | None:
    """The shapes of ``op`` in ``shape_set`` (None if it has no such set). ``trimmed`` is the op's own
    trimmed set (a few shapes for a time-boxed GPU session), else its first TRIMMED_DEFAULT Nemotron shapes."""
    if shape_set in op.shapes:
        return op.shapes[shape_set]
    if shape_set == "trimmed" and "nemotron" in op.shapes:
        return op.shapes["nemotron"][:TRIMMED_DEFAULT]
    return None


def run(op: BenchOp, shape_set: str, device: torch.device, *, impls: Sequence[str] | None = None,
        sets: int | None = None) -> dict:
    """Time every implementation of ``op`` over a shape set; returns the result document."""
    shapes = shapes_for(op, shape_set)
    if shapes is None:
        raise ValueError(f"{op.name} has shape sets {list(op.shapes)}, not {shape_set!r}")
    info = device_info(device)
    roof = measure_roofline(device)
    names = [n for n in op.impls if impls is None or n in impls]
    rows = []
    for shape in shapes:
        nbytes, flops = op.bytes(shape), op.flops(shape)
        # enough input sets that their total exceeds ~2x the L2 cache (H100: 50 MiB)
        n_sets = sets or (max(2, min(8, int(2 * 50 * 2**20 / max(nbytes, 1)) + 1)) if device.type == "cuda" else 2)
        input_sets = [op.make_inputs(shape, device, seed) for seed in range(n_sets)]
        differ = op.verify(input_sets[0], {n: op.impls[n](*input_sets[0]) for n in names}) if op.verify else []
        timing = {n: time_fn(op.impls[n], input_sets, device) for n in names}
        for n in names:
            ms = timing[n]["median_ms"]
            gbps = nbytes / (ms * 1e6)
            tflops = flops / (ms * 1e9) if flops else None
            # roofline time: the larger of moving the bytes at copy bandwidth and doing the FLOPs at matmul rate
            floor_ms = max(nbytes / (roof["copy_gbps"] * 1e6), flops / (roof["bf16_tflops"] * 1e9))
            pct = 100 * floor_ms / ms
            ratios = {f"vs_{p}": timing[p]["median_ms"] / ms for p in op.peers if p in timing and p != n}
            rows.append(dict(impl=n, shape=list(shape), **timing[n], gbps=gbps, tflops=tflops,
                             pct_roofline=pct, matches_reference=n not in differ, **ratios))
    return dict(kernel=op.name, shape_set=shape_set, device=info, roofline=roof,
                cpu_numbers=device.type != "cuda", rows=rows,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def print_table(doc: dict) -> None:
    d, r = doc["device"], doc["roofline"]
    head = f"{doc['kernel']} on {d['name']} ({d['kind']})"
    if doc["cpu_numbers"]:
        head += "  -- CPU numbers: Triton kernels run under the interpreter; not a GPU result"
    print(head)
    print(f"roofline measured now: copy {r['copy_gbps']:.1f} GB/s, bf16 matmul {r['bf16_tflops']:.2f} TFLOP/s")
    peers = sorted({k for row in doc["rows"] for k in row if k.startswith("vs_")})
    print(f"{'shape':>16s} {'impl':>22s} {'median ms':>10s} {'p20-p80 ms':>16s} {'GB/s':>9s} {'TFLOP/s':>8s} {'% roof':>7s} "
          + " ".join(f"{p:>12s}" for p in peers))
    for row in doc["rows"]:
        ratios = " ".join(f"{row[p]:11.2f}x" if p in row else f"{'':12s}" for p in peers)
        impl = row["impl"] + ("" if row.get("matches_reference", True) else "*")
        print(f"{'x'.join(map(str, row['shape'])):>16s} {impl:>22s} {row['median_ms']:10.4f} "
              f"{row['p20_ms']:7.4f}-{row['p80_ms']:<8.4f} {row['gbps']:9.1f} {row['tflops'] or 0:8.2f} "
              f"{row['pct_roofline']:6.1f}% {ratios}")
    if any(not row.get("matches_reference", True) for row in doc["rows"]):
        print("* this peer's output differs from the reference (timed anyway)")


def save(doc: dict, out_dir: Path | None = None) -> Path:
    """Write ``<kernel>.json`` and ``<kernel>.png`` under ``bench/results/<device>/``."""
    out = (out_dir or RESULTS) / slug(doc["device"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['kernel']}.json"
    path.write_text(json.dumps(doc, indent=1))
    try:
        _plot(doc, out / f"{doc['kernel']}.png")
    except ImportError:
        print("matplotlib not installed: no PNG written")
    return path


def _plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys("x".join(map(str, r["shape"])) for r in doc["rows"]))
    impls = list(dict.fromkeys(r["impl"] for r in doc["rows"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(shapes) * len(impls) / 2, 4))
    w = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ys = [next((r["gbps"] for r in doc["rows"] if r["impl"] == impl and "x".join(map(str, r["shape"])) == s), 0)
              for s in shapes]
        ax.bar([j + i * w for j in range(len(shapes))], ys, w, label=impl)
    ax.axhline(doc["roofline"]["copy_gbps"], color="k", ls="--", lw=1, label="copy roofline (measured)")
    ax.set_xticks([j + w * (len(impls) - 1) / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("effective GB/s")
    note = " (CPU numbers)" if doc["cpu_numbers"] else ""
    ax.set_title(f"{doc['kernel']} on {doc['device']['name']}{note}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def env_device() -> torch.device:
    return torch.device(os.environ.get("NEMOTRON_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
