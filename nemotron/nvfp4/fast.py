"""NVFP4 quantize in fast plain torch: the dispatch's ``torch`` implementation of ``nemotron::nvfp4_quantize``.

:func:`quantize` returns the bytes of ``reference.quantize_reference`` (codes, block scales, global
scale) for every option: 1x16 / 16x16 blocks, a given global scale, stochastic rounding, the fused RHT,
zeros, subnormals, inf and NaN. It gets there by other means than the reference, each exact:

* Two passes over x. The first takes each block's max of |x|'s integer bits (they order as the
  values, and a NaN's exceed inf's, so one integer max gives the block amax and whether the block
  holds an inf or a NaN); only blocks holding one are read again for the tensor's finite amax. The
  block scales and their reciprocals are the reference's own expressions on the ``[..., K/16]`` tensor.
* The second pass goes over chunks of ``CHUNK`` elements, in place in scratch buffers that stay in
  the CPU caches: ``y = x * inv`` (fp32, the reference's product), then the E2M1 code from y's bits,
  with integer and float arithmetic only (torch's comparisons are slower). Round-to-nearest-even
  to one mantissa bit, ``(bits + 0x1FFFFF + bit22) >> 22``, is the code plus 252 for |y| >= 1 and at
  most that below 1, where the code is the bits of ``fl(min(|y|, 1) + 2^22)`` minus those of 2^22 (the
  sum's last place is 0.5, so the addition rounds to the grid, ties to even): the max of the two.
  Stochastic rounding forms ``t = |y| + u * step`` with one rounding, as the reference (``u * step``
  is exact), ``step * 2^-24`` built from |y|'s exponent bits; ``floor(t / step) * step >= g`` holds
  for a grid point g exactly when ``t >= g``, so the code is t's bits ``>> 22`` minus 252, with
  [0.5, 0.75) first lifted to 0.75.
* ``reference.sr_uniform`` on int32 words, a logical shift being an arithmetic one and a mask. Its
  products need int32 multiplication mod 2^32, which torch's CPU kernels do (checked once, at first
  use; where they did not, the uint32 view would be multiplied: exact by definition, slower).
* The RHT: the reference's butterfly, one level at a time on the ``[N, 2, 2, 2, 2]`` view (each level
  adds and subtracts the pairs the reference's recursion does), chunked too.
"""
from __future__ import annotations

import functools
import math
import sys

import torch

from . import reference as ref

# Elements per chunk of the second pass: its ~24 bytes of scratch per element stay in the CPU's
# L2/L3 caches, and a chunk is large enough that torch's per-op overhead is small beside the work.
CHUNK = 1 << 18

_ONE_SIXTH = ref._ONE_SIXTH
# (the int dtype of x's bits, the bits of +inf); a non-negative float's bits order as its values
_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
         torch.float16: (torch.int16, 0x7C00)}
_F32_BITS = {v: int(torch.tensor(v, dtype=torch.float32).view(torch.int32)) for v in (0.75, 6.0, 2.0 ** 22)}


def _i32(v: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.lru_cache(maxsize=None)
def _int32_mul_wraps() -> bool:
    """Whether torch's int32 multiply returns the low 32 bits of the product, in the vectorized loop
    and its scalar tail (lengths 64 and 3)."""
    for n in (64, 3):
        a = torch.full((n,), 0x7FFFFFFF, dtype=torch.int32)
        if not bool((a * ref.SR_MUL2 == _i32(0x7FFFFFFF * ref.SR_MUL2)).all()):
            return False
    return True


class _Scratch:
    """Reusable 1-D buffers by name (one set per call), sliced to the chunk at hand."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        b = self.bufs.get(name)
        if b is None or b.numel() < n:
            b = self.bufs[name] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n]

    def arange(self, n: int) -> torch.Tensor:
        b = self.bufs.get("arange")
        if b is None or b.numel() < n:
            b = self.bufs["arange"] = torch.arange(n, dtype=torch.int32, device=self.device)
        return b[:n]


def _mul32(v: torch.Tensor, c: int) -> None:
    """v *= c (mod 2^32) in place, v int32."""
    if _int32_mul_wraps():
        v.mul_(c)
    else:
        v.view(torch.uint32).mul_(c)


def _xorshift(v: torch.Tensor, s: int, t: torch.Tensor) -> None:
    """v ^= v >>> s (a logical shift) in place, v int32; t: scratch of v's size."""
    torch.bitwise_right_shift(v, s, out=t)
    t.bitwise_and_((1 << (32 - s)) - 1)
    v.bitwise_xor_(t)


def _sr_bits(seed: int, start: int, out: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """``reference.sr_uniform(seed, arange(start, start + n)) * 2^24`` (the integers ``h >> 8``) into
    fp32 ``out`` [n]; the caller folds the 2^-24 into its step."""
    n = out.numel()
    if start >> 31 != (start + n - 1) >> 31:
        # the int32 index words would overflow inside this chunk (once per 2^31 elements): int64 instead
        idx = torch.arange(start, start + n, dtype=torch.int64, device=out.device)
        return out.copy_(ref.sr_uniform(seed, idx)).mul_(2.0 ** 24)
    k0, k1 = ref.sr_keys(seed)
    v, t = scratch.get("v", n, torch.int32), scratch.get("t", n, torch.int32)
    torch.add(scratch.arange(n), _i32(start), out=v)                  # the index's low word (no overflow)
    v.bitwise_xor_(_i32(((start >> 32) * ref.SR_HI_MUL) ^ k0))         # its high word and the key
    _xorshift(v, 16, t)
    _mul32(v, ref.SR_MUL1)
    v.bitwise_xor_(_i32(k1))
    _xorshift(v, 15, t)
    _mul32(v, ref.SR_MUL2)
    _xorshift(v, 15, t)
    v.bitwise_right_shift_(8)
    v.bitwise_and_(0xFFFFFF)
    return out.copy_(v)


def _nearest_codes(m: torch.Tensor, scratch: _Scratch) -> None:
    """m: the bits of |y| (int32 [n]); overwritten with the E2M1 magnitude codes of round-to-nearest-even."""
    n = m.numel()
    low = scratch.get("low", n, torch.float32)
    torch.clamp(m.view(torch.float32), max=1.0, out=low)
    low.add_(2.0 ** 22)                                                # rounds to a multiple of 0.5, ties to even
    low = low.view(torch.int32).sub_(_F32_BITS[2.0 ** 22])             # the code for |y| < 1: 0, 1 or 2
    r = scratch.get("t", n, torch.int32)
    torch.bitwise_right_shift(m, 22, out=r)
    r.bitwise_and_(1)
    m.add_(0x1FFFFF - (252 << 22))
    m.add_(r)                                                          # RNE at bit 22, minus 252 << 22
    m.bitwise_right_shift_(22)
    m.clamp_(0, 7)                                                     # the code for |y| >= 1, at most it below
    torch.maximum(m, low, out=m)


def _stochastic_codes(m: torch.Tensor, seed: int, start: int, scratch: _Scratch) -> None:
    """m: the bits of |y| (int32 [n]); overwritten with the E2M1 magnitude codes of stochastic rounding
    with the uniforms of element indices start .. start + n - 1."""
    n = m.numel()
    m.clamp_(max=_F32_BITS[6.0])                                       # min(|y|, 6)
    s = scratch.get("s", n, torch.int32)
    torch.bitwise_and(m, 0x7F800000, out=s)                            # step * 2^-24 = 2^(max(e, 0) - 25)
    s.clamp_(min=127 << 23)
    s.sub_(25 << 23)
    w = _sr_bits(seed, start, scratch.get("w", n, torch.float32), scratch)
    y = m.view(torch.float32)
    torch.addcmul(y, w, s.view(torch.float32), out=y)                  # t = y + u * step (u * step is exact)
    t = scratch.get("t", n, torch.int32)
    torch.add(m, 1 << 22, out=t)
    t.clamp_(max=_F32_BITS[0.75])
    torch.maximum(m, t, out=m)                                         # [0.5, 0.75) -> 0.75, the rest kept
    m.sub_(252 << 22)
    m.bitwise_right_shift_(22)
    m.clamp_(0, 7)


def _pack(c8: torch.Tensor, out: torch.Tensor, scratch: _Scratch) -> None:
    """Two 4-bit codes per byte, element 0 in the low nibble: uint8 c8 [n] -> uint8 out [n/2]."""
    if sys.byteorder != "little":
        torch.bitwise_or(c8[0::2], c8[1::2] << 4, out=out)
        return
    v = c8.view(torch.int16)                                           # c0 | c1 << 8
    p = scratch.get("p", v.numel(), torch.int16)
    torch.bitwise_right_shift(v, 4, out=p)
    p.bitwise_or_(v)                                                   # low byte: c0 | c1 << 4
    out.copy_(p)                                                       # keeps the low byte


def _rows_per_chunk(k: int) -> int:
    return max(1, CHUNK // k)


def _block_amax_bits(x2: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """Per 16-block the max of |x|'s bits, [M, K/16] int16/int32: |x| for finite blocks, inf's bits for
    a block with an inf, more for a block with a NaN."""
    ity = _BITS[x2.dtype][0]
    m, k = x2.shape
    out = torch.empty(m, k // ref.BLOCK, dtype=ity, device=x2.device)
    rows = _rows_per_chunk(k)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        a = scratch.get("a", (r1 - r0) * k, x2.dtype).view(r1 - r0, k // ref.BLOCK, ref.BLOCK)
        torch.abs(x2[r0:r1].view(a.shape), out=a)                      # clears the sign bit (a NaN stays NaN)
        torch.amax(a.view(ity), dim=-1, out=out[r0:r1])
    return out


def _finite_amax(x2: torch.Tensor, bmax: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements (reference.global_amax_reference) from the block maxima; only
    the blocks holding an inf or a NaN are read again."""
    if not bool(nonfinite.any()):
        return bmax.amax()
    good = torch.where(nonfinite, torch.zeros_like(bmax), bmax).amax()
    bad = x2.view(x2.shape[0], -1, ref.BLOCK)[nonfinite].float().abs()
    return torch.maximum(good, torch.where(torch.isfinite(bad), bad, torch.zeros_like(bad)).amax())


def _tile_amax(bmax: torch.Tensor, shape: torch.Size, tile_rows: int) -> torch.Tensor:
    """[M, K/16] block maxima -> the max over each tile_rows x 16 tile of the last two dims, replicated
    per row (a NaN propagates, so a tile with one is NaN)."""
    l, r, nb = math.prod(shape[:-2]), shape[-2], bmax.shape[-1]
    b = bmax.view(l, r, nb)
    rp = -(-r // tile_rows) * tile_rows
    if rp != r:
        b = torch.cat([b, b.new_zeros(l, rp - r, nb)], 1)
    t = b.view(l, rp // tile_rows, tile_rows, nb).amax(2)
    return t.repeat_interleave(tile_rows, dim=1)[:, :r].reshape(-1, nb)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``reference.hadamard_reference(x)`` (the forward RHT of each 16-block of the last dim, in x.dtype)
    byte for byte: the same butterfly additions, one level at a time on the ``[N, 2, 2, 2, 2]`` view
    (level i pairs the elements whose indices differ in bit i)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, k)
    signs = torch.tensor(ref.HADAMARD_SIGNS, dtype=torch.float32, device=x.device)
    scratch = _Scratch(x.device)
    rows = _rows_per_chunk(k)
    for r0 in range(0, x2.shape[0], rows):
        r1 = min(x2.shape[0], r0 + rows)
        n = (r1 - r0) * k
        a = scratch.get("h0", n, torch.float32).view(-1, 2, 2, 2, 2)
        b = scratch.get("h1", n, torch.float32).view(-1, 2, 2, 2, 2)
        torch.mul(x2[r0:r1].view(r1 - r0, k // ref.BLOCK, ref.BLOCK), signs, out=a.view(r1 - r0, -1, ref.BLOCK))
        for dim in (4, 3, 2, 1):
            p, q = a.select(dim, 0), a.select(dim, 1)
            torch.add(p, q, out=b.select(dim, 0))
            torch.sub(p, q, out=b.select(dim, 1))
            a, b = b, a
        a.mul_(0.25)
        o2[r0:r1].view(-1).copy_(a.view(-1))                           # rounded to x.dtype, as the reference
    return out


def quantize(x: torch.Tensor, *, tile_rows: int = 1, global_scale: torch.Tensor | None = None,
             stochastic: bool = False, seed: int = 0, hadamard: bool = False):
    """``reference.quantize_reference`` byte for byte (same arguments, same returns), fast on CPU.

    x ``[..., K]`` fp32/fp16/bf16, K a multiple of 16, the last dim contiguous and the leading dims
    flattening without a copy (what ``nvfp4.quantize`` checks). Returns ``(codes uint8 [..., K/2],
    block_scales float8_e4m3fn [..., K/16], global_scale fp32 [])``.
    """
    if hadamard:
        x = hadamard_transform(x)
    shape, k = x.shape, x.shape[-1]
    nb = k // ref.BLOCK
    codes = torch.empty(*shape[:-1], k // 2, dtype=torch.uint8, device=x.device)
    if x.numel() == 0:
        s_dec = ref.global_scales(x.new_zeros((), dtype=torch.float32), global_scale)[1]
        return codes, torch.empty(*shape[:-1], nb, dtype=torch.float8_e4m3fn, device=x.device), s_dec
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    scratch = _Scratch(x.device)
    bits = _block_amax_bits(x2, scratch)
    bmax = bits.view(x.dtype).float()                                  # NaN for a block with a NaN
    amax = None if global_scale is not None else _finite_amax(x2, bmax, bits >= _BITS[x.dtype][1])
    s_enc, s_dec = ref.global_scales(amax, global_scale)
    if tile_rows > 1:
        bmax = _tile_amax(bmax, shape, tile_rows)
    bnan = torch.isnan(bmax)
    # the block scales and their reciprocals: the reference's expressions on [M, K/16]
    scale = ref.e4m3_encode(bmax * (s_enc * _ONE_SIXTH.to(x.device)))
    scale = torch.where(bnan, torch.full_like(scale, ref.E4M3_NAN_CODE), scale)
    scale_f = scale.view(torch.float8_e4m3fn).float()
    inv = torch.clamp(torch.ones_like(scale_f) / (scale_f * s_dec), max=ref.FLT_MAX)
    inf_times_zero = bool((inv == 0).any())      # a huge global scale: inf * inv is NaN, which codes as 0

    codes2 = codes.view(m, k // 2)
    rows = _rows_per_chunk(k)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        n = (r1 - r0) * k
        xc = x2[r0:r1].view(r1 - r0, nb, ref.BLOCK)
        y = scratch.get("y", n, torch.float32)
        y3 = y.view(xc.shape)
        y3.copy_(xc)
        y3.mul_(inv[r0:r1, :, None])                                   # fp32, as the reference's x * inv
        yb = y.view(torch.int32)
        sign = scratch.get("sign", n, torch.int32)                     # 8 where x's sign bit is set
        if inf_times_zero:
            sign.view(xc.shape).copy_(torch.signbit(xc)).mul_(8)
            y.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        else:                                                          # y's sign is x's (inv > 0, y not NaN)
            torch.bitwise_right_shift(yb, 28, out=sign)
            sign.bitwise_and_(8)
        yb.bitwise_and_(0x7FFFFFFF)                                    # |y|
        if stochastic:
            _stochastic_codes(yb, seed, r0 * k, scratch)
        else:
            _nearest_codes(yb, scratch)
        yb.bitwise_or_(sign)
        _pack(scratch.get("c8", n, torch.uint8).copy_(yb), codes2[r0:r1].view(-1), scratch)
    if bool(bnan.any()):
        codes.view(m, nb, ref.BLOCK // 2)[bnan] = 0                    # a NaN block's codes are 0
    return codes, scale.view(torch.float8_e4m3fn).reshape(*shape[:-1], nb), s_dec


def dequantize(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``reference.dequantize_reference`` bit for bit, without a table lookup.

    An E2M1 code ``s e1 e0 m`` placed at fp16 bits 15 and 11..9 (sign, the exponent's low two bits,
    the mantissa's top bit) is an fp16 of exactly 2^-14 times the code's value, normal and
    subnormal alike (the E2M1 exponent bias is 1, fp16's 15), so ``fp16 * 2^14`` is the value and
    ``value * (fp32(scale) * global_scale)`` is the reference's one rounding.
    """
    c = codes.to(torch.int16)
    lo = ((c & 0x08) << 12) | ((c & 0x07) << 9)
    hi = ((c & 0x80) << 8) | ((c & 0x70) << 5)
    k = 2 * codes.shape[-1]
    v = torch.stack([lo, hi], -1).view(torch.float16).float()
    s = block_scales.float() * global_scale.float().reshape(())
    v = v.view(*codes.shape[:-1], k // 16, 16).mul_(16384.0).mul_(s[..., None])
    return v.view(*codes.shape[:-1], k).to(dtype)


# ---- W4A16 linear ---------------------------------------------------------------------------------

# Weights expanded per chunk of output rows: the chunk's fp32 scratch (4 B/weight, plus the fp16 and
# bf16 copies) stays in the CPU's L2/L3, so the weight is read from memory once, as 0.5625 B/weight.
LINEAR_CHUNK = 1 << 20
# bf16 inputs with more rows than this multiply in bf16 (oneDNN's bf16 GEMM, ~4x the fp32 GEMM once
# the GEMM is compute bound, as for prefill); up to it the expansion dominates and the fp32 GEMM keeps
# the reference's accuracy (decode, small batches).
LINEAR_FP32_ROWS = 64


@functools.lru_cache(maxsize=None)
def _e2m1_quads(device: torch.device) -> torch.Tensor:
    """complex128 [65536], each the 16-byte carrier of four fp32: for each 2-byte word of codes (read
    in memory order, so either byte order), the values of its four E2M1 codes, element 0 (the first
    byte's low nibble) first. One ``index_select`` over it expands four weights at a time."""
    b = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(torch.uint8).view(-1, 2).to(torch.int32)
    nib = torch.stack([b & 0xF, b >> 4], -1).reshape(-1, 4)            # [65536, 4] in element order
    return ref.e2m1_decode(nib).contiguous().view(torch.complex128).reshape(-1).to(device)


@functools.lru_cache(maxsize=None)
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """fp32 [256]: ``float(e4m3)`` of each byte (NaN for 0x7F / 0xFF), torch's own conversion."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def linear(x: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
           bias: torch.Tensor | None = None, *, act_quant: bool = False,
           input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``reference.linear_reference`` (same arguments, same returns), fast on CPU.

    x ``[..., K]`` fp32/fp16/bf16 with K a multiple of 16 and the leading dims flattening without a
    copy; codes uint8 ``[N, K/2]`` and block_scales float8_e4m3fn or uint8 ``[N, K/16]``, both
    contiguous; global_scale fp32 ``[]``; bias ``[N]`` or None. Returns ``[..., N]`` in x's dtype.

    Per chunk of output rows (``LINEAR_CHUNK`` weights, kept in cache) the packed codes expand
    through a lookup of each 2-byte word to four fp32 E2M1 values, times the block scales: with
    ``fp32(block_scale) * global_scale`` that is the reference's dequantized weight bit for bit, and
    an fp32 GEMM gives the reference up to fp32 summation order (``reference.gemm_tolerance``; bit
    for bit when the weight is one chunk); the bias is added and the result rounded once to x's
    dtype. bf16 x with more than ``LINEAR_FP32_ROWS`` rows keeps the global scale out of the weight:
    ``e2m1 * e4m3`` has at most 6 significant bits and lies in [2^-10, 2688], so it is exact in bf16,
    and a bf16 GEMM (fp32 accumulation, oneDNN) returns bf16 sums, one bf16 rounding (at most 2^-8 of
    ``|x| @ |w|.T``) before the fp32 global scale and bias. ``act_quant`` (W4A4) first takes x through
    :func:`quantize` and :func:`dequantize` (the reference's fp32 x, bit for bit), then the fp32 GEMM.
    Nothing is kept between calls.
    """
    if act_quant:
        xq = dequantize(*quantize(x, global_scale=input_scale))
        return linear(xq, codes, block_scales, global_scale, bias).to(x.dtype)
    k, n = x.shape[-1], codes.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    lead = x.shape[:-1]
    dev = x.device
    if m == 0 or n == 0 or k == 0:
        out = x2.new_zeros(m, n, dtype=torch.float32)
    else:
        half = x.dtype == torch.bfloat16 and m > LINEAR_FP32_ROWS
        xm = x2 if half else x2.float()
        gs = global_scale.float().reshape(())
        quads = _e2m1_quads(dev)
        e4m3 = _e4m3_values(dev)
        sbytes = block_scales.view(torch.uint8)
        rows = max(1, LINEAR_CHUNK // k)
        r = min(rows, n)
        # scratch allocated once per call: fresh pages on every chunk would cost more than the work
        idx = torch.empty(r * k // 4, dtype=torch.int32, device=dev)
        sidx = torch.empty(r * k // 16, dtype=torch.int32, device=dev)
        q = torch.empty(r * k // 4, dtype=torch.complex128, device=dev)
        wh = torch.empty(r, k, dtype=torch.bfloat16, device=dev) if half else None
        out = torch.empty(m, n, dtype=torch.bfloat16 if half else torch.float32, device=dev)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            c = r1 - r0
            ic, sc = idx[:c * k // 4], sidx[:c * k // 16]
            ic.copy_(codes[r0:r1].reshape(-1).view(torch.uint16))      # one lookup per 4 elements
            wc = torch.index_select(quads, 0, ic, out=q[:c * k // 4]).view(torch.float32).view(c, k)
            sc.copy_(sbytes[r0:r1].reshape(-1))
            scale = e4m3.index_select(0, sc).view(c, k // 16, 1)
            if half:
                wc.view(c, k // 16, 16).mul_(scale)
                wc = wh[:c].copy_(wc)                                  # exact: 6 significant bits
            else:
                wc.view(c, k // 16, 16).mul_(scale.mul_(gs))           # the reference's weight, bit for bit
            if c == n:
                torch.mm(xm, wc.T, out=out)
            else:
                out[:, r0:r1] = xm @ wc.T
        if half:
            out = out.float().mul_(gs)
    if bias is not None:
        out.add_(bias.float())
    return out.to(x.dtype).reshape(*lead, n)
