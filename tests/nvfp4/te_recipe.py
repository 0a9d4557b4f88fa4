"""An independent emulation of Transformer Engine's NVFP4 training recipe, the oracle of the training
tests. It follows TE's pure-torch ``reference_nvfp4.py`` semantics (../shared/notes/nvfp4_and_gemm.md
§1.2, §2): written apart from ``nemotron/nvfp4/reference.py`` (a threshold ladder instead of counting
comparisons, the RHT as a matrix product), so agreement is evidence, not an identity.

  S_enc  = 448 * 6 / amax  (FLT_MAX-clamped; 1 when amax == 0 or S_enc == 0), S_dec = 1 / S_enc
  scale  = e4m3(clamp(block_amax * (S_enc * fp32(1/6)), max=448))        per 1x16 block or 16x16 tile
  inv    = min(1 / (fp32(scale) * S_dec), FLT_MAX)
  code   = cast_to_fp4(clamp(x * inv, -6, 6)), ladder <=0.25, <0.75, <=1.25, <1.75, <=2.5, <3.5, <=5
  RHT    = each 16-block of the token dim times diag(s) @ H16 / 4 (fp32), rounded to the input dtype;
           the columnwise copy's amax is taken after it.
"""
from __future__ import annotations

import torch

SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)    # TE's get_wgrad_sign_vector
FLT_MAX = torch.finfo(torch.float32).max


def rht_matrix() -> torch.Tensor:
    h = torch.tensor([[1.0]])
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.diag(torch.tensor(SIGNS, dtype=torch.float32)) @ h / 4


def cast_to_fp4(v: torch.Tensor) -> torch.Tensor:
    """4-bit codes of v in [-6, 6]: TE's round-to-nearest-even ladder, the sign in bit 3."""
    a = v.abs()
    mag = torch.full_like(a, 7, dtype=torch.int32)
    for bound, code, strict in ((5.0, 6, False), (3.5, 5, True), (2.5, 4, False), (1.75, 3, True),
                                (1.25, 2, False), (0.75, 1, True), (0.25, 0, False)):
        below = a < bound if strict else a <= bound
        mag = torch.where(below, torch.full_like(mag, code), mag)
    return mag + 8 * torch.signbit(v).int()


def quantize(x: torch.Tensor, *, tile_rows: int = 1) -> tuple:
    """(codes uint8 [R, K/2], scales e4m3 [R, K/16], S_dec fp32) of a 2-D x along its last dim."""
    r, k = x.shape
    x32 = x.float()
    amax = x32.abs().max()
    one = torch.tensor(1.0)
    # true divisions, as TE's C++ (``1.0 / t`` in torch is ``t.reciprocal()``, not correctly rounded)
    s_enc = torch.clamp(torch.tensor(448.0 * 6.0) / amax, max=FLT_MAX) if amax > 0 else one
    s_enc = one if s_enc == 0 else s_enc
    s_dec = one / s_enc
    blocks = x32.abs().reshape(r, k // 16, 16).amax(-1)                                 # [R, K/16]
    if tile_rows > 1:
        tiles = blocks.reshape(r // tile_rows, tile_rows, k // 16).amax(1)
        blocks = tiles.repeat_interleave(tile_rows, 0)
    scale = torch.clamp(blocks * (s_enc * torch.tensor(1.0 / 6.0, dtype=torch.float32)), max=448.0)
    scale = scale.to(torch.float8_e4m3fn)
    inv = torch.clamp(torch.ones_like(blocks) / (scale.float() * s_dec), max=FLT_MAX)
    v = torch.clamp(x32 * inv.repeat_interleave(16, 1), -6.0, 6.0)
    q = cast_to_fp4(v)
    codes = (q[:, 0::2] + q[:, 1::2] * 16).to(torch.uint8)
    return codes, scale, s_dec.float().reshape(())


def columnwise(t: torch.Tensor, *, rht: bool) -> tuple:
    """The columnwise copy of t [M, C] (M a multiple of 16): t^T quantized along M, after the RHT."""
    tt = t.t().contiguous()
    if rht:
        tt = (tt.float().reshape(-1, 16) @ rht_matrix()).reshape(tt.shape).to(t.dtype)
    return quantize(tt)


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % 16
    return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t


def operands(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, *, weight_2d: bool, rht: bool) -> dict:
    """The six round-to-nearest operands of one step (TE's recipe with stochastic rounding off)."""
    xp, dyp = pad_tokens(x), pad_tokens(dy)
    w_row = quantize(w, tile_rows=16 if weight_2d else 1)
    return {"x_row": quantize(x), "w_row": w_row, "x_col": columnwise(xp, rht=rht),
            "dy_row": quantize(dy), "dy_col": columnwise(dyp, rht=rht),
            "w_col": w_row if weight_2d else quantize(w.t().contiguous())}


def dequantize(q: tuple) -> torch.Tensor:
    """fp64 values of an operand (exact)."""
    codes, scale, s_dec = q
    table = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
    c = codes.long()
    v = torch.stack([table[c & 15], table[c >> 4]], -1).reshape(codes.shape[0], -1)
    return v * scale.double().repeat_interleave(16, 1) * s_dec.double()
