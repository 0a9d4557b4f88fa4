"""Decode attention over the live KV prefix: the plain-torch reference (fp32 / fp64, one row at a time).

Notation (package-wide): q ``[B, T, Hq, D]``, the KV cache ``[B, Hkv, L, D]`` (head-major, ``L`` =
max_len), lengths ``[B]``. Query t of row b sits at position ``lengths[b] - T + t`` and sees keys
``0 .. that position``; the reference slices each row's cache to its live prefix, so it reads
``2 * lengths[b] * Hkv * D`` elements per row (:func:`kv_bytes_read` measures this).

No Triton import here: this module is the definition of correct and runs anywhere.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

LOG2E = 1.4426950408889634


def _scale_value(s, dtype) -> Optional[torch.Tensor]:
    """A per-tensor dequantization scale (float or 1-element tensor) as a 0-dim tensor of ``dtype``."""
    if s is None:
        return None
    return s.reshape(()).to(dtype) if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=dtype)


def dequantize_kv(cache: torch.Tensor, scale, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``cache`` (any float dtype or float8_e4m3fn) in ``dtype``, times its per-tensor ``scale`` (None = 1)."""
    out = cache.to(dtype)
    s = _scale_value(scale, dtype)
    return out if s is None else out * s.to(out.device)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, *, scale: Optional[float] = None, k_scale=None, v_scale=None,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention of T new queries per row over that row's live KV prefix, softmax in ``dtype``.

    Args:
        q: ``[B, T, Hq, D]``; k_cache, v_cache: ``[B, Hkv, L, D]`` with Hkv | Hq (query head h reads
            kv head ``h // (Hq / Hkv)``), any float dtype or float8_e4m3fn; lengths: int ``[B]``, the
            live length of each row including its T new tokens (0 .. L); scale: the softmax scale
            (default ``D ** -0.5``); k_scale, v_scale: per-tensor dequantization scales (float or
            1-element tensor; dequantized value = stored value * scale; None = 1).

    Query t of row b sits at position ``p = lengths[b] - T + t`` and attends to keys ``0 .. p``
    (causal among the T new tokens). A query with ``p < 0`` (a row shorter than T, or of length 0)
    sees nothing: its output is zero. Returns ``[B, T, Hq, D]`` in ``dtype``.
    """
    b, t, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    sm = d ** -0.5 if scale is None else float(scale)
    out = torch.zeros(b, t, hq, d, dtype=dtype, device=q.device)
    for i, n in enumerate(lengths.tolist()):
        n = min(n, k_cache.shape[2])          # the kernels clamp unchecked lengths to the buffer
        if n <= 0:
            continue
        k = dequantize_kv(k_cache[i, :, :n], k_scale, dtype)                        # [Hkv, n, D]
        v = dequantize_kv(v_cache[i, :, :n], v_scale, dtype)
        qi = q[i].to(dtype).reshape(t, hkv, g, d).permute(1, 2, 0, 3)               # [Hkv, G, T, D]
        s = torch.einsum("hgtd,hnd->hgtn", qi, k) * sm
        pos = n - t + torch.arange(t, device=q.device)                              # [T]
        seen = torch.arange(n, device=q.device)[None, :] <= pos[:, None]           # [T, n]
        s = s.masked_fill(~seen, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))                   # rows that see nothing
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        o = torch.einsum("hgtn,hnd->hgtd", p, v) / torch.where(den > 0, den, torch.ones_like(den))
        out[i] = o.permute(2, 0, 1, 3).reshape(t, hq, d)
    return out


def kv_bytes_live(lengths, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The KV bytes one decode step must read: K and V of every row's live prefix,
    ``2 * sum(lengths) * Hkv * D * itemsize`` (independent of max_len)."""
    total = int(lengths.sum()) if isinstance(lengths, torch.Tensor) else int(sum(lengths))
    return 2 * total * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class _CountReads(TorchDispatchMode):
    """Sums the bytes of every tensor argument that views one of ``storages`` and is consumed by a
    computing (non-view) aten op: what an op actually reads, not what the code slices."""

    def __init__(self, tensors):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "nemotron":          # a package op: count the aten ops its CPU kernel runs
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if not func.is_view:
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs:
                    distinct = 1           # a broadcast (stride-0) dim repeats the same memory
                    for size, stride in zip(a.shape, a.stride()):
                        distinct *= size if stride else min(size, 1)
                    self.bytes += distinct * a.element_size()
        return func(*args, **kwargs)


def kv_bytes_read(fn: Callable, *caches: torch.Tensor):
    """Run ``fn()`` and count the bytes its aten ops read from ``caches`` (the KV buffers).

    Views (slicing, selecting a row) are free, and so is a ``nemotron::`` op's call itself (the aten
    ops inside it are counted); every computing op that takes a view of a cache
    counts the distinct elements that view covers (a broadcast dim once). Returns ``(fn's result, bytes)``.

    Example::

        >>> out, n = kv_bytes_read(lambda: decode_attention_reference(q, kc, vc, lengths), kc, vc)
    """
    with _CountReads(caches) as counter:
        out = fn()
    return out, counter.bytes
