"""Triton kernel: the gated grouped RMSNorm, ``rmsnorm(x * silu(z))`` within groups of the last dim
(Nemotron's ``norm_before_gate=False``). One program per (row, group); x and z are read once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rmsnorm_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, D, GS, eps, sx, sz, sy, BG: tl.constexpr):
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    o = i_g * GS + tl.arange(0, BG)
    m = tl.arange(0, BG) < GS
    row = i_r.to(tl.int64)
    b_x = tl.load(x_ptr + row * sx + o, mask=m, other=0.0).to(tl.float32)
    b_z = tl.load(z_ptr + row * sz + o, mask=m, other=0.0).to(tl.float32)
    b_v = b_x * b_z * tl.sigmoid(b_z)                                   # x * silu(z), before the norm
    b_r = tl.rsqrt(tl.sum(b_v * b_v, axis=0) / GS + eps)
    b_w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + o, (b_v * b_r * b_w).to(y_ptr.dtype.element_ty), mask=m)


def gated_rmsnorm(x, z, weight, *, group_size, eps=1e-5):
    d = x.shape[-1]
    x2, z2 = x.reshape(-1, d), z.reshape(-1, d)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _gated_rmsnorm_fwd_kernel[(x2.shape[0], d // group_size)](
            x2, z2, weight, y, d, group_size, eps, x2.stride(0), z2.stride(0), y.stride(0),
            BG=triton.next_power_of_2(group_size), num_warps=4 if group_size <= 1024 else 8)
    return y.reshape(x.shape)
