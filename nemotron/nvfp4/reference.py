"""NVFP4 reference: plain torch, fp32 arithmetic in a fixed order. This file defines correct.

Quantization (Transformer Engine's NVFP4 recipe; see ../shared/notes/nvfp4_and_gemm.md §1):

    amax     = max |x| over the finite elements of the tensor        (fp32)
    S_enc    = min(2688 / amax, FLT_MAX); S_enc = 1 if amax == 0 or S_enc == 0
    S_dec    = 1 / S_enc                                              (stored as ``global_scale``)
    (a caller-given ``global_scale`` is S_dec, and then S_enc = 1 / S_dec)
    per block of 16 (1x16) or tile of 16x16:
    scale    = e4m3_rne_satfinite(block_amax * (S_enc * fp32(1/6)))
    inv      = min(1 / (fp32(scale) * S_dec), FLT_MAX)                (exact division)
    code     = e2m1_rne_satfinite(x * inv), sign bit = sign bit of x (so -0.1 -> -0)

Every division is IEEE round-to-nearest, every product a single fp32 rounding, so the Triton kernels
reproduce these bytes exactly.

Non-finite inputs (the tensor amax ignores them, so one bad value cannot wreck the other blocks):
  * +-inf saturates: its block's scale is 448 (the E4M3 max) and the element's code is +-6, so it
    dequantizes to +-6 * 448 * S_dec, the largest magnitude the tensor can hold.
  * NaN poisons its own block: the block scale is E4M3 NaN (0x7F) and the block's codes are 0, so all
    16 elements (or the 16x16 tile) dequantize to NaN. Other blocks are unaffected.
For finite inputs the bytes equal Transformer Engine's round-to-nearest quantizer.

Stochastic rounding: |x * inv| (saturated at 6) between grid points lo < hi rounds up with
probability (v - lo) / (hi - lo): ``q = floor((v + u * step) / step) * step`` with the grid step of
the binade (0.5 below 2, 1 below 4, else 2) and u = :func:`sr_uniform` ``(seed, element_index)``, the
element's index in the row-major ``[..., K]`` tensor. ``sr_uniform`` is a counter-based hash, cheap on
every device (the Triton kernels compute it with uint32 arithmetic), defined with all arithmetic
mod 2^32:

    mix(v, k) = v ^= v >> 16;  v *= 0x21F0AAAD;  v ^= k;  v ^= v >> 15;  v *= 0x735A2D97;  v ^= v >> 15
    seed as 64 bits (two's complement): s_lo, s_hi = its low and high words
    k0 = mix(s_lo, s_hi);  k1 = mix(k0 ^ 0x9E3779B9, s_hi)
    idx (>= 0, below 2^63): lo, hi = its low and high words
    h  = mix(lo ^ (hi * 0x61C88647) ^ k0, k1)
    u  = (h >> 8) * 2^-24                                             (the top 24 bits; exact in fp32)

``mix`` is a two-multiply avalanche hash of the lowbias32 family (xorshifts 16, 15, 15 around odd
multipliers), a bijection of 32-bit words for each k. The key k0 enters with the index; k1, xored in
between the multiplies, keeps two seeds' streams from being copies of one another at indices xored
by k0 ^ k0'. 0x9E3779B9 and 0x61C88647 = 2^32 - 0x9E3779B9 are the golden-ratio words. The
multipliers are below 2^31, so a 32-bit value times one is below 2^63: in torch its low 32 bits are
exact in int64, without overflow.

Random Hadamard transform: each consecutive 16-element block of the last dim is multiplied by
``diag(s) @ H16 / 4`` (H16 the Sylvester Hadamard matrix, s Transformer Engine's fixed sign vector),
computed as a radix-2 butterfly in fp32 in the order of :func:`_butterfly`. The matrix is orthonormal,
so the inverse is its transpose, ``H16 @ diag(s) / 4``: butterfly first, signs last.
"""
from __future__ import annotations

import math

import torch

FLT_MAX = torch.finfo(torch.float32).max
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_NAN_CODE = 0x7F
BLOCK = 16
# The 16 E2M1 values by 4-bit code: bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Transformer Engine's RHT sign vector (transformer_engine/pytorch/tensor/nvfp4_tensor.py,
# get_wgrad_sign_vector); bit i of the mask is set where s_i = -1.
HADAMARD_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
HADAMARD_SIGN_MASK = 0xD7E8

_ONE_SIXTH = torch.tensor(1.0 / 6.0, dtype=torch.float32)  # fp32(1/6), as the kernels use it


def hadamard_matrix(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 16x16 transform ``diag(s) @ H16 / 4`` that right-multiplies each 16-element block."""
    h = torch.ones(1, 1, dtype=dtype)
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = torch.tensor(HADAMARD_SIGNS, dtype=dtype)
    return s[:, None] * h / 4


def _butterfly(v: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester-Hadamard transform of the last dim (a power of two), fp32.

    Splits the last dim into even/odd elements, y = interleave(H(e + o), H(e - o)); the Triton
    kernels perform the same additions in the same order.
    """
    n = v.shape[-1]
    if n == 1:
        return v
    e, o = v[..., 0::2], v[..., 1::2]
    return torch.stack([_butterfly(e + o), _butterfly(e - o)], dim=-1).reshape(v.shape)


def hadamard_reference(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """RHT of each 16-block of the last dim, fp32 math, rounded to ``x.dtype``."""
    v = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    s = torch.tensor(HADAMARD_SIGNS, dtype=torch.float32, device=x.device)
    if inverse:
        v = _butterfly(v) * 0.25 * s
    else:
        v = _butterfly(v * s) * 0.25
    return v.reshape(x.shape).to(x.dtype)


def _amax(a: torch.Tensor) -> torch.Tensor:
    """``a.amax()`` as a 0-dim tensor, 0 for an empty tensor (an empty batch is valid input)."""
    return a.amax() if a.numel() else a.new_zeros(())


def global_amax_reference(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements, fp32 0-dim (0 when there are none)."""
    a = x.float().abs()
    return _amax(torch.where(torch.isfinite(a), a, torch.zeros_like(a)))


def global_scales(amax: torch.Tensor | None, global_scale: torch.Tensor | None):
    """(S_enc, S_dec) as fp32 0-dim tensors, from a tensor amax or a caller-given decode scale."""
    if global_scale is not None:
        s_dec = global_scale.float().reshape(()).clone()
        return torch.ones_like(s_dec) / s_dec, s_dec
    amax = amax.float().reshape(())
    s_enc = torch.clamp(torch.full_like(amax, 2688.0) / amax, max=FLT_MAX)
    s_enc = torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)
    return s_enc, torch.ones_like(s_enc) / s_enc


def e4m3_encode(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even, saturating E4M3 of v >= 0 (inf -> 448, NaN -> NaN); uint8 codes."""
    return v.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def e2m1_magnitude_nearest(y: torch.Tensor) -> torch.Tensor:
    """3-bit E2M1 magnitude code of y >= 0, round-to-nearest-even, saturating (ties listed)."""
    return ((y > 0.25).int() + (y >= 0.75).int() + (y > 1.25).int() + (y >= 1.75).int()
            + (y > 2.5).int() + (y >= 3.5).int() + (y > 5.0).int())


def e2m1_magnitude_stochastic(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """3-bit E2M1 magnitude code of y >= 0, rounded up with probability (y - lo) / (hi - lo)."""
    y = torch.clamp(y, max=E2M1_MAX)
    step = torch.where(y < 2.0, 0.5, torch.where(y < 4.0, 1.0, 2.0))
    q = torch.floor((y + u * step) * (1.0 / step)) * step
    q = torch.clamp(q, max=E2M1_MAX)
    return ((q >= 0.5).int() + (q >= 1.0).int() + (q >= 1.5).int() + (q >= 2.0).int()
            + (q >= 3.0).int() + (q >= 4.0).int() + (q >= 6.0).int())


_M32 = 0xFFFFFFFF
SR_MUL1, SR_MUL2 = 0x21F0AAAD, 0x735A2D97     # mix's multipliers (each < 2**31)
SR_HI_MUL = 0x61C88647                        # folds an index's high word in (< 2**31)
SR_KEY_SALT = 0x9E3779B9                      # k1 = mix(k0 ^ salt, s_hi)


def _mix32(v, k):
    """``mix(v, k)`` of the module docstring for v, k in [0, 2**32): Python ints or int64 tensors.

    Each product is of a value below 2**32 and a multiplier below 2**31, so it is exact in int64."""
    v = v ^ (v >> 16)
    v = (v * SR_MUL1) & _M32
    v = v ^ k
    v = v ^ (v >> 15)
    v = (v * SR_MUL2) & _M32
    return v ^ (v >> 15)


def sr_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys ``(k0, k1)`` of :func:`sr_uniform` for ``seed`` (taken as 64 bits)."""
    s_lo, s_hi = seed & _M32, (seed >> 32) & _M32
    k0 = _mix32(s_lo, s_hi)
    return k0, _mix32(k0 ^ SR_KEY_SALT, s_hi)


def sr_uniform(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """The stochastic-rounding uniform u in [0, 1) (24 bits, fp32) of each element index ``idx``.

    ``idx``: an int64 tensor of indices in [0, 2**63). Defined in the module docstring; the Triton
    kernels' ``_sr_uniform(seed, idx)`` returns the same bits.
    """
    if idx.dtype != torch.int64:
        raise TypeError(f"idx: expected an int64 tensor, got {idx.dtype}")
    k0, k1 = sr_keys(int(seed))
    lo, hi = idx & _M32, idx >> 32
    h = _mix32(lo ^ ((hi * SR_HI_MUL) & _M32) ^ k0, k1)
    return (h >> 8).float() * (2.0 ** -24)


def _as_tiles(x: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """View x [..., R, K] as [L, R, K] (1x16: [1, numel / K, K])."""
    k = x.shape[-1]
    if tile_rows == 1:
        return x.reshape(1, x.numel() // k, k)
    return x.reshape(math.prod(x.shape[:-2]), x.shape[-2], k)


def _block_reduce(t: torch.Tensor, tile_rows: int, op) -> torch.Tensor:
    """Reduce [L, R, K] over blocks of tile_rows x 16 with ``op`` (amax/amin of a bool/float); -> [L, R, K/16]."""
    l, r, k = t.shape
    rp = -(-r // tile_rows) * tile_rows
    if rp != r:
        t = torch.cat([t, torch.zeros(l, rp - r, k, dtype=t.dtype, device=t.device)], 1)
    red = op(op(t.reshape(l, rp // tile_rows, tile_rows, k // BLOCK, BLOCK), dim=4), dim=2)
    return red.repeat_interleave(tile_rows, dim=1)[:, :r]


def quantize_reference(x: torch.Tensor, *, tile_rows: int = 1, global_scale: torch.Tensor | None = None,
                       stochastic: bool = False, seed: int = 0, hadamard: bool = False):
    """Quantize x [..., K] (K % 16 == 0) to NVFP4.

    Returns ``(codes uint8 [..., K/2], block_scales float8_e4m3fn [..., K/16], global_scale fp32 [])``.
    ``tile_rows`` 16 takes one scale per 16x16 tile of the last two dims, replicated per row.
    """
    if hadamard:
        x = hadamard_reference(x)
    shape, k = x.shape, x.shape[-1]
    s_enc, s_dec = global_scales(global_amax_reference(x) if global_scale is None else None, global_scale)
    xt = _as_tiles(x.float(), tile_rows)                                   # [L, R, K]
    a = xt.abs()
    nan = torch.isnan(xt)
    bamax = _block_reduce(torch.where(nan, torch.zeros_like(a), a), tile_rows, torch.amax)
    bnan = _block_reduce(nan.float(), tile_rows, torch.amax) > 0           # [L, R, K/16]
    scale = e4m3_encode(bamax * (s_enc * _ONE_SIXTH.to(x.device)))
    scale = torch.where(bnan, torch.full_like(scale, E4M3_NAN_CODE), scale)
    scale_f = scale.view(torch.float8_e4m3fn).float()
    inv = torch.clamp(torch.ones_like(scale_f) / (scale_f * s_dec), max=FLT_MAX)
    y = xt * inv.repeat_interleave(BLOCK, dim=-1)
    if stochastic:
        idx = torch.arange(xt.numel(), dtype=torch.int64, device=x.device).reshape(xt.shape)
        mag = e2m1_magnitude_stochastic(y.abs(), sr_uniform(seed, idx))
    else:
        mag = e2m1_magnitude_nearest(y.abs())
    code = mag + 8 * torch.signbit(xt).int()
    code = torch.where(bnan.repeat_interleave(BLOCK, dim=-1), torch.zeros_like(code), code)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return (packed.reshape(*shape[:-1], k // 2),
            scale.view(torch.float8_e4m3fn).reshape(*shape[:-1], k // BLOCK),
            s_dec)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of 4-bit codes (any integer dtype)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def dequantize_reference(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x = e2m1(code) * (fp32(block_scale) * global_scale), rounded once to ``dtype``."""
    c = codes.to(torch.int32)
    v = torch.stack([e2m1_decode(c & 0xF), e2m1_decode(c >> 4)], dim=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    s = block_scales.float() * global_scale.float().reshape(())
    return (v * s.repeat_interleave(BLOCK, dim=-1)).to(dtype)


def qdq_error(x: torch.Tensor, xq: torch.Tensor) -> float:
    """Relative RMS error ||x - xq|| / ||x|| over finite elements, in fp64."""
    x64, q64 = x.double(), xq.double()
    m = torch.isfinite(x64)
    den = x64[m].norm().item()
    return (x64[m] - q64[m]).norm().item() / den if den > 0 else math.nan


def linear_reference(x: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, *, act_quant: bool = False,
                     input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequantize(w)[N, K].T (+ bias)`` in fp32, returned in x's dtype.

    ``act_quant``: x is first quantized to NVFP4 (1x16; ``input_scale`` as its static global scale,
    else its own amax) and dequantized: W4A4, the numerics of a native NVFP4 GEMM.
    """
    k = x.shape[-1]
    if act_quant:
        x32 = dequantize_reference(*quantize_reference(x, global_scale=input_scale))
    else:
        x32 = x.float()
    out = x32.reshape(-1, k) @ dequantize_reference(codes, block_scales, global_scale).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


def norm_reference(x: torch.Tensor, weight: torch.Tensor, *, z: torch.Tensor | None = None, group_size: int,
                   eps: float) -> torch.Tensor:
    """The (gated) RMSNorm in front of a linear, fp32 math, result in x's dtype: plain (``z`` None) is
    ``w * x * rsqrt(mean(x^2) + eps)``; gated normalizes ``x * silu(z)`` within ``group_size`` groups."""
    k = x.shape[-1]
    v = x.float() if z is None else x.float() * torch.nn.functional.silu(z.float())
    g = v.reshape(*x.shape[:-1], k // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * g.reshape(x.shape)).to(x.dtype)


def gemm_tolerance(x32: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None, want: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |kernel - reference| for ``x @ w.T (+ bias)`` rounded to ``want.dtype``.

    Both sum K exact fp32 products (NVFP4 values and bf16/fp16 inputs are exact in the MMA dtype and
    their products exact in fp32) in different orders, then scale, add the bias and round once:
    ``2 * gamma_{K+3} * (|x| @ |w|.T + |b|) + 1 ulp`` with gamma_n = n * 2^-24.
    """
    gamma = (x32.shape[-1] + 3) * 2.0 ** -24
    s = x32.abs().double() @ w32.abs().double().T
    if bias is not None:
        s = s + bias.abs().double()
    fi = torch.finfo(want.dtype)
    return 2 * gamma * s + fi.eps * want.double().abs() + fi.tiny


FP8_MAX = 448.0


def fp8_scale(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 decode scale ``amax(|t|) / 448`` (fp32, floored at the smallest normal; an empty t
    has amax 0), on t's device."""
    return (_amax(t.float().abs()) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_quantize_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3: ``rn_satfinite(x / scale)`` as float8_e4m3fn (scale is the decode scale)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 per-tensor FP8 (ModelOpt FP8): x quantized with ``input_scale`` (dynamic amax/448 when
    None), ``(xq * s_x) @ (w * s_w).T (+ bias)`` in fp32, returned in x's dtype."""
    k = x.shape[-1]
    if input_scale is None:
        input_scale = fp8_scale(x)
    xq = fp8_quantize_reference(x, input_scale).float() * input_scale.float()
    out = xq.reshape(-1, k) @ (weight.float() * weight_scale.float()).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
