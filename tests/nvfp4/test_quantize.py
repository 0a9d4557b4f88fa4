"""Every NVFP4 implementation against the reference, byte for byte, plus the public API's contract."""
import math

import pytest
import torch
from hypothesis import example, given, strategies as st

import nemotron.nvfp4 as nvfp4
from nemotron import dispatch
from nemotron.nvfp4 import fast
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import quantize as kernels

from ..close import assert_equal
from ..strategies import nvfp4_inputs, seeds


def _public(x, **kw):
    t = nvfp4.quantize(x, block_shape=(kw["tile_rows"], 16), global_scale=kw["global_scale"],
                       rounding="stochastic" if kw["stochastic"] else "nearest", hadamard=kw["hadamard"],
                       generator=torch.Generator().manual_seed(kw["seed"]))
    return t.codes, t.block_scales, t.global_scale


# The implementations compared with the reference: the kernels (CUDA, or the interpreter on CPU),
# the fast plain-torch path and the public op (the dispatch). Stochastic rounding through the public
# API draws its seed from the generator, so the comparison re-derives that seed.
IMPLS = {"triton": kernels.quantize, "torch": fast.quantize, "public": _public}


def _seed_for(impl, seed):
    if impl == "public":
        return int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().manual_seed(seed)).item())
    return seed


def _assert_bytes_equal(name, got, want):
    """Bitwise: the tensors' bytes, flattened (a NaN or a sign of zero must match too)."""
    assert_equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8), what=f"{name} (bytes)")


@pytest.mark.parametrize("impl", list(IMPLS))
@given(inp=nvfp4_inputs(), tile=st.sampled_from([1, 16]), stochastic=st.booleans(), hadamard=st.booleans(),
       explicit_gs=st.booleans(), seed=seeds)
@example(inp=(torch.randn(63, 4096 // 8, dtype=torch.bfloat16), None), tile=16, stochastic=False, hadamard=True,
         explicit_gs=False, seed=0)          # ragged rows, the Nemotron K/8
def test_quantize_matches_reference(impl, kernel_device, inp, tile, stochastic, hadamard, explicit_gs, seed):
    x, _ = inp
    if tile == 16 and x.dim() < 2:
        x = x[None]
    gs = None
    if explicit_gs:  # a static scale that is a bit small, so some elements saturate
        gs = (ref.global_amax_reference(x) / 2000).clamp(min=1e-30)
    args = dict(tile_rows=tile, global_scale=gs, stochastic=stochastic, hadamard=hadamard)
    want = ref.quantize_reference(x, seed=_seed_for(impl, seed), **args)
    if impl == "public" and kernel_device.type == "cuda":
        x, gs = x.cuda(), (gs.cuda() if gs is not None else None)
        args["global_scale"] = gs
    elif impl == "triton":
        x = x.to(kernel_device)
        args["global_scale"] = gs.to(kernel_device) if gs is not None else None
    got = IMPLS[impl](x, seed=seed, **args)
    for name, g, w in zip(("codes", "block_scales", "global_scale"), got, want):
        _assert_bytes_equal(name, g, w)


@given(inp=nvfp4_inputs(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_dequantize_kernel_matches_reference(kernel_device, inp, dtype):
    x, _ = inp
    codes, scales, gs = ref.quantize_reference(x)
    want = ref.dequantize_reference(codes, scales, gs, dtype)
    got = kernels.dequantize(codes.to(kernel_device), scales.to(kernel_device), gs.to(kernel_device), dtype)
    _assert_bytes_equal("dequantized", got.view(torch.uint8), want.view(torch.uint8))


@given(inp=nvfp4_inputs(), inverse=st.booleans())
def test_hadamard_kernel_matches_reference(kernel_device, inp, inverse):
    x, _ = inp
    got = kernels.hadamard(x.to(kernel_device), inverse=inverse)
    _assert_bytes_equal("hadamard", got.view(torch.uint8), ref.hadamard_reference(x, inverse=inverse).view(torch.uint8))


@given(inp=nvfp4_inputs(), hadamard=st.booleans())
def test_amax_kernel_matches_reference(kernel_device, inp, hadamard):
    x, _ = inp
    x[(0,) * x.dim()] = math.nan       # ignored by the amax
    want = ref.global_amax_reference(ref.hadamard_reference(x) if hadamard else x)
    assert kernels.amax(x.to(kernel_device), hadamard=hadamard).item() == want.item()


@given(inp=nvfp4_inputs(min_dim=2), tile=st.sampled_from([1, 16]), seed=seeds)
def test_fused_hadamard_equals_hadamard_then_quantize(kernel_device, inp, tile, seed):
    for impl, x in ((kernels.quantize, inp[0].to(kernel_device)), (ref.quantize_reference, inp[0])):
        fused = impl(x, tile_rows=tile, global_scale=None, stochastic=False, seed=seed, hadamard=True)
        split = impl(nvfp4.hadamard(x), tile_rows=tile, global_scale=None, stochastic=False, seed=seed, hadamard=False)
        for f, s in zip(fused, split):
            _assert_bytes_equal("fused vs split", f, s)


@given(inp=nvfp4_inputs(min_dim=2))
def test_16x16_tiles_share_one_scale(inp):
    x, _ = inp
    t = nvfp4.quantize(x, block_shape=(16, 16))
    s = t.block_scales.view(torch.uint8).reshape(-1, x.shape[-2], x.shape[-1] // 16)
    r = x.shape[-2]
    for start in range(0, r, 16):
        tile = s[:, start:start + 16]
        assert (tile == tile[:, :1]).all()
    # and a tile's scale covers its amax: every element fits in 6 * scale up to E4M3 rounding (2^-4)
    xq = t.dequantize()
    assert torch.isfinite(xq).all()


def test_non_finite_through_every_impl(kernel_device):
    x = torch.randn(20, 48)
    x[2, 7], x[5, 33], x[11, 0] = math.inf, -math.inf, math.nan
    want = ref.quantize_reference(x)
    for tile in (1, 16):
        want = ref.quantize_reference(x, tile_rows=tile)
        got = kernels.quantize(x.to(kernel_device), tile_rows=tile, global_scale=None, stochastic=False, seed=0,
                               hadamard=False)
        for name, g, w in zip(("codes", "block_scales", "global_scale"), got, want):
            _assert_bytes_equal(name, g, w)
    xq = nvfp4.quantize(x).dequantize()
    assert torch.isnan(xq[11, :16]).all() and torch.isfinite(xq[11, 16:]).all()
    assert xq[2, 7] > 0 and xq[5, 33] < 0 and torch.isfinite(xq[2, 7])


def test_empty_rows():
    t = nvfp4.quantize(torch.zeros(0, 32))
    assert t.codes.shape == (0, 16) and t.global_scale.item() == 1.0
    assert t.dequantize().shape == (0, 32)


def test_quantize_error_is_nvfp4_sized():
    """Relative RMS error of round-to-nearest on Gaussian data: NVFP4's ~9-10% (bounded well below 1)."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    err = ref.qdq_error(x, nvfp4.quantize(x).dequantize())
    assert 0.05 < err < 0.15


@pytest.mark.parametrize("fn", [torch.library.opcheck])
def test_opcheck(fn):
    x = torch.randn(8, 32)
    fn(torch.ops.nemotron.nvfp4_quantize.default, (x, None, 1, False, 0, False))
    fn(torch.ops.nemotron.nvfp4_quantize.default, (x, torch.tensor(0.01), 16, True, 3, True))
    c, s, g = ref.quantize_reference(x)
    fn(torch.ops.nemotron.nvfp4_dequantize.default, (c, s.view(torch.uint8), g, torch.bfloat16))
    fn(torch.ops.nemotron.hadamard16.default, (x, False))
    fn(torch.ops.nemotron.nvfp4_amax.default, (x, True))


def test_forcing_selects_the_kernels(kernel_device):
    x = torch.randn(4, 32, device=kernel_device)
    with dispatch.use("triton"):
        assert dispatch.choose("nvfp4_quantize", x, record=False).name == "triton"
    with dispatch.use("reference"):
        assert dispatch.choose("nvfp4_quantize", x, record=False).name == "reference"
    with dispatch.use("torch"):
        assert dispatch.choose("nvfp4_quantize", x, record=False).name == "torch"


@pytest.mark.parametrize("call, match", [
    (lambda: nvfp4.quantize(torch.randn(4, 24)), "multiple of 16"),
    (lambda: nvfp4.quantize(torch.randn(4, 0)), "multiple of 16"),
    (lambda: nvfp4.quantize(torch.randint(0, 4, (4, 32))), "dtype"),
    (lambda: nvfp4.quantize(torch.randn(4, 32, dtype=torch.float64)), "dtype"),
    (lambda: nvfp4.quantize([1.0] * 16), "torch.Tensor"),
    (lambda: nvfp4.quantize(torch.randn(32, 4).T), "layout"),
    (lambda: nvfp4.quantize(torch.randn(4, 64)[:, ::2]), "layout"),
    (lambda: nvfp4.quantize(torch.randn(32), block_shape=(16, 16)), "at least 2 dims"),
    (lambda: nvfp4.quantize(torch.randn(4, 32), block_shape=(1, 32)), "block_shape"),
    (lambda: nvfp4.quantize(torch.randn(4, 32), rounding="up"), "rounding"),
    (lambda: nvfp4.quantize(torch.randn(4, 32), global_scale=-1.0), "global_scale"),
    (lambda: nvfp4.quantize(torch.randn(4, 32), global_scale=float("nan")), "global_scale"),
    (lambda: nvfp4.quantize(torch.randn(4, 32), global_scale=torch.ones(2)), "global_scale"),
    (lambda: nvfp4.quantize(torch.randn(4, 32), generator=3), "generator"),
    (lambda: nvfp4.quantize(torch.randn(4, 32, device="meta")), "device"),
    (lambda: nvfp4.hadamard(torch.randn(4, 20)), "multiple of 16"),
    (lambda: nvfp4.dequantize(torch.zeros(4, 16)), "NVFP4Tensor"),
    (lambda: nvfp4.quantize(torch.randn(4, 32)).dequantize(torch.int32), "dtype"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_strided_rows_are_supported(kernel_device):
    """A row-sliced view (row stride > K) needs no copy and gives the same bytes."""
    base = torch.randn(10, 64)
    view = base[:, :32]
    assert not view.is_contiguous()
    want = ref.quantize_reference(view.contiguous())
    got = kernels.quantize(base.to(kernel_device)[:, :32], tile_rows=1, global_scale=None, stochastic=False,
                           seed=0, hadamard=False)
    for name, g, w in zip(("codes", "block_scales", "global_scale"), got, want):
        _assert_bytes_equal(name, g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dispatch_uses_the_kernels_and_matches(dtype):
    x = torch.randn(1000, 4096, dtype=dtype, device="cuda")
    assert dispatch.choose("nvfp4_quantize", x, record=False).name == "triton"
    for kw in (dict(), dict(block_shape=(16, 16)), dict(hadamard=True)):
        t = nvfp4.quantize(x, **kw)
        w = ref.quantize_reference(x.cpu(), tile_rows=kw.get("block_shape", (1, 16))[0],
                                   hadamard=kw.get("hadamard", False))
        for name, g, r in zip(("codes", "block_scales", "global_scale"), (t.codes, t.block_scales, t.global_scale), w):
            _assert_bytes_equal(name, g, r)
        _assert_bytes_equal("dequantized", t.dequantize(dtype), ref.dequantize_reference(*w, dtype))
