"""The fast plain-torch quantizer (``nvfp4/fast.py``) against the reference: bytes of codes, block scales
and global scale, over shapes, dtypes, both block shapes, RN / SR, the RHT and hostile values."""
import contextlib
import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import nemotron.nvfp4 as nvfp4
from nemotron import dispatch
from nemotron.nvfp4 import fast
from nemotron.nvfp4 import reference as ref

from ..close import assert_equal
from ..strategies import nvfp4_inputs, seeds

SPECIALS = {"zero": 0.0, "-zero": -0.0, "inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _assert_same(got, want):
    for name, g, w in zip(("codes", "block_scales", "global_scale"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        assert_equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8), what=f"{name} (bytes)")


def _both(x, **kw):
    args = dict(tile_rows=1, global_scale=None, stochastic=False, seed=0, hadamard=False) | kw
    _assert_same(fast.quantize(x, **args), ref.quantize_reference(x, **args))


@st.composite
def hostile(draw):
    """nvfp4_inputs with a few elements set to zeros, infinities, NaNs or the dtype's subnormals."""
    x, _ = draw(nvfp4_inputs())
    flat = x.view(-1)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, flat.numel() - 1))
        kind = draw(st.sampled_from([*SPECIALS, "subnormal", "-subnormal"]))
        flat[i] = SPECIALS.get(kind, tiny * draw(st.sampled_from([2.0 ** -3, 0.5])) * (-1 if kind[0] == "-" else 1))
    return x


@contextlib.contextmanager
def _chunk(n):
    """Small chunks make the second pass loop over many chunks and a ragged last one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "CHUNK", n)
        yield


CHUNKS = pytest.mark.parametrize("chunk", [64, fast.CHUNK], ids=["chunk64", "chunk_default"])


@CHUNKS
@settings(max_examples=40)
@given(x=hostile(), tile=st.sampled_from([1, 16]), stochastic=st.booleans(), hadamard=st.booleans(),
       gs=st.sampled_from([None, "small", "huge"]), seed=seeds)
@example(x=torch.randn(63, 4096 // 8, generator=torch.Generator().manual_seed(0)).bfloat16(), tile=16,
         stochastic=True, hadamard=True, gs=None, seed=0)  # ragged rows, the Nemotron K/8
def test_fast_equals_reference(chunk, x, tile, stochastic, hadamard, gs, seed):
    if tile == 16 and x.dim() < 2:
        x = x[None]
    # "small": elements saturate; "huge": block scales underflow to 0 and inf * inv is inf * 0
    scale = {None: None, "small": (ref.global_amax_reference(x) / 2000).clamp(min=1e-30), "huge": torch.tensor(1e37)}
    with _chunk(chunk):
        _both(x, tile_rows=tile, stochastic=stochastic, hadamard=hadamard, global_scale=scale[gs], seed=seed)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_and_grid_points(dtype, stochastic):
    """Blocks of amax 6 under a tensor amax of 6 quantize with inv = 1, so y = x: every RNE midpoint
    (and its neighbours one ulp away) and every grid point is hit exactly."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mids, grid = mids.to(dtype), grid.to(dtype)
    lo, hi = torch.tensor(0.0, dtype=dtype), torch.tensor(9.0, dtype=dtype)
    vals = torch.cat([mids, mids.nextafter(lo), mids.nextafter(hi), grid])
    vals = torch.cat([vals, -vals])
    x = torch.cat([vals, vals.new_zeros(-vals.numel() % 15)]).view(-1, 15)
    x = torch.cat([x.new_full((x.shape[0], 1), 6.0), x], 1).reshape(-1, 32)
    _, scales, gs = ref.quantize_reference(x)
    inv = 1 / (scales.float() * gs)
    assert (inv == 1).all()                                # so the ties above are ties of y
    for seed in range(3 if stochastic else 1):
        _both(x, stochastic=stochastic, seed=seed)
        _both(x, tile_rows=16, stochastic=stochastic, seed=seed)


def test_non_finite_blocks():
    x = torch.randn(40, 48)
    x[2, 7], x[5, 33], x[11, 0], x[12, 1], x[12, 2] = math.inf, -math.inf, math.nan, math.nan, math.inf
    x[20] = math.inf                                       # a row of inf: those blocks have no finite element
    for kw in (dict(), dict(tile_rows=16), dict(stochastic=True, seed=9), dict(global_scale=torch.tensor(1e37)),
               dict(global_scale=torch.tensor(1e37), stochastic=True, seed=2), dict(hadamard=True)):
        _both(x, **kw)
        _both(x.bfloat16(), **kw)


@pytest.mark.parametrize("shape", [(0, 32), (3, 0, 32), (1, 16), (70, 16)])
def test_small_and_empty(shape):
    x = torch.randn(shape)
    for kw in (dict(), dict(tile_rows=16), dict(stochastic=True, seed=1), dict(hadamard=True)):
        _both(x, **kw)
    _both(torch.zeros(shape))


@CHUNKS
def test_strided_rows(chunk):
    """A row-sliced view (row stride > K) gives the bytes of its contiguous copy."""
    base = torch.randn(50, 96, dtype=torch.bfloat16)
    for kw in (dict(), dict(stochastic=True, seed=3), dict(hadamard=True), dict(tile_rows=16)):
        args = dict(tile_rows=1, global_scale=None, stochastic=False, seed=0, hadamard=False) | kw
        with _chunk(chunk):
            got = fast.quantize(base[:, 16:80], **args)
        _assert_same(got, ref.quantize_reference(base[:, 16:80].contiguous(), **args))


@given(x=hostile())
def test_hadamard_transform_equals_reference(x):
    assert_equal(fast.hadamard_transform(x).view(torch.uint8), ref.hadamard_reference(x).view(torch.uint8),
                 what="RHT (bytes)")


@pytest.mark.parametrize("wraps", [True, False], ids=["int32", "uint32"])
@pytest.mark.parametrize("start", [0, 2**31 - 100, 2**32 - 50, 2**32 + 3, 2**40 + 2**31 - 7])
def test_sr_bits_equal_the_reference_hash(monkeypatch, wraps, start):
    """The int32 hash (and its uint32 fallback) equals reference.sr_uniform, across the 2^31 and 2^32
    index words (a chunk straddling one takes the int64 way)."""
    monkeypatch.setattr(fast, "_int32_mul_wraps", lambda: wraps)
    scratch = fast._Scratch(torch.device("cpu"))
    for seed in (0, 77, 2**33 + 1):
        got = fast._sr_bits(seed, start, torch.empty(300), scratch)
        want = ref.sr_uniform(seed, torch.arange(start, start + 300)) * 2**24
        assert_equal(got, want, what=f"h >> 8 from {start}, seed {seed}")


def test_int32_multiply_wraps_here():
    """The fast hash takes its int32 path on this machine (the fallback is tested above)."""
    fast._int32_mul_wraps.cache_clear()
    assert fast._int32_mul_wraps()


@given(inp=nvfp4_inputs(), stochastic=st.booleans(), seed=seeds)
def test_cpu_dispatch_runs_the_fast_path(inp, stochastic, seed):
    """On CPU the public quantize takes the torch implementation by default, with the reference's bytes."""
    x = inp[0]
    g = torch.Generator().manual_seed(seed)
    with dispatch.trace() as ran:
        t = nvfp4.quantize(x, rounding="stochastic" if stochastic else "nearest", generator=g)
    assert ran == [("nvfp4_quantize", "torch")]
    s = int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().manual_seed(seed)).item())
    _assert_same((t.codes, t.block_scales, t.global_scale), ref.quantize_reference(x, stochastic=stochastic, seed=s))


def test_dequantize_every_code_and_scale_equals_the_reference():
    """All 256 code bytes against all 256 E4M3 scale bytes (NaN included) and hostile global scales."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(256, 8)                       # [256, 2048]
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 256).contiguous().view(torch.float8_e4m3fn)
    for gs in (1.0, 2.0 ** -30, 3.7e-4, 1e30):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.tensor(gs)
            want = ref.dequantize_reference(codes, scales, g, dtype)
            assert_equal(fast.dequantize(codes, scales, g, dtype), want, equal_nan=True, what=f"gs={gs} {dtype}")


@given(x=hostile(), tile=st.sampled_from([1, 16]))
@settings(max_examples=20, deadline=None)
def test_cpu_dequantize_runs_the_fast_path(x, tile):
    t = nvfp4.quantize(x, block_shape=(tile, 16))
    with dispatch.trace() as ran:
        got = t.dequantize(torch.float32)
    assert ("nvfp4_dequantize", "torch") in ran
    assert_equal(got, ref.dequantize_reference(t.codes, t.block_scales, t.global_scale), equal_nan=True)
