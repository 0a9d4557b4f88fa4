"""RMSNorm (optionally gated) fused with NVFP4 activation quantization: the A operand of a W4A4 GEMM.

Unfused, a norm writes its bf16 output (2 B/element) and the quantize kernel reads it back; fused,
the normalized row stays in registers and only the codes and scales leave (0.5625 B/element). The
norm's output is rounded to x's dtype before quantizing, exactly where the unfused path rounds, so
the codes equal the unfused ones except where the two norms' fp32 sums differ in the last bit.

  plain: v = w * x * rsqrt(mean(x^2) + eps)                      over the whole row (group = K)
  gated: v = w * g * rsqrt(mean(g^2) + eps), g = x * silu(z)     within groups of ``group_size``

Quantization is 1x16 round-to-nearest with a static global decode scale (ModelOpt's
``input_scale``): a dynamic scale would need the amax of the normalized tensor first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantize import _block_scale, _nearest_code, _round_to, _store_fp4


@triton.jit
def _norm_quantize_fwd_kernel(x_ptr, z_ptr, w_ptr, gs_ptr, codes_ptr, scales_ptr, M, K, stride_xm, stride_zm, eps,
                              HAS_Z: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, BM: tl.constexpr):
    i_m, i_g = tl.program_id(0), tl.program_id(1)
    o_r = i_m * BM + tl.arange(0, BM)
    m_r = o_r < M
    o_row = o_r.to(tl.int64)
    o_i = tl.arange(0, GB)
    m_i = o_i < GS
    o_c = i_g * GS + o_i
    m_x = m_r[:, None] & m_i[None, :]
    b_x = tl.load(x_ptr + o_row[:, None] * stride_xm + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, GB]
    if HAS_Z:
        b_z = tl.load(z_ptr + o_row[:, None] * stride_zm + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)
        b_x = b_x * (b_z * tl.sigmoid(b_z))
    b_rs = 1.0 / tl.sqrt_rn(tl.sum(b_x * b_x, axis=1) / GS + eps)                                          # [BM]
    b_w = tl.load(w_ptr + o_c, mask=m_i, other=0.0).to(tl.float32)
    b_v = _round_to(b_w[None, :] * (b_x * b_rs[:, None]), x_ptr.dtype.element_ty).to(tl.float32)

    s_dec = tl.load(gs_ptr)
    s_enc = tl.div_rn(1.0 + 0.0 * s_dec, s_dec)
    NB: tl.constexpr = GB // 16
    b_t = tl.reshape(b_v, (BM, NB, 16))
    b_nan = b_t != b_t
    b_bmax = tl.max(tl.where(b_nan, 0.0, tl.abs(b_t)), axis=2)                                             # [BM, NB]
    b_bnan = tl.max(b_nan.to(tl.int32), axis=2)
    b_s, b_inv = _block_scale(b_bmax, b_bnan, s_enc, s_dec, BM, NB)
    b_c = _nearest_code(tl.abs(b_t * b_inv[:, :, None]))
    o_j = tl.arange(0, NB)
    o_b = tl.where(o_j < GS // 16, i_g * (GS // 16) + o_j, K // 16)      # padding blocks land out of range
    _store_fp4(b_c, b_s, b_t, b_bnan, codes_ptr, scales_ptr, o_row, m_r, o_b, K, BM, NB)


def norm_quantize(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, *, z: torch.Tensor | None,
                  group_size: int, eps: float):
    """(codes uint8 [M, K/2], scales uint8 [M, K/16]) of the normalized x [M, K] (see module docstring)."""
    m, k = x.shape
    assert x.stride(-1) == 1 and (z is None or z.stride(-1) == 1) and k % group_size == 0 and group_size % 16 == 0
    codes = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(m, k // 16, dtype=torch.uint8, device=x.device)
    if m == 0:
        return codes, scales
    gb = triton.next_power_of_2(group_size)
    bm = max(1, min(16, 4096 // gb))
    grid = (triton.cdiv(m, bm), k // group_size)
    _norm_quantize_fwd_kernel[grid](x, z if z is not None else x, weight, input_scale.float().reshape(()), codes, scales,
                                    m, k, x.stride(0), z.stride(0) if z is not None else 0, float(eps),
                                    HAS_Z=z is not None, GS=group_size, GB=gb, BM=bm, num_warps=4 if gb <= 1024 else 8)
    return codes, scales
