"""The fused rowwise + columnwise NVFP4 quantize kernel against two reference quantizes, byte for byte."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from nemotron import dispatch
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import row_col

from ..close import assert_equal
from ..strategies import dtypes, seeds

NAMES = ("row_codes", "row_scales", "row_gs", "col_codes", "col_scales", "col_gs")
EDGES = ("none", "zero_tile", "all_zero", "inf", "nan", "large", "small")
# 16 x 1..9 rows and columns: 1 to 3 tiles of 64 each way, ragged at the far edge
blocks16 = st.integers(1, 9).map(lambda b: 16 * b)


def _input(m, k, dtype, edge, seed):
    """x [M, K] with magnitudes over many binades and the edge value ``edge``, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(8 * (2 * torch.rand(m, k, generator=g) - 1))
    i, j = torch.randint(m, (2,), generator=g), torch.randint(k, (2,), generator=g)
    if edge == "zero_tile":                  # zero blocks in both copies (a 16x16 tile is a block of each)
        x[16 * (i[0] // 16):16 * (i[0] // 16) + 16, 16 * (j[0] // 16):16 * (j[0] // 16) + 16] = 0
    elif edge == "all_zero":                 # amax 0: both global scales fall back to 1
        x.zero_()
    elif edge == "inf":
        x[i[0], j[0]], x[i[1], j[1]] = float("inf"), -float("inf")
    elif edge == "nan":
        x[i[0], j[0]] = float("nan")
    elif edge == "large":                    # near the dtype's max: the RHT's sums overflow to inf
        x = x / x.abs().max() * torch.finfo(dtype).max
    elif edge == "small":                    # subnormal inputs and E4M3-subnormal block scales
        x = x / x.abs().max() * torch.finfo(dtype).tiny * 8
    return x.to(dtype)


def _reference(x, hadamard_col, stochastic, seed_row, seed_col):
    row = ref.quantize_reference(x, stochastic=stochastic, seed=seed_row)
    col = ref.quantize_reference(x.t().contiguous(), hadamard=hadamard_col, stochastic=stochastic, seed=seed_col)
    return row + col


@settings(max_examples=40)              # ~0.1 s an example interpreted: 7 edges x 3 dtypes x RHT x SR
@given(m=blocks16, k=blocks16, dtype=dtypes, edge=st.sampled_from(EDGES), hadamard_col=st.booleans(),
       stochastic=st.booleans(), seed=seeds, seed_row=seeds, seed_col=seeds)
@example(m=144, k=80, dtype=torch.bfloat16, edge="nan", hadamard_col=True, stochastic=True, seed=0, seed_row=1,
         seed_col=2)                         # 3 x 2 tiles, ragged both ways: the backward's dy (RHT, SR)
@example(m=80, k=48, dtype=torch.float16, edge="large", hadamard_col=True, stochastic=False, seed=1, seed_row=0,
         seed_col=0)
@example(m=16, k=16, dtype=torch.float32, edge="all_zero", hadamard_col=True, stochastic=True, seed=2, seed_row=3,
         seed_col=3)
@example(m=32, k=64, dtype=torch.float32, edge="none", hadamard_col=False, stochastic=True, seed=3,
         seed_row=2**31 + 7, seed_col=2**62 + 2**40 + 5)   # 64-bit seeds
def test_row_col_matches_reference(kernel_device, m, k, dtype, edge, hadamard_col, stochastic, seed, seed_row,
                                   seed_col):
    x = _input(m, k, dtype, edge, seed)
    want = _reference(x, hadamard_col, stochastic, seed_row, seed_col)
    with dispatch.use("triton"):
        got = row_col.quantize_row_col(x.to(kernel_device), hadamard_col=hadamard_col, stochastic=stochastic,
                                       seed_row=seed_row, seed_col=seed_col)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.dtype, w.shape)
        assert_equal(g.reshape(-1).view(torch.uint8).cpu(), w.reshape(-1).view(torch.uint8), what=f"{name} (bytes)")


def test_row_col_seeds_are_independent(kernel_device):
    """SR draws one stream per copy: the columnwise codes follow seed_col, not seed_row."""
    x = _input(32, 32, torch.float32, "none", 0).to(kernel_device)
    with dispatch.use("triton"):
        a = row_col.quantize_row_col(x, hadamard_col=False, stochastic=True, seed_row=1, seed_col=2)
        b = row_col.quantize_row_col(x, hadamard_col=False, stochastic=True, seed_row=1, seed_col=3)
    assert_equal(a[0], b[0], what="row codes (same seed_row)")
    assert not torch.equal(a[3], b[3]), "col codes ignore seed_col"


_X = torch.zeros(32, 48)
BAD = [
    (dict(x=_X.numpy()), TypeError, "x: expected a torch.Tensor"),
    (dict(x=_X.double()), TypeError, "x: expected dtype"),
    (dict(x=_X.int()), TypeError, "x: expected dtype"),
    (dict(x=_X[0]), ValueError, "x: expected a 2-D tensor"),
    (dict(x=_X[None]), ValueError, "x: expected a 2-D tensor"),
    (dict(x=torch.zeros(0, 48)), ValueError, "positive multiples of 16"),
    (dict(x=torch.zeros(24, 48)), ValueError, "positive multiples of 16"),
    (dict(x=torch.zeros(32, 40)), ValueError, "positive multiples of 16"),
    (dict(x=torch.zeros(48, 32).t()), ValueError, "x: expected a contiguous tensor"),
    (dict(hadamard_col=1), TypeError, "hadamard_col: expected a bool"),
    (dict(stochastic=None), TypeError, "stochastic: expected a bool"),
    (dict(seed_row=-1), ValueError, "seed_row: expected an int in"),
    (dict(seed_col=2**63), ValueError, "seed_col: expected an int in"),
    (dict(seed_col=1.0), TypeError, "seed_col: expected an int"),
]


@pytest.mark.parametrize("bad,error,match", BAD, ids=[f"{next(iter(b))}-{i}" for i, (b, _, _) in enumerate(BAD)])
def test_row_col_rejects_bad_input(kernel_device, bad, error, match):
    args = dict(x=_X, hadamard_col=True, stochastic=False, seed_row=0, seed_col=0)
    args.update(bad)
    if isinstance(args["x"], torch.Tensor):
        args["x"] = args["x"].to(kernel_device)
    with dispatch.use("triton"), pytest.raises(error, match=match):
        row_col.quantize_row_col(args.pop("x"), **args)
