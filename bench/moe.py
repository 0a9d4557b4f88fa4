"""Routed experts of a LatentMoE layer: our Triton grouped GEMM (bf16 and NVFP4 weights) against a
``torch._grouped_mm`` path (on Hopper that op is CUTLASS's sm90 grouped GEMM, sync-free for bf16)
and a loop over experts (HF transformers' formulation).

Shape: (T, E, k, l, I) with Super's E 512, k 22, l 1024, I 2688. Traffic model: the touched
experts' NVFP4 bytes (expected touched = E * (1 - (1 - k/E)^T) under uniform routing; 0.5625 B per
weight, two projections) + x and out in bf16; work 2 * T * k * 2 * I * l. So ``pct_roofline`` of a
bf16 impl is measured against the NVFP4 floor: the decode goal counts only NVFP4 weight bytes.
"""
from __future__ import annotations

import torch

from nemotron import moe_kernels as mk
from nemotron.moe_kernels import reference as ref

from .harness import BenchOp

SUPER = (512, 22, 1024, 2688)
SHAPES = {
    "nemotron": [(t, *SUPER) for t in (1, 8, 64, 512, 4096, 16384)],
    "smoke": [(3, 8, 2, 32, 48), (40, 6, 3, 64, 32)],
}
VERIFY_TOKENS = 8
_WEIGHTS: dict = {}


def _weights(shape, device):
    """bf16 and NVFP4 expert stacks, built once per shape (they dwarf L2 by themselves)."""
    key = (shape[1:], str(device))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _, e, k, lat, inter = shape
        g = torch.Generator(device=device).manual_seed(0)
        up = torch.randn(e, inter, lat, device=device, generator=g) / lat ** 0.5
        down = torch.randn(e, lat, inter, device=device, generator=g) / inter ** 0.5
        _WEIGHTS[key] = (up.bfloat16(), down.bfloat16(), mk.quantize_experts(up), mk.quantize_experts(down))
        del up, down
    return _WEIGHTS[key]


def _inputs(shape, device, seed):
    t, e, k, lat, inter = shape
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(t, lat, device=device, generator=g).to(dtype)
    w, ids = mk.route(torch.randn(t, e, device=device, generator=g), top_k=k, scaling_factor=5.0)
    up, down, q_up, q_down = _weights(shape, device)
    if dtype != torch.bfloat16:
        up, down = up.to(dtype), down.to(dtype)
    return x, w, ids, up, down, q_up, q_down


def _triton_dense(x, w, ids, up, down, q_up, q_down):
    return mk.experts(x, w, ids, up, down)


def _triton_nvfp4(x, w, ids, up, down, q_up, q_down):
    return mk.experts(x, w, ids, q_up, q_down)


def _grouped_mm(x, w, ids, up, down, q_up, q_down):
    k = ids.shape[1]
    perm, offs = mk.permute(ids, up.shape[0])
    perm = perm.long()
    h = torch._grouped_mm(x[perm // k], up.transpose(1, 2), offs=offs)
    h = torch.relu(h).square()
    y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs).float() * w.reshape(-1)[perm, None]
    slots = torch.empty_like(y)
    slots[perm] = y
    return mk.combine(slots, k, x.dtype)


def _loop(x, w, ids, up, down, q_up, q_down):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        t, j = torch.where(ids == e)
        h = torch.relu(x[t] @ up[e].T).square()
        out.index_add_(0, t, (h @ down[e].T).float() * w[t, j, None])
    return out.to(x.dtype)


def _verify(args, outs):
    x, w, ids, up, down, q_up, q_down = args
    n = slice(0, VERIFY_TOKENS)
    differ = []
    for name, out in outs.items():
        wu, wd = (q_up, q_down) if name == "triton_nvfp4" else (up, down)
        want = ref.experts_reference(x[n], w[n], ids[n], wu, wd)
        ok = bool(((out[n].double() - want.double()).abs()
                   <= ref.experts_tolerance(x[n], w[n], ids[n], wu, wd, want)).all())
        if not ok:
            if name.startswith("triton"):
                raise AssertionError(f"{name}: outside the reference's tolerance; not timing a wrong kernel")
            differ.append(name)
    return differ


def _bytes(s):
    t, e, k, lat, inter = s
    touched = e * (1 - (1 - k / e) ** t)
    return touched * 2 * inter * lat * 0.5625 + 2 * t * lat * 2


def ops() -> dict:
    impls = {"triton_nvfp4": _triton_nvfp4, "triton_bf16": _triton_dense, "grouped_mm": _grouped_mm, "loop": _loop}
    op = BenchOp(name="moe_experts", shapes=SHAPES, make_inputs=_inputs, impls=impls,
                 peers=("grouped_mm", "loop"), bytes=_bytes,
                 flops=lambda s: 2 * s[0] * s[2] * 2 * s[4] * s[3], verify=_verify)
    return {op.name: op}
