"""Triton chunked SSD scan, parallel over chunks: four kernels, each with a grid over chunks and heads.

The Mamba-2 chunked algorithm (reference.ssd_chunked), one kernel per stage:

1. ``_ssd_cumsum_fwd_kernel`` (chunks x head blocks): dt processed (bias, softplus, limits) and the
   cumsum cs of the floored log2 decay dt * A within each chunk, fp32 ``[rows, H, K, Q]``.
2. ``_ssd_chunk_state_fwd_kernel`` (chunks x heads x P/N blocks): the state each chunk leaves
   from a zero start, x^T (dt exp2(min(cs_last - cs, 0)) B), fp32 ``[rows, K, H, P, N]``.
3. ``_ssd_state_passing_fwd_kernel`` (sequences x state blocks x heads): the only sequential pass,
   over a sequence's K chunks (one fp32 multiply-add per state element and chunk); it turns the
   chunk states into the state before each chunk, in place, and writes the final states.
4. ``_ssd_chunk_scan_fwd_kernel`` (chunks x row blocks x heads x P blocks): y from the chunk's
   C B^T masked by the decay, plus C times the state before the chunk, then D and the z gate.

Batch rows and chunks share grid axis 0 (2^31 - 1 programs); axes 1 and 2 (at most 65,535) hold only
heads and blocks.

The CTA counts of stages 1, 2 and 4 grow with T, so batch 1 fills the GPU (at the Super shape and
64K tokens the chunk scan launches 131,072 CTAs, about 500 waves); stage 3 has one thread per 4 state
elements, all resident at once (a second wave would wait for the first one's whole walk). A CTA holds
at most 64 rows of one chunk (C B^T in 64 x 64 blocks up to the diagonal, never Q x Q), so every
chunk size (16..256) and dtype fits a block's shared memory without spills
(``python -m bench.static --cases ssd_scan``). Memory beyond x and y: the fp32 dt and cs (2 x 4 B
per token and head, rounded up to whole chunks) and the fp32 chunk states (4 P N B per chunk and head).

Varlen (cu_seqlens, batch 1): chunks start at each sequence's first token, numbered over all
sequences in a table built on the device (no host sync), so no chunk mixes two sequences.
Numerics: see ``ssd_chunk_state`` (fp32 dt / cumsum / states, every exponent clamped to <= 0) and
``ssd_chunk_scan`` (causal handling of non-finite inputs).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...dispatch import interpreting
from .ssd_chunk_scan import _ssd_chunk_scan_fwd_kernel
from .ssd_chunk_state import _sequence  # noqa: F401  (conv1d's varlen programs use it)
from .ssd_chunk_state import _ssd_chunk_state_fwd_kernel, _ssd_cumsum_fwd_kernel, _ssd_state_passing_fwd_kernel

BS = 256           # state elements per state-passing program: H P N / BS programs of 2 warps


def _chunk_table(cu_seqlens: torch.Tensor, t: int, q: int):
    """The chunks of S packed sequences: (table int64 [K, 3] of (sequence, first token, end token),
    offsets int64 [S + 1] of each sequence's first chunk, K). K = cdiv(T, Q) + S bounds the chunk
    count without reading cu_seqlens on the host; the unused entries have first = end = 0."""
    cu = cu_seqlens.to(torch.int64)
    s = cu.numel() - 1
    off = torch.cat([cu.new_zeros(1), torch.cumsum((cu[1:] - cu[:-1] + q - 1) // q, 0)])
    k = triton.cdiv(t, q) + s
    o_k = torch.arange(k, device=cu.device)
    seq = torch.searchsorted(off[1:], o_k, right=True).clamp(max=s - 1)
    first = cu[seq] + (o_k - off[seq]) * q
    end = torch.minimum(first + q, cu[seq + 1])
    used = o_k < off[-1]
    zero = torch.zeros_like(first)
    tab = torch.stack([seq, torch.where(used, first, zero), torch.where(used, end, zero)], 1).contiguous()
    return tab, off, k


def _config(q: int, p: int, n: int, fp32: bool) -> dict:
    """Block sizes, chosen with ``python -m bench.static --cases ssd_scan`` (no spills, every chunk size
    and dtype): the chunk scan's row / column blocks (BM), P and N blocks and warps, the chunk state's
    token (BK) and N blocks, and the heads per cumsum program. fp32 inputs take the IEEE (FMA) dot,
    whose operands sit in registers: smaller blocks keep them there."""
    bp = min(64, max(16, triton.next_power_of_2(p)))
    n2 = max(16, triton.next_power_of_2(n))
    if fp32:
        blocks = dict(BM=min(32, max(16, q // 2)), BN=min(n2, 16), BK=min(q, 32), state_BN=min(n2, 32))
    else:
        blocks = dict(BM=min(q, 64), BN=min(n2, 128), BK=min(q, 64), state_BN=min(n2, 128))
    return dict(blocks, BP=bp, warps=4, stages=2, state_warps=4, state_stages=3, BH=max(2, min(16, 512 // q)))


def ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, math.inf), initial_states=None, cu_seqlens=None, return_final_states=False):
    """Kernel twin of ``reference.ssd_recurrence`` (validated arguments; see ops.ssd_scan)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = chunk_size
    dev = x.device
    varlen = cu_seqlens is not None
    n_seq = cu_seqlens.numel() - 1 if varlen else b
    if varlen:
        tab, off, k = _chunk_table(cu_seqlens, t, q)
        rows = 1
    else:
        tab = off = None
        k, rows = triton.cdiv(t, q), b
    y = torch.empty(b, t, h, p, dtype=x.dtype, device=dev)
    final = torch.empty(n_seq, h, p, n, dtype=torch.float32, device=dev) if return_final_states else None
    dt_c = torch.empty(rows, h, k, q, dtype=torch.float32, device=dev)
    cs = torch.empty(rows, h, k, q, dtype=torch.float32, device=dev)
    states = torch.empty(rows, k, h, p, n, dtype=torch.float32, device=dev)
    fp32 = x.dtype == torch.float32
    if interpreting() or fp32:
        dot_dtype = tl.float32      # interpreter: tl.dot on bf16 multiplies raw bits (upstream bug)
    else:
        dot_dtype = tl.float16 if x.dtype == torch.float16 else tl.bfloat16
    cfg = _config(q, p, n, fp32)
    bp, bn, bm, bh, sbn = cfg["BP"], cfg["BN"], cfg["BM"], cfg["BH"], cfg["state_BN"]
    dummy = A
    tab_ = tab if varlen else dummy
    ieee = dot_dtype == tl.float32

    if rows * k:
        _ssd_cumsum_fwd_kernel[(rows * k, triton.cdiv(h, bh))](
            dt, A, dt_bias if dt_bias is not None else dummy, tab_, dt_c, cs,
            t, h, k, dt.stride(0), dt.stride(1), float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
            HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus,
            CLAMP_DT=dt_limit[0] > 0 or dt_limit[1] < math.inf, IS_VARLEN=varlen, Q=q, BH=bh, num_warps=4)
        _ssd_chunk_state_fwd_kernel[(rows * k, h * triton.cdiv(p, bp) * triton.cdiv(n, sbn))](
            x, B, dt_c, cs, tab_, states,
            t, h, p, n, k, h // g, x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
            IS_VARLEN=varlen, DOT_DTYPE=dot_dtype, IEEE=ieee, Q=q, BK=cfg["BK"], BP=bp, BN=sbn,
            num_warps=cfg["state_warps"], num_stages=cfg["state_stages"])
    if n_seq:
        _ssd_state_passing_fwd_kernel[(n_seq, triton.cdiv(p * n, BS), h)](
            states, cs, initial_states if initial_states is not None else dummy,
            final if final is not None else dummy, off if varlen else dummy,
            h, p * n, k,
            HAS_S0=initial_states is not None, STORE_FINAL=return_final_states, IS_VARLEN=varlen, Q=q, BS=BS,
            num_warps=2)
    if rows * k:
        zz = z if z is not None else x
        _ssd_chunk_scan_fwd_kernel[(rows * k * (q // bm), h * triton.cdiv(p, bp))](
            x, B, C, D if D is not None else dummy, zz, dt_c, cs, states, tab_, y,
            t, h, p, n, k, h // g,
            x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
            IS_VARLEN=varlen, DOT_DTYPE=dot_dtype, IEEE=ieee, Q=q, BM=bm, BP=bp, BN=bn, ONE_N=bn >= n,
            num_warps=cfg["warps"], num_stages=cfg["stages"])
    return (y, final) if return_final_states else y
