"""Attention ops: validation at the public boundary, the ``torch.library`` registration, dispatch.

``nemotron::decode_attention`` picks its implementation through :mod:`nemotron.dispatch`: the Triton
split-KV kernel for CUDA tensors (or interpreted when forced), elsewhere torch SDPA on each row's
live slice (:func:`_sdpa_live`, the CPU default), and the fp32 reference; a trailing ``impl`` argument
names one outright (the ``nemotron`` backend's lowering writes it).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ..dispatch import FLOAT_DTYPES as _FLOATS
from . import reference as ref
from .triton import decode as decode_kernels

KV_DTYPES = (*_FLOATS, torch.float8_e4m3fn)
_FP8 = (torch.float8_e4m3fn,)


# ---- torch.library op ----------------------------------------------------------------------------

@torch.library.custom_op("nemotron::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                         scale: float, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
                         impl: str = "") -> torch.Tensor:
    name = dispatch.choose("decode_attention", q, impl).name
    if name == "triton":
        return decode_kernels.decode_attention(q, k_cache, v_cache, lengths, scale=scale, k_scale=k_scale,
                                               v_scale=v_scale)
    if name == "torch":
        return _sdpa_live(q, k_cache, v_cache, lengths, scale, k_scale, v_scale)
    return ref.decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale, k_scale=k_scale,
                                          v_scale=v_scale, dtype=torch.float32).to(q.dtype)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths, scale, k_scale, v_scale, impl=""):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@functools.cache
def _e4m3_values() -> torch.Tensor:
    """fp32 value of each E4M3 code ``[256]`` (CPU), made once."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def _live_kv(cache: torch.Tensor, scale, dtype) -> torch.Tensor:
    """A live slice in ``dtype``, dequantized. FP8 on CPU goes through a 256-entry table of
    ``fp32(code) * scale`` (the reference's arithmetic, bit for bit): 2.4x faster than torch's E4M3
    conversion there (1M codes: 1.6 ms vs 3.8 ms, one CPU thread)."""
    if cache.dtype == torch.float8_e4m3fn and cache.device.type == "cpu":
        table = _e4m3_values()
        table = table * scale.reshape(()) if scale is not None else table
        return torch.take(table, cache.view(torch.uint8).long()).to(dtype)
    if scale is None and cache.dtype == dtype:
        return cache
    return ref.dequantize_kv(cache, scale, dtype)


MASK_ELEMENTS = 1 << 24       # the torch path's causal mask per query chunk: T > 1 never builds [T, len] at once


def _sdpa_live(q, k_cache, v_cache, lengths, scale, k_scale, v_scale) -> torch.Tensor:
    """torch SDPA per row over its live slice ``[0, len)``. GQA goes into the query rows (the
    Hq / Hkv heads of a kv head and the T tokens: ``[Hkv, T * G, D]`` against ``[Hkv, len, D]``):
    on CPU, SDPA's ``enable_gqa`` took 40-60x longer at Super's heads (bench.attention). T > 1 runs in
    query chunks whose bottom-right causal mask has at most ``MASK_ELEMENTS`` entries (prefill over a
    long cache stays bounded); a row whose keys are all new (a first prefill) runs SDPA's causal
    flash path with no mask at all, and on CPU a later chunk runs mask-free too
    (:func:`_prefix_then_causal`). fp32 math for fp32 inputs, else SDPA's (fp32 accumulation)."""
    b, t, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    out = q.new_zeros(b, t, hq, d)
    work = q.dtype
    for i, n in enumerate(lengths.tolist()):
        n = min(max(n, 0), k_cache.shape[2])
        if n == 0:
            continue
        k, v = _live_kv(k_cache[i, :, :n], k_scale, work), _live_kv(v_cache[i, :, :n], v_scale, work)  # [Hkv, n, D]
        if t > 1 and n == t:               # a row made only of new tokens (a first prefill chunk): plain causal,
            # 4-D so SDPA takes its flash path (O(T) memory; 3-D inputs fall back to the math path's T x T)
            o = F.scaled_dot_product_attention(q[i].transpose(0, 1)[None], k.repeat_interleave(g, 0)[None],
                                               v.repeat_interleave(g, 0)[None], is_causal=True, scale=scale)
            out[i] = o[0].transpose(0, 1)
            continue
        if t > 1 and n > t and q.device.type == "cpu":
            out[i] = _prefix_then_causal(q[i], k, v, n - t, scale)
            continue
        first = max(0, t - n)              # queries before the row's first key see nothing: they stay zero
        step = t if t == 1 else max(1, MASK_ELEMENTS // (g * n))
        for t0 in range(first, t, step):
            t1 = min(t, t0 + step)
            qi = q[i, t0:t1].reshape(t1 - t0, hkv, g, d).transpose(0, 1).reshape(hkv, (t1 - t0) * g, d)  # rows (t, g)
            mask = None
            if t > 1:
                pos = n - t + t0 + torch.arange((t1 - t0) * g, device=q.device) // g                   # [T' * G]
                mask = torch.arange(n, device=q.device)[None, :] <= pos[:, None]                      # [T' * G, n]
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)              # [Hkv, T' * G, D]
            out[i, t0:t1] = o.reshape(hkv, t1 - t0, g, d).transpose(0, 1).reshape(t1 - t0, hq, d)
    return out


def _prefix_then_causal(q, k, v, prefix: int, scale: float) -> torch.Tensor:
    """T new queries ``[T, Hq, D]`` of one row over its ``prefix`` cached keys and then its T new
    ones (``k``, ``v`` ``[Hkv, prefix + T, D]``), without a mask: every query sees the whole prefix
    (GQA folded into the query rows) and the new keys causally (per query head); the two softmax
    parts are merged by their log-sum-exps (CPU flash attention returns them). O(T) memory."""
    t, hq, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    qa = q.reshape(t, hkv, g, d).transpose(0, 1).reshape(1, hkv, t * g, d)                 # rows (t, g)
    oa, la = flash(qa, k[None, :, :prefix], v[None, :, :prefix], 0.0, False, scale=scale)
    oa = oa.reshape(hkv, t, g, d).transpose(0, 1).reshape(t, hq, d)
    la = la.reshape(hkv, t, g).transpose(0, 1).reshape(t, hq)
    kb = k[:, prefix:].repeat_interleave(g, 0)[None]                                        # [1, Hq, T, D]
    vb = v[:, prefix:].repeat_interleave(g, 0)[None]
    ob, lb = flash(q.transpose(0, 1)[None].contiguous(), kb, vb, 0.0, True, scale=scale)
    ob, lb = ob[0].transpose(0, 1), lb[0].transpose(0, 1)                                  # [T, Hq, D], [T, Hq]
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    return ((oa.float() * wa[..., None] + ob.float() * wb[..., None]) / (wa + wb)[..., None]).to(q.dtype)


# ---- validation ----------------------------------------------------------------------------------

def _tensor(name, t, *, dtypes, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def _scale_arg(name, s, device) -> Optional[torch.Tensor]:
    """A per-tensor scale as a 1-element fp32 tensor on ``device`` (a float becomes one)."""
    if s is None:
        return None
    if isinstance(s, torch.Tensor):
        _tensor(name, s, dtypes=(torch.float32,), device=device)
        if s.numel() != 1:
            raise ValueError(f"{name}: expected one element (a per-tensor scale), got shape {list(s.shape)}")
        return s.reshape(1)
    return torch.full((1,), dispatch.check_float(name, s, lo=0.0, lo_open=True), dtype=torch.float32, device=device)


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, k_scale=None, v_scale=None):
    """Attention of the new tokens over each row's live KV prefix (decode and speculative verification).

    Args:
        q: ``[B, Hq, D]`` (one new token per row) or ``[B, T, Hq, D]`` (T new tokens per row),
            fp32/fp16/bf16, head dim contiguous.
        k_cache, v_cache: ``[B, Hkv, L, D]``: head-major, L = max_len, Hkv dividing Hq (query head
            h reads kv head ``h // (Hq / Hkv)``, GQA). Any strides with a contiguous head dim, so a
            token-major buffer ``[B, L, Hkv, D]`` passes as ``buf.transpose(1, 2)`` without a copy;
            head-major contiguous is the fastest. q's dtype, or float8_e4m3fn with per-tensor scales.
        lengths: int32/int64 ``[B]`` on q's device: the live length of each row *including* the T new
            tokens, whose K and V must already be written at positions ``len - T .. len - 1``.
            Values in 0 .. L: checked for CPU tensors in eager calls; otherwise (CUDA, or under
            torch.compile, where a check would sync or break the graph) read on the device and clamped.
        scale: softmax scale, default ``D ** -0.5``.
        k_scale, v_scale: per-tensor dequantization scales (float > 0, or a 1-element fp32 tensor on
            q's device, the CUDA-graph-safe form): the value is ``stored * scale``. Required for an
            FP8 cache; optional (default 1) otherwise.

    Query t of row b sits at position ``p = lengths[b] - T + t`` and attends to keys ``0 .. p``
    (causal among the T new tokens). Only positions below the length are read. A query with ``p < 0``
    (a row of length 0, or shorter than T) sees no key: its output is zero. Softmax in fp32.

    Returns ``[B, Hq, D]`` or ``[B, T, Hq, D]`` (as q) in q's dtype.

    Example::

        >>> kc[:, :, pos] = k_new; vc[:, :, pos] = v_new            # [B, Hkv, D] written at pos = len - 1
        >>> o = decode_attention(q, kc, vc, pos + 1)                  # q [B, Hq, D] -> o [B, Hq, D]
    """
    _tensor("q", q, dtypes=_FLOATS)
    if q.dim() not in (3, 4):
        raise ValueError(f"q: expected [B, Hq, D] or [B, T, Hq, D], got shape {list(q.shape)}")
    q4 = q[:, None] if q.dim() == 3 else q
    b, t, hq, d = q4.shape
    if d == 0:
        raise ValueError(f"q: the head dim D must be >= 1, got shape {list(q.shape)}")
    dev = q.device
    _tensor("k_cache", k_cache, dtypes=KV_DTYPES, device=dev)
    if k_cache.dim() != 4 or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected [B={b}, Hkv, L, D={d}] (head-major), got shape {list(k_cache.shape)}")
    hkv = k_cache.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k_cache: its kv head count Hkv={hkv} must divide the query head count Hq={hq}")
    _tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), device=dev)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected k_cache's shape {list(k_cache.shape)}, got {list(v_cache.shape)}")
    if k_cache.dtype not in _FP8 and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache: expected q's dtype {q.dtype} or float8_e4m3fn, got {k_cache.dtype}")
    for name, v in (("q", q4), ("k_cache", k_cache), ("v_cache", v_cache)):
        if v.numel() and v.stride(-1) != 1:
            raise ValueError(f"{name}: the head dim must be contiguous (stride 1), got strides {v.stride()}")
    _tensor("lengths", lengths, dtypes=(torch.int32, torch.int64), device=dev)
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths: expected shape [B={b}], got {list(lengths.shape)}")
    if not lengths.is_cuda and b and not torch.compiler.is_compiling() and not (0 <= int(lengths.min()) and int(lengths.max()) <= k_cache.shape[2]):
        raise ValueError(f"lengths: expected values in 0 .. {k_cache.shape[2]} (max_len), got {lengths.tolist()}")
    if k_cache.dtype in _FP8 and (k_scale is None or v_scale is None):
        raise ValueError("k_scale, v_scale: required for a float8_e4m3fn cache (dequantized value = fp8 * scale)")
    sm = d ** -0.5 if scale is None else dispatch.check_float("scale", scale, lo=0.0, lo_open=True)
    ks, vs = _scale_arg("k_scale", k_scale, dev), _scale_arg("v_scale", v_scale, dev)
    out = _decode_attention_op(q4, k_cache, v_cache, lengths, sm, ks, vs)
    return out[:, 0] if q.dim() == 3 else out
