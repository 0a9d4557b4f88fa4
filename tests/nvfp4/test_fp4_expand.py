"""The GEMMs' NVFP4 tile expansion (``gemm._fp4_tile``) against the reference dequantization, bit for bit.

Every code byte meets every E4M3 scale byte (signs, subnormals, zero, NaN included). The expanded tile
is ``value * block_scale * TILE_SCALE``; all those values are exact in fp32, bf16 and fp16, so the
plain-Triton path (the interpreter's and fp32 activations') and, on a GPU, the bf16 / fp16 inline-asm
paths must all give the reference's fp32 products times TILE_SCALE, to the bit.
"""
import pytest
import torch
import triton
import triton.language as tl

from nemotron.dispatch import interpreting
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import gemm

from ..close import assert_equal

ROWS, K = 256, 512                 # 256 x 32 blocks of 8 code bytes: every (scale byte, code byte) pair


@triton.jit
def _expand_kernel(codes_ptr, scales_ptr, out_ptr, K, ROWS: tl.constexpr, BK: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, EVEN_K: tl.constexpr):
    i_k = tl.program_id(0)
    o_r = tl.arange(0, ROWS).to(tl.int64)
    b_v = gemm._fp4_tile(codes_ptr, scales_ptr, o_r, o_r < ROWS, i_k * BK, K, ROWS, BK, DOT_DTYPE, EVEN_K)
    o_k = i_k * BK + tl.arange(0, BK)
    tl.store(out_ptr + o_r[:, None] * K + o_k[None, :], b_v.to(tl.float32), mask=(o_k < K)[None, :])  # [ROWS, BK]


def _all_pairs():
    """Codes uint8 [ROWS, K/2], scales uint8 [ROWS, K/16]: block q (row-major) has scale byte q mod 256
    and code bytes 8 * (q // 256) + 0..7, so the 32 blocks of each scale byte hold all 256 code bytes."""
    q = torch.arange(ROWS * K // 16)
    scales = (q % 256).to(torch.uint8).reshape(ROWS, K // 16)
    codes = (8 * (q // 256)[:, None] + torch.arange(8)).to(torch.uint8).reshape(ROWS, K // 2)
    return codes, scales


def _dot_dtypes():
    # the interpreter cannot run inline asm: the launchers use fp32 there, and so does this test
    return [tl.float32] if interpreting() else [tl.float32, tl.bfloat16, tl.float16]


@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("ragged", [False, True])
def test_expansion_is_the_reference_bit_for_bit(kernel_device, bk, ragged):
    codes, scales = _all_pairs()
    k = K - 16 * 5 if ragged else K             # ragged: the last K block only partly inside the matrix
    codes, scales = codes[:, : k // 2].contiguous(), scales[:, : k // 16].contiguous()
    want = ref.dequantize_reference(codes, scales.view(torch.float8_e4m3fn), torch.tensor(1.0)) * gemm.TILE_SCALE
    for dot_dtype in _dot_dtypes():
        out = torch.empty(ROWS, k, dtype=torch.float32, device=kernel_device)
        _expand_kernel[(triton.cdiv(k, bk),)](codes.to(kernel_device), scales.to(kernel_device), out, k, ROWS=ROWS,
                                              BK=bk, DOT_DTYPE=dot_dtype, EVEN_K=k % bk == 0)
        got = out.cpu()
        assert_equal(got, want, equal_nan=True, what=f"expansion {dot_dtype}")
        # the signs of zeros too (code 8 is -0, scale byte 0x80 is -0): the bits, NaN aside
        finite = ~torch.isnan(want)
        assert_equal(got.view(torch.int32)[finite], want.view(torch.int32)[finite], what=f"expansion {dot_dtype} bits")


def _run_ptx(asm: str, word: torch.Tensor, mul: torch.Tensor) -> list[torch.Tensor]:
    """Execute the expansion's PTX text on int64 tensors of 32-bit words (the instructions it uses, as the
    PTX ISA defines them): outputs $0..$7 as 16-bit patterns."""
    mask, regs = 0xFFFFFFFF, {"$8": word, "$9": mul}
    halves = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}

    def val(x):
        return regs[x] if x in regs else torch.tensor(int(x, 0))

    def lanes(r, dt):                      # the two 16-bit lanes of r as fp32 values
        h = torch.stack([r & 0xFFFF, r >> 16]).to(torch.int16)
        return h.view(dt).float()

    def f32(r):                            # a register's bits as fp32
        return (((r + 2 ** 31) % 2 ** 32) - 2 ** 31).to(torch.int32).view(torch.float32)

    def pack(lo, hi, dt):
        return (lo.to(dt).view(torch.int16).long() & 0xFFFF) | ((hi.to(dt).view(torch.int16).long() & 0xFFFF) << 16)

    for line in asm.strip("{}\n").splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        if op.startswith(".reg"):
            continue
        if op == "mov.b32":                # mov.b32 {lo, hi}, t
            lo, hi, src = [a.strip(" {}") for a in rest.split(",")]
            regs[lo], regs[hi] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        d, *a = [x.strip() for x in rest.split(",")]
        kind = op.split(".")[2] if op.startswith(("cvt", "mul.rn")) else None
        if op.startswith("cvt.rn"):        # cvt.rn.{bf16x2,f16x2}.f32 d, hi, lo
            dt = halves[kind]
            regs[d] = pack(f32(val(a[1])), f32(val(a[0])), dt)
        elif op.startswith("mul.rn"):      # each lane's product of exact half values, rounded once
            dt = halves[kind]
            x, y = lanes(val(a[0]), dt), lanes(val(a[1]), dt)
            regs[d] = pack(x[0] * y[0], x[1] * y[1], dt)
        elif op == "prmt.b32":
            pool = val(a[0]) | (val(a[1]) << 32)
            sel, out = int(a[2], 0), 0
            for i in range(4):
                n = (sel >> 4 * i) & 0xF
                byte = (pool >> 8 * (n & 7)) & 0xFF
                byte = torch.where(byte >= 0x80, 0xFF, 0) if n & 8 else byte
                out = out | (byte << 8 * i)
            regs[d] = out
        else:
            x, y = val(a[0]), val(a[1])
            f = {"and.b32": x & y, "or.b32": x | y, "shl.b32": x << y, "shr.b32": x >> y,
                 "mul.lo.u32": x * y}[op]
            regs[d] = f & mask
    return [regs[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_asm_text_is_the_reference(dtype):
    """What only a GPU runs, checked here: the PTX of each expansion, executed as the ISA defines its
    instructions, on every (scale byte, code byte) pair."""
    codes, scales = _all_pairs()
    word = codes.reshape(-1, 4).long()
    word = word[:, 0] | (word[:, 1] << 8) | (word[:, 2] << 16) | (word[:, 3] << 24)             # little-endian
    s = scales.view(torch.float8_e4m3fn).float().repeat_interleave(2, dim=1).reshape(-1)       # per word
    asm, mul = (gemm._FP4_ASM_BF16, 2.0 ** 119) if dtype == torch.bfloat16 else (gemm._FP4_ASM_FP16, 2.0 ** 7)
    out = _run_ptx(asm.value, word, (s * mul).view(torch.int32).long() & 0xFFFFFFFF)
    got = torch.stack(out, dim=1).to(torch.int16).view(dtype).float().reshape(ROWS, K)
    want = ref.dequantize_reference(codes, scales.view(torch.float8_e4m3fn), torch.tensor(1.0)) * gemm.TILE_SCALE
    assert_equal(got, want, equal_nan=True, what=f"{dtype} asm")
    finite = ~torch.isnan(want)
    assert_equal(got.view(torch.int32)[finite], want.view(torch.int32)[finite], what=f"{dtype} asm bits")


def test_the_input_holds_every_pair():
    codes, scales = _all_pairs()
    pairs = scales.repeat_interleave(8, dim=1).long() * 256 + codes.long()
    assert torch.equal(pairs.reshape(-1).unique(), torch.arange(256 * 256))


def test_word_aligned_copies_only_misaligned_codes():
    base = torch.arange(64, dtype=torch.uint8)
    assert gemm.word_aligned(base).data_ptr() == base.data_ptr()
    view = base[1:33]
    fixed = gemm.word_aligned(view)
    assert fixed.data_ptr() % 4 == 0 and torch.equal(fixed, view)
