"""Triton grouped GEMM for the routed experts: gather -> up -> relu2 -> down -> weighted slots.

Rows are the (token, k) slots sorted by expert (``offs`` = cumulative ends, ``torch._grouped_mm``'s
convention). A block table built on the device (no host sync, CUDA-graph safe) gives every
BM-row block one expert, so experts are never padded in memory: only the block index space has at
most one partial block per touched expert, and blocks past the last one exit at once.

  up   (``GATHER``):   h[r] = relu2(x[perm[r] // k] @ up[e].T)    stored in x's dtype, sorted order
  down (``SCATTER``):  slots[perm[r]] = w[perm[r]] * (h[r] @ down[e].T)   fp32, slot order

The gather is fused into the A load and the scatter into the store, so neither x nor the outputs
are copied into expert order. The combine (a sum over each token's k slots) is deterministic: no
atomics anywhere. Weights are bf16/fp16/fp32 ``[E, N, K]``, or NVFP4 (packed codes, E4M3 block
scales, one fp32 global scale per expert) expanded to the MMA dtype in registers: only the experts
that received rows are read, 0.5625 B per weight.

Decode (few slots per expert): BM = 16 and one block per touched expert, so each touched expert's
weights are read exactly once, split over N tiles to fill the GPU: the kernel is bound by reading
those weights. Every configuration uses the same BK (per weight format), so a row's fp32 sums run in
the same order however rows are batched (expert parallelism returns bit-identical slots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...dispatch import interpreting
from ...nvfp4.triton.gemm import _fp4_tile, word_aligned

# K step per weight format, the same for every configuration. NVFP4 takes 128: the hot loop's fixed
# cost (addresses, masks, barriers) is about half of it beside the cheap expansion, so spreading it over
# twice the weights takes it from ~6.1 to ~5.1 SASS instructions per weight (bench.static)
BK, BK_FP4 = 64, 128
# Launch configurations by mean rows per touched expert. Defaults, not yet tuned on a GPU:
# `python -m bench moe_experts` measures them. (max mean rows, BM, BN, num_warps, num_stages)
CONFIGS = [
    (16, 16, 64, 4, 4),
    (64, 64, 64, 4, 3),
    (None, 128, 128, 8, 3),
]


@triton.jit
def _moe_gemm_fwd_kernel(a_ptr, w_ptr, ws_ptr, wgs_ptr, perm_ptr, rw_ptr, blk_e_ptr, blk_r_ptr, offs_ptr,
                         out_ptr, N, K, stride_am, TOP_K,
                         GATHER: tl.constexpr, SCATTER: tl.constexpr, W_FP4: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    i_b, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(blk_e_ptr + i_b)
    if i_e < 0:                      # past the last block of this batch
        return
    row0 = tl.load(blk_r_ptr + i_b)
    row_end = tl.load(offs_ptr + i_e)
    o_r = row0 + tl.arange(0, BM)
    m_r = o_r < row_end
    slot = tl.load(perm_ptr + o_r, mask=m_r, other=0).to(tl.int64)                                 # [BM]
    o_a = slot // TOP_K if GATHER else o_r.to(tl.int64)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    e64 = i_e.to(tl.int64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        o_k = k + tl.arange(0, BK)
        m_k = (o_k < K) | (EVEN_K != 0)                 # a constant True folds the K mask away
        b_a = tl.load(a_ptr + o_a[:, None] * stride_am + o_k[None, :],
                      mask=m_r[:, None] & m_k[None, :], other=0.0).to(DOT_DTYPE)                    # [BM, BK]
        if W_FP4:
            b_w = _fp4_tile(w_ptr + e64 * N * (K // 2), ws_ptr + e64 * N * (K // 16), o_n, m_n, k, K,
                            BN, BK, DOT_DTYPE, EVEN_K)                                             # [BN, BK]
        else:
            b_w = tl.load(w_ptr + e64 * N * K + o_n[:, None] * K + o_k[None, :],
                          mask=m_n[:, None] & m_k[None, :], other=0.0).to(DOT_DTYPE)               # [BN, BK]
        if IEEE:
            acc = tl.dot(b_a, tl.trans(b_w), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_a, tl.trans(b_w), acc)
    if W_FP4:
        acc = acc * (tl.load(wgs_ptr + e64) * 128.0)                  # 1 / TILE_SCALE
    m_o = m_r[:, None] & m_n[None, :]
    if SCATTER:
        b_w8 = tl.load(rw_ptr + slot, mask=m_r, other=0.0)                                        # [BM]
        tl.store(out_ptr + slot[:, None] * N + o_n[None, :], acc * b_w8[:, None], mask=m_o)        # [BM, BN]
    else:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
        tl.store(out_ptr + o_r.to(tl.int64)[:, None] * N + o_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_o)                                                                         # [BM, BN]


def pick_config(rows: int, experts: int):
    mean = rows / max(1, min(rows, experts))
    for max_mean, bm, bn, warps, stages in CONFIGS:
        if max_mean is None or mean <= max_mean:
            return bm, bn, warps, stages
    raise AssertionError("CONFIGS ends with a catch-all")


def block_table(offs: torch.Tensor, rows: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per BM-row block: its expert (-1 past the end) and first sorted row; computed on the device.

    The table has ``cdiv(rows, bm) + min(rows, E)`` entries, a bound on the blocks any routing can
    need (each touched expert adds at most one partial block), so its size depends only on shapes.
    """
    e = offs.shape[0]
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    nblk = (counts + bm - 1) // bm
    blk_end = nblk.cumsum(0)                                                                       # [E]
    size = triton.cdiv(rows, bm) + min(rows, e)
    b = torch.arange(size, device=offs.device, dtype=blk_end.dtype)
    expert = torch.searchsorted(blk_end, b, right=True)                                            # [size]
    valid = expert < e
    expert = expert.clamp_max(e - 1)
    first_blk = blk_end[expert] - nblk[expert]
    row0 = (offs[expert] - counts[expert]) + (b - first_blk) * bm
    return (torch.where(valid, expert, -1).to(torch.int32), row0.to(torch.int32))


def _dot_dtype(x: torch.Tensor):
    if interpreting() or x.dtype == torch.float32:
        return tl.float32          # interpreter: tl.dot on bf16 multiplies raw bits (upstream bug)
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


def _launch(a, w, perm, route_w, blocks, offs, out, top_k, *, gather, scatter, cfg):
    (blk_e, blk_r), (bm, bn, warps, stages) = blocks, cfg
    n = out.shape[1]
    if w[0] is None:
        w_dense = w[1]
        k = w_dense.shape[2]
        args = (w_dense, w_dense, w_dense)
    else:
        codes, scales, gs = w
        codes = word_aligned(codes)
        k = codes.shape[2] * 2
        args = (codes, scales, gs)
    bk = BK if w[0] is None else BK_FP4
    grid = (blk_e.shape[0], triton.cdiv(n, bn))
    _moe_gemm_fwd_kernel[grid](a, *args, perm, route_w, blk_e, blk_r, offs, out, n, k, a.stride(0), top_k,
                               GATHER=gather, SCATTER=scatter, W_FP4=w[0] is not None, DOT_DTYPE=_dot_dtype(a),
                               IEEE=_dot_dtype(a) == tl.float32, EVEN_K=k % bk == 0, BM=bm, BN=bn, BK=bk,
                               num_warps=warps, num_stages=stages)


def expert_slots(x: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, offs: torch.Tensor, top_k: int,
                 up, down) -> torch.Tensor:
    """Weighted slots fp32 [T * k, H] (see module docstring); ``up``/``down`` are ``(None, w [E, N, K])``
    for dense weights or ``(codes uint8 [E, N, K/2], scales uint8 [E, N, K/16], gs fp32 [E])``."""
    rows = perm.shape[0]
    e = offs.shape[0]
    inter = (up[1] if up[0] is None else up[0]).shape[1]
    hdim = (down[1] if down[0] is None else down[0]).shape[1]
    slots = torch.empty(rows, hdim, dtype=torch.float32, device=x.device)
    if rows == 0:
        return slots
    assert x.stride(-1) == 1 and perm.is_contiguous() and offs.is_contiguous()
    cfg = pick_config(rows, e)
    blocks = block_table(offs, rows, cfg[0])
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    route_w = weights.reshape(-1).float().contiguous()
    _launch(x, up, perm, route_w, blocks, offs, h, top_k, gather=True, scatter=False, cfg=cfg)
    _launch(h, down, perm, route_w, blocks, offs, slots, top_k, gather=False, scatter=True, cfg=cfg)
    return slots
