"""SSD stage 4: the chunk scan, y of one block of a chunk's rows from the chunk's inputs and the
state before the chunk (stages 1-3 in ``ssd_chunk_state.py``).

For rows i of the chunk (tokens t = first + i), columns j <= i of the same chunk:

    y_i = exp2(min(cs_i, 0)) C_i S^T + sum_{j <= i} (C_i . B_j) exp2(min(cs_i - cs_j, 0)) dt_j x_j
          (+ D x_i, then * silu(z_i))

S is the fp32 state before the chunk. C B^T is computed per block of columns (never stored), masked
after the product (a NaN in B row j fills column j, which rows i < j must not see), and x enters the
product with its non-finite entries zeroed, each column set to NaN from its first non-finite row on,
so a NaN / inf at token t never reaches an earlier token as 0 * NaN (see reference.py). Like
upstream, fp16 / bf16 inputs round the decay-weighted C B^T and the state to the input dtype before
each MMA.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ssd_chunk_state import INF, NAN, _chunk


@triton.jit(do_not_specialize=["T", "K"])
def _ssd_chunk_scan_fwd_kernel(x_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dt_ptr, cs_ptr, st_ptr, tab_ptr, y_ptr,
                               T, H, P, N, K, HG,
                               sx_b, sx_t, sx_h, sb_b, sb_t, sb_g, sc_b, sc_t, sc_g, sz_b, sz_t, sz_h,
                               sy_b, sy_t, sy_h,
                               HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                               IS_VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                               Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                               ONE_N: tl.constexpr):
    i_bcm, i_hp = tl.program_id(0), tl.program_id(1)                     # batch rows, chunks, row blocks
    i_bc, i_m = i_bcm // (Q // BM), i_bcm % (Q // BM)
    i_b, i_c = i_bc // K, i_bc % K
    n_p = tl.cdiv(P, BP)
    i_h, i_p = i_hp // n_p, i_hp % n_p
    i_r, bos, eos = _chunk(tab_ptr, i_c, i_b, T, Q, IS_VARLEN)
    i_g = i_h // HG
    o_i = i_m * BM + tl.arange(0, BM)                                     # rows, within the chunk
    o_t = bos + o_i
    m_t = o_t < eos
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    p_cs = ((i_r * H + i_h) * K + i_c) * Q
    b_csi = tl.load(cs_ptr + p_cs + o_i)                                                     # [BM]
    p_c = c_ptr + i_r * sc_b + o_t[:, None] * sc_t + i_g * sc_g
    p_st = st_ptr + ((i_r * K + i_c) * H + i_h) * P * N + o_p[None, :] * N

    o_n = tl.arange(0, BN)
    if ONE_N:                                                             # C's rows stay on chip throughout
        b_C0 = tl.load(p_c + o_n[None, :], mask=m_t[:, None] & (o_n < N)[None, :], other=0.0).to(DOT_DTYPE)
    b_y = tl.zeros((BM, BP), dtype=tl.float32)
    for n0 in range(0, N, BN):                                            # the carried state's part
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        if ONE_N:
            b_C = b_C0
        else:
            b_C = tl.load(p_c + o_n[None, :], mask=m_t[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BN]
        b_s = tl.load(p_st + o_n[:, None], mask=m_n[:, None] & m_p[None, :], other=0.0).to(DOT_DTYPE)  # [BN, BP]
        if IEEE:
            b_y += tl.dot(b_C, b_s, input_precision="ieee")
        else:
            b_y += tl.dot(b_C, b_s)
    b_y *= tl.exp2(tl.minimum(b_csi, 0.0))[:, None]

    b_bad = tl.full((BP,), Q, dtype=tl.int32)                             # first non-finite row of x, or Q
    for j0 in range(0, (i_m + 1) * BM, BM):                               # column blocks up to the diagonal
        o_j = j0 + tl.arange(0, BM)
        o_s = bos + o_j
        m_s = o_s < eos
        b_cb = tl.zeros((BM, BM), dtype=tl.float32)
        for n0 in range(0, N, BN):
            o_n = n0 + tl.arange(0, BN)
            m_n = o_n < N
            if ONE_N:
                b_C = b_C0
            else:
                b_C = tl.load(p_c + o_n[None, :], mask=m_t[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)
            p_b = b_ptr + i_r * sb_b + o_s[None, :] * sb_t + i_g * sb_g + o_n[:, None]
            b_Bt = tl.load(p_b, mask=m_n[:, None] & m_s[None, :], other=0.0).to(DOT_DTYPE)               # [BN, BM]
            if IEEE:
                b_cb += tl.dot(b_C, b_Bt, input_precision="ieee")
            else:
                b_cb += tl.dot(b_C, b_Bt)
        b_csj = tl.load(cs_ptr + p_cs + o_j)                                                 # [BM]
        b_dtj = tl.load(dt_ptr + p_cs + o_j)
        b_w = b_cb * tl.exp2(tl.minimum(b_csi[:, None] - b_csj[None, :], 0.0)) * b_dtj[None, :]
        b_w = tl.where(o_i[:, None] >= o_j[None, :], b_w, 0.0)
        p_x = x_ptr + i_r * sx_b + o_s[:, None] * sx_t + i_h * sx_h + o_p[None, :]
        b_x = tl.load(p_x, mask=m_s[:, None] & m_p[None, :], other=0.0)                      # [BM, BP]
        m_fin = tl.abs(b_x.to(tl.float32)) < INF
        b_bad = tl.minimum(b_bad, tl.min(tl.where(m_fin, Q, o_j[:, None]), axis=0))
        b_xd = tl.where(m_fin, b_x, 0.0).to(DOT_DTYPE)
        if IEEE:
            b_y += tl.dot(b_w.to(DOT_DTYPE), b_xd, input_precision="ieee")
        else:
            b_y += tl.dot(b_w.to(DOT_DTYPE), b_xd)
    b_y = tl.where(o_i[:, None] >= b_bad[None, :], NAN, b_y)

    if HAS_D:
        p_xi = x_ptr + i_r * sx_b + o_t[:, None] * sx_t + i_h * sx_h + o_p[None, :]
        b_xi = tl.load(p_xi, mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)    # [BM, BP]
        if D_PER_P:
            b_y += b_xi * tl.load(d_ptr + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
        else:
            b_y += b_xi * tl.load(d_ptr + i_h).to(tl.float32)
    if HAS_Z:
        p_z = z_ptr + i_r * sz_b + o_t[:, None] * sz_t + i_h * sz_h + o_p[None, :]
        b_z = tl.load(p_z, mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)      # [BM, BP]
        b_y = b_y * b_z * tl.sigmoid(b_z)
    p_y = y_ptr + i_r * sy_b + o_t[:, None] * sy_t + i_h * sy_h + o_p[None, :]
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_t[:, None] & m_p[None, :])         # [BM, BP]
