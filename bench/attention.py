"""Decode attention over the live KV prefix: the Triton kernel and the op's torch path (SDPA on the
live slice, GQA folded into the query rows) against torch SDPA on the live slice with ``enable_gqa``,
SDPA over the whole buffer under a ``[T, max_len]`` mask (the model's attention before this op), and
the fp32 reference.

Traffic model: one decode step must read K and V of the live prefix, ``2 * B * len * Hkv * D`` elements
in the cache dtype (``reference.kv_bytes_live``); q and the output (``2 * B * Hq * D``) are noise.
Shapes: ``(B, Hq, Hkv, D, len, max_len, q dtype, kv dtype)``; Super's attention is Hq 32, Hkv 2, D 128,
its buffer 512K positions, batch 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.attention import ops as attn_ops
from nemotron.attention import reference as ref
from nemotron.attention.triton import decode as decode_kernels

from .harness import BenchOp

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
SUPER_MAX_LEN = 512 * 1024
DECODE_SHAPES = {
    "nemotron": [(1, 32, 2, 128, n, SUPER_MAX_LEN, "bf16", kv) for kv in ("bf16", "fp8")
                 for n in (1024, 4096, 16384, 65536, 131072, 262144, 524288)],
    # CPU: the model runs fp32 there; the live length at two buffer sizes (the step must not grow with max_len)
    "cpu": [(1, 32, 2, 128, n, m, "fp32", kv) for kv in ("fp32", "fp8") for m in (4096, 65536) for n in (1024, 4096)],
    "smoke": [(2, 4, 2, 16, 40, 64, "fp32", "fp32"), (1, 4, 2, 16, 33, 48, "bf16", "fp8")],
}
SCALE = 0.75              # the FP8 per-tensor scale of the benchmark's caches


def _decode_inputs(shape, device, seed):
    b, hq, hkv, d, n, max_len, qd, kvd = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, d, device=device, generator=gen).to(_DT[qd])
    caches = []
    for _ in range(2):
        c = torch.zeros(b, hkv, max_len, d, dtype=_DT[kvd], device=device)    # zeros past n: only the masked peer reads them
        c[:, :, :n] = torch.randn(b, hkv, n, d, device=device, generator=gen).to(_DT[kvd])
        caches.append(c)
    scale = torch.full((1,), SCALE, device=device) if kvd == "fp8" else None
    return q, caches[0], caches[1], torch.full((b,), n, dtype=torch.int32, device=device), scale


def _decode_impls() -> dict:
    def triton(q, kc, vc, lengths, s):
        return decode_kernels.decode_attention(q[:, None], kc, vc, lengths, scale=q.shape[-1] ** -0.5, k_scale=s,
                                               v_scale=s)[:, 0]

    def torch_live(q, kc, vc, lengths, s):        # the op's torch path: SDPA, GQA folded into the query rows
        return attn_ops._sdpa_live(q[:, None], kc, vc, lengths, q.shape[-1] ** -0.5, s, s)[:, 0]

    def sdpa_gqa(q, kc, vc, lengths, s):          # plain SDPA on each row's live slice, enable_gqa
        out = []
        for i, n in enumerate(lengths.tolist()):
            k, v = ref.dequantize_kv(kc[i, :, :n], s, q.dtype), ref.dequantize_kv(vc[i, :, :n], s, q.dtype)
            out.append(F.scaled_dot_product_attention(q[i, :, None], k, v, scale=q.shape[-1] ** -0.5,
                                                      enable_gqa=True)[:, 0])
        return torch.stack(out)

    def sdpa_masked(q, kc, vc, lengths, s):
        # the whole buffer in q's dtype under a [T, max_len] mask: traffic grows with max_len
        k, v = ref.dequantize_kv(kc, s, q.dtype), ref.dequantize_kv(vc, s, q.dtype)
        mask = torch.arange(kc.shape[2], device=q.device)[None, None, None, :] < lengths[:, None, None, None]
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5,
                                              enable_gqa=True)[:, :, 0]

    def torch_ref(q, kc, vc, lengths, s):
        return ref.decode_attention_reference(q[:, None], kc, vc, lengths, k_scale=s, v_scale=s)[:, 0]

    return {"triton": triton, "torch_live": torch_live, "sdpa_gqa": sdpa_gqa, "sdpa_masked": sdpa_masked,
            "torch": torch_ref}


def _decode_verify(args, outs):
    q, kc, vc, lengths, s = args
    want = ref.decode_attention_reference(q[:, None], kc, vc, lengths, k_scale=s, v_scale=s)[:, 0].double()
    tol = 1e-4 if q.dtype == torch.float32 else 1.6e-2       # tests/attention: output rounding (+ bf16 P on a GPU)
    differ = []
    for name, y in outs.items():
        err = ((y.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        if not err <= tol:
            if name == "triton":
                raise AssertionError(f"triton: max error {err:.3g} of max |reference| > {tol}; not timing a wrong kernel")
            differ.append(name)
    return differ


def _decode_bytes(shape):
    b, hq, hkv, d, n, max_len, qd, kvd = shape
    return ref.kv_bytes_live([n] * b, hkv, d, _DT[kvd]) + 2 * b * hq * d * _DT[qd].itemsize


def _decode_flops(shape):
    b, hq, hkv, d, n, *_ = shape
    return 4 * b * hq * n * d


def ops() -> dict:
    op = BenchOp(name="decode_attention", shapes=DECODE_SHAPES, make_inputs=_decode_inputs, impls=_decode_impls(),
                 peers=("torch_live", "sdpa_gqa", "sdpa_masked", "torch"), bytes=_decode_bytes, flops=_decode_flops,
                 verify=_decode_verify)
    return {op.name: op}
