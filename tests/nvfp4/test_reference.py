"""The reference itself: known-answer tables and independent oracles for every rounding step."""
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given

from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton.quantize import _sr_uniform

from ..close import assert_close, assert_equal, max_abs
from ..strategies import nvfp4_inputs, seeds

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _nearest_even_oracle(y: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude code by brute force: nearest grid value, ties to the even code, saturating."""
    d = (y.double()[:, None] - GRID[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    tie = d == best
    even = tie & (torch.arange(8)[None, :] % 2 == 0)
    pick = torch.where(even.any(1, keepdim=True), even, tie).int().argmax(1)
    return torch.where(y >= 6, 7, pick)


def test_e2m1_known_answers_at_every_midpoint():
    eps = 1e-6
    table = {0.0: 0, 0.25: 0, 0.25 + eps: 1, 0.75 - eps: 1, 0.75: 2, 1.25: 2, 1.25 + eps: 3, 1.75 - eps: 3,
             1.75: 4, 2.5: 4, 2.5 + eps: 5, 3.5 - eps: 5, 3.5: 6, 5.0: 6, 5.0 + eps: 7, 6.0: 7, 7.0: 7,
             1e30: 7, math.inf: 7}
    y = torch.tensor(list(table), dtype=torch.float32)
    assert ref.e2m1_magnitude_nearest(y).tolist() == list(table.values())


def test_e2m1_nearest_matches_brute_force_oracle():
    y = torch.cat([torch.linspace(0, 8, 20001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    got, want = ref.e2m1_magnitude_nearest(y), _nearest_even_oracle(y)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, first at y={y[bad[:5]].tolist()}"


def test_e4m3_known_answers():
    sub = 2.0 ** -9                               # E4M3 subnormal step
    table = {0.0: 0x00, sub / 2: 0x00, sub / 2 * 1.0001: 0x01, sub * 1.5: 0x02, sub: 0x01,
             2.0 ** -6: 0x08, 1.0: 0x38, 1.0625: 0x38, 1.0625 * 1.0001: 0x39, 1.1875: 0x3A,
             448.0: 0x7E, 463.9: 0x7E, 464.0: 0x7E, 1e6: 0x7E, math.inf: 0x7E, math.nan: 0x7F}
    got = ref.e4m3_encode(torch.tensor(list(table), dtype=torch.float32))
    assert got.tolist() == list(table.values())


def test_e2m1_decode_table():
    codes = torch.arange(16)
    assert ref.e2m1_decode(codes).tolist() == list(ref.E2M1_VALUES)
    assert torch.signbit(ref.e2m1_decode(torch.tensor([8]))).item()     # code 8 is -0


def test_butterfly_equals_the_matrix():
    """The butterfly order is the kernels' contract; the matrix is the definition (fp64 tolerance 1e-12)."""
    x = torch.randn(50, 64, dtype=torch.float64)
    want = (x.view(50, 4, 16) @ ref.hadamard_matrix()).view(50, 64)
    got = ref.hadamard_reference(x.float()).double()
    assert_close(got, want, atol=1e-5 * max_abs(x))              # fp32 math: 2^-20 relative


def test_hadamard_matrix_is_orthonormal_with_stated_inverse():
    h = ref.hadamard_matrix()
    assert_equal(h.abs(), torch.full((16, 16), 0.25, dtype=torch.float64))
    assert_close(h @ h.T, torch.eye(16, dtype=torch.float64), atol=1e-15)       # fp64 sums of 16 exact products
    assert sum(1 << i for i, s in enumerate(ref.HADAMARD_SIGNS) if s < 0) == ref.HADAMARD_SIGN_MASK
    x = torch.randn(8, 32)
    y = ref.hadamard_reference(x)
    tol = 1e-6 * max_abs(x)                       # two fp32 passes of 4 additions each
    assert_close(ref.hadamard_reference(y, inverse=True), x, atol=tol)
    assert_close((y.double().view(8, 2, 16) @ h.T).view(8, 32), x, atol=tol)    # inverse = transpose


def test_known_block():
    """A block holding the whole E2M1 grid: amax 6 -> S_enc 448, scale 448 (0x7E), inv 1, codes = grid."""
    x = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 0], dtype=torch.float32)
    codes, scales, gs = ref.quantize_reference(x)
    assert scales.view(torch.uint8).tolist() == [0x7E]
    assert gs.item() == pytest.approx(6 / 2688, rel=1e-7)
    nib = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 0]
    assert codes.tolist() == [nib[i] | nib[i + 1] << 4 for i in range(0, 16, 2)]   # element 0 low nibble
    assert_equal(ref.dequantize_reference(codes, scales, gs), x * (448 * gs))


@given(nvfp4_inputs())
def test_rne_quantization_error_is_within_half_a_step(inp):
    """Each dequantized element is within half an E2M1 step (x its block scale) of x, saturation aside."""
    x, _ = inp
    codes, scales, gs = ref.quantize_reference(x)
    xq = ref.dequantize_reference(codes, scales, gs).double()
    scale = (scales.double() * gs.double()).repeat_interleave(16, -1)
    y = (x.double() / scale).abs()
    half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0)) * scale
    # saturated elements (beyond 6 * scale) and zero blocks are bounded elsewhere
    bound = torch.where((y > 6) | (scale == 0), math.inf, half_step * (1 + 1e-6))
    assert_close(xq, x, atol=bound, what="RNE error vs half a step")


def test_non_finite_inputs():
    x = torch.randn(2, 32)
    x[0, 3] = math.inf
    x[0, 20] = -math.inf
    x[1, 5] = math.nan
    codes, scales, gs = ref.quantize_reference(x)
    finite = x[torch.isfinite(x)].abs().max()
    assert gs.item() == pytest.approx(finite.item() / 2688, rel=1e-6)    # amax ignores inf/NaN
    s = scales.view(torch.uint8)
    assert s[0, 0].item() == 0x7E and s[0, 1].item() == 0x7E              # inf saturates its block scale
    assert s[1, 0].item() == 0x7F                                          # NaN block
    xq = ref.dequantize_reference(codes, scales, gs)
    assert xq[0, 3].item() == pytest.approx(6 * 448 * gs.item()) and xq[0, 20].item() < 0
    assert torch.isnan(xq[1, :16]).all() and torch.isfinite(xq[1, 16:]).all()
    assert (codes[1, :8] == 0).all()


def test_zero_tensor_and_zero_block():
    codes, scales, gs = ref.quantize_reference(torch.zeros(3, 32))
    assert gs.item() == 1.0 and (codes == 0).all() and (scales.view(torch.uint8) == 0).all()


# indices around the 2^31 / 2^32 words and far beyond, as the kernels form them (int64)
_BIG_IDX = torch.cat([torch.arange(64), 2**31 - 2 + torch.arange(4), 2**32 - 2 + torch.arange(4),
                      torch.tensor([2**40 + 7, 2**62 + 12345, 2**63 - 1])])


@triton.jit
def _sr_kernel(out_ptr, idx_ptr, seed, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    tl.store(out_ptr + o, _sr_uniform(seed, tl.load(idx_ptr + o, mask=m, other=0)), mask=m)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31, 2**32 + 7, 2**63 + 3, -5])
def test_sr_uniform_matches_the_triton_hash(kernel_device, seed):
    """The kernels' ``_sr_uniform`` returns the reference's bits for every seed width Triton passes
    (int32, uint32 and int64 / uint64 arguments) and for indices beyond 2^32."""
    n = _BIG_IDX.numel()
    out = torch.empty(n, device=kernel_device)
    _sr_kernel[(1,)](out, _BIG_IDX.to(kernel_device), seed, n, BLOCK=128)
    # a seed is taken as 64 bits, so 2^63 + 3 is the int64 -2^63 + 3
    assert_equal(out, ref.sr_uniform(seed - 2**64 if seed >= 2**63 else seed, _BIG_IDX))


def test_sr_uniform_known_answers():
    """Pins the definition (new random bits would change what a seed means), and checks mix and the
    key / word folding against Python's exact integers."""
    def mix(v, k):
        v ^= v >> 16
        v = v * ref.SR_MUL1 % 2**32 ^ k
        v ^= v >> 15
        v = v * ref.SR_MUL2 % 2**32
        return v ^ (v >> 15)

    def hash_u(seed, i):
        s_lo, s_hi = seed % 2**32, seed // 2**32 % 2**32
        k0 = mix(s_lo, s_hi)
        k1 = mix(k0 ^ ref.SR_KEY_SALT, s_hi)
        return mix(i % 2**32 ^ (i // 2**32 * ref.SR_HI_MUL % 2**32) ^ k0, k1) >> 8

    for seed, idx, want in ((0, [0, 1, 2, 2**32 + 5], [13862608, 5292647, 16200658, 15658258]),
                            (2**40 + 3, [0, 1, 2**63 - 1], [4763000, 6669898, 9176980])):
        got = ref.sr_uniform(seed, torch.tensor(idx)) * 2**24
        assert got.tolist() == want == [hash_u(seed, i) for i in idx]
    v = torch.tensor([0, 1, 0x12345678, 2**32 - 1])
    assert ref._mix32(v, 0xABCDEF01).tolist() == [mix(int(i), 0xABCDEF01) for i in v]   # int64: no overflow


def test_sr_uniform_is_statistically_sane():
    """2^20 draws: uniform mean / variance, uniform histogram, no neighbour, stride or seed correlation,
    each of the 24 bits fair. Bounds are 5 sigma of the statistic for independent uniforms."""
    n = 1 << 20
    idx = torch.arange(n)
    u = ref.sr_uniform(1234, idx).double()
    assert ((u >= 0) & (u < 1)).all() and torch.equal(u, torch.floor(u * 2**24) / 2**24)
    assert abs(u.mean().item() - 0.5) < 5 / (12 * n) ** 0.5
    assert abs(u.var().item() * 12 - 1) < 5 * 12 / (180 * n) ** 0.5     # sd of a sample variance: 1/sqrt(180 n)
    counts = torch.histc(u.float(), bins=256, min=0, max=1).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 255 + 5 * (2 * 255) ** 0.5                 # chi-square, 255 dof
    corr = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].item()   # noqa: E731
    for lag in (1, 2, 16, 4096):                             # neighbours, a block, a row apart
        assert abs(corr(u[:-lag], u[lag:])) < 5 / n ** 0.5
    for other in (1235, 0, 1234 + 2**32):                    # a seed one apart, zero, a high word apart
        assert abs(corr(u, ref.sr_uniform(other, idx).double())) < 5 / n ** 0.5
    bits = (u * 2**24).long()
    ones = torch.stack([(bits >> b) & 1 for b in range(24)]).double().mean(1)
    assert ((ones - 0.5).abs() < 5 * (0.25 / n) ** 0.5).all(), ones


@given(seeds)
def test_stochastic_rounding_lands_on_a_neighbour(seed):
    y = torch.rand(4096) * 7
    u = ref.sr_uniform(seed, torch.arange(4096))
    q = GRID[ref.e2m1_magnitude_stochastic(y, u)]
    lo = GRID[(GRID[None, :] <= y.clamp(max=6).double()[:, None]).sum(1) - 1]
    hi = GRID[torch.searchsorted(GRID, y.clamp(max=6).double())]
    assert ((q == lo) | (q == hi)).all()


def test_stochastic_rounding_is_unbiased():
    """Mean of N independent SR quantizations -> x: |mean - x| < 5 sigma/sqrt(N) for every element
    inside the block's range (|x| <= 6 * scale; a block amax whose E4M3 scale rounded down saturates)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g) * torch.exp2(4 * torch.rand(4, 64, generator=g) - 2)
    gs = ref.global_amax_reference(x) / 2688
    n = 400
    xs = torch.stack([ref.dequantize_reference(*ref.quantize_reference(x, global_scale=gs, stochastic=True, seed=s))
                      for s in range(n)]).double()
    mean = xs.mean(0)
    _, scales, _ = ref.quantize_reference(x, global_scale=gs)
    scale = (scales.double() * gs.double()).repeat_interleave(16, -1)
    y = x.double().abs() / scale
    in_range = y <= 6
    # sigma of one Bernoulli rounding between grid neighbours lo < y < lo + step, p = (y - lo) / step
    step = torch.where(y < 2, 0.5, torch.where(y < 4, 1.0, 2.0))
    p = (y - torch.floor(y / step) * step) / step
    std = step * scale * (p * (1 - p)).sqrt()
    # + 2^-22 relative: x * inv is one fp32 rounding away from the grid coordinate
    tol = 5 * std / math.sqrt(n) + 2.0 ** -22 * x.double().abs()
    assert_close(mean, x, atol=torch.where(in_range, tol, math.inf), what="mean of SR quantizations")
    assert in_range.float().mean() > 0.9 and xs.std(0)[in_range].mean() > 0   # it does randomize
    rne = ref.dequantize_reference(*ref.quantize_reference(x, global_scale=gs)).double()
    assert (mean - x).abs()[in_range].mean() < 0.25 * (rne - x).abs()[in_range].mean()
