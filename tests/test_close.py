"""The assertion helpers themselves: they pass what is close and fail, with a useful message, on what is not."""
import math

import pytest
import torch

from .close import assert_close, assert_equal, assert_rel_rms, rel_rms_error


def _want():
    return torch.randn(40, 48, generator=torch.Generator().manual_seed(0))


def test_equal_values_pass():
    w = _want()
    assert_close(w.clone(), w)
    assert_rel_rms(w.clone(), w, 0.0)
    assert_equal(w.clone(), w)
    assert_close(torch.tensor([math.inf, -math.inf]), torch.tensor([math.inf, -math.inf]))
    assert_equal(torch.tensor([-0.0]), torch.tensor([0.0]))
    assert_close(torch.empty(0, 3), torch.empty(0, 3))


def test_nan_in_actual_fails():
    w = _want()
    got = w.clone()
    got[3, 7] = math.nan
    with pytest.raises(AssertionError, match=r"(?s)1 of 1920 elements.*1 NaN/inf in actual.*\(3, 7\): actual=nan"):
        assert_close(got, w, atol=1e30)                     # no tolerance excuses a NaN
    with pytest.raises(AssertionError, match=r"(?s)NaN/inf.*\(3, 7\)"):
        assert_rel_rms(got, w, 1e30)
    with pytest.raises(AssertionError, match=r"(?s)1 of 1920 elements differ.*\(3, 7\)"):
        assert_equal(got, w)


def test_a_never_written_tile_fails_with_count_and_indices():
    """An output whose first 16x16 tile kept the NaN poison of its allocation."""
    w = _want()
    got = w.clone()
    got[:16, :16] = math.nan
    with pytest.raises(AssertionError) as e:
        assert_close(got, w, atol=1e-3, what="gemm")
    msg = str(e.value)
    assert msg.startswith("gemm: 256 of 1920 elements") and "256 NaN/inf in actual where expected is finite" in msg
    assert "(0, 0): actual=nan" in msg and "(0, 1): actual=nan" in msg


def test_nan_positions_match_only_when_asked():
    w = _want()
    w[0, 0] = math.nan
    with pytest.raises(AssertionError, match="1 of"):
        assert_close(w.clone(), w)
    assert_close(w.clone(), w, equal_nan=True)
    assert_equal(w.clone(), w, equal_nan=True)
    finite = w.clone()
    finite[0, 0] = 1.0
    with pytest.raises(AssertionError, match=r"(?s)\(0, 0\): actual=1 expected=nan"):
        assert_close(finite, w, atol=1e30, equal_nan=True)   # a number where NaN was expected


def test_tolerances_and_message():
    w = _want()
    got = w + 1e-3
    assert_close(got, w, atol=1.01e-3)
    assert_close(w * (1 + 1e-6), w, rtol=1.1e-6)
    bound = torch.full_like(w, 1.01e-3)
    bound[5, 5] = 1e-4                                       # an elementwise bound, one element tighter
    with pytest.raises(AssertionError, match=r"(?s)1 of 1920 .*atol elementwise.*\(5, 5\).*allowed=0.0001"):
        assert_close(got, w, atol=bound)
    with pytest.raises(AssertionError, match=r"(?s)max finite \|diff\| 0.001"):
        assert_close(got, w, atol=1e-4, rtol=1e-6)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(w[:, :4], w[:, :5])


def test_rel_rms():
    w = _want()
    noisy = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    err = rel_rms_error(noisy, w)
    assert 0.005 < err < 0.02
    assert_rel_rms(noisy, w, 0.02)
    with pytest.raises(AssertionError, match=r"(?s)relative RMS error 0.01\d* > 0.005.*largest errors"):
        assert_rel_rms(noisy, w, 0.005)
    assert rel_rms_error(torch.zeros(3), torch.zeros(3)) == 0
    assert rel_rms_error(torch.ones(3), torch.zeros(3)) == math.inf


def test_equal_checks_dtype_and_lists_mismatches():
    a = torch.arange(10, dtype=torch.int32)
    with pytest.raises(AssertionError, match="dtype"):
        assert_equal(a, a.long())
    assert_equal(a, a.long(), check_dtype=False)
    b = a.clone()
    b[[2, 8]] = -1
    with pytest.raises(AssertionError, match=r"(?s)2 of 10 elements differ.*\(2,\): actual=-1 expected=2.*\(8,\)"):
        assert_equal(b, a)
    codes = torch.tensor([0x7E, 0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert_equal(codes, codes.clone(), equal_nan=True)       # float8 compares through float64
