"""The tests' one assertion vocabulary: elementwise closeness, relative RMS error, exact equality.

Every check is NaN-safe: NaN or inf in ``actual`` where ``expected`` is finite fails, and so does a
finite value where ``expected`` is NaN; NaN in both places passes only with ``equal_nan=True``. A
failure names what was compared (``what``) and gives the mismatch count, the largest error and the
first mismatching indices with their actual and expected values. Tensors may live on any device;
shapes must match exactly (no broadcasting of ``actual`` against ``expected``).
"""
from __future__ import annotations

import math

import torch

SHOWN = 5       # mismatching elements listed in a failure message


def max_abs(t: torch.Tensor) -> float:
    """``max |t|`` in float64 (0 for an empty tensor): the scale of a tolerance relative to the largest value."""
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def rms(t: torch.Tensor) -> float:
    """``sqrt(mean(t^2))`` in float64 (0 for an empty tensor): the scale of a tolerance relative to a typical value."""
    return t.detach().double().pow(2).mean().sqrt().item() if t.numel() else 0.0


def _pair(actual: torch.Tensor, expected: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("actual", actual), ("expected", expected)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    return actual.detach().cpu(), expected.detach().cpu()


def _index(flat: int, shape: torch.Size) -> tuple:
    out = []
    for n in reversed(shape):
        flat, r = divmod(flat, n)
        out.append(r)
    return tuple(reversed(out))


def _listing(bad: torch.Tensor, a: torch.Tensor, e: torch.Tensor, allowed: torch.Tensor | None = None) -> str:
    """The first SHOWN positions where ``bad`` is True, one per line, with actual/expected (and allowed) values."""
    lines = []
    a, e = a.reshape(-1), e.reshape(-1)
    for i in bad.reshape(-1).nonzero().flatten()[:SHOWN].tolist():
        line = f"  {_index(i, bad.shape)}: actual={a[i].item():.6g} expected={e[i].item():.6g}"
        if allowed is not None:
            line += f" |diff|={(a[i] - e[i]).abs().item():.3g} allowed={allowed.reshape(-1)[i].item():.3g}"
        lines.append(line)
    return "\n".join(lines)


def _not_finite_note(a: torch.Tensor, e: torch.Tensor) -> str:
    n = (~torch.isfinite(a) & torch.isfinite(e)).sum().item()
    return f"; {n} NaN/inf in actual where expected is finite" if n else ""


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float | torch.Tensor = 0.0, rtol: float = 0.0,
                 equal_nan: bool = False, what: str = "values") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    ``atol`` is a number or a tensor broadcastable to the shape (an elementwise error bound); where
    the bound is NaN only equal values pass. Equal infinities pass; NaN passes only where both are
    NaN and ``equal_nan``. The dtypes may differ (a kernel's bf16 output against an fp32 reference).
    """
    a, e = _pair(actual, expected, what)
    a, e = a.double(), e.double()
    atol = torch.as_tensor(atol.detach().cpu() if isinstance(atol, torch.Tensor) else atol, dtype=torch.float64)
    allowed = torch.broadcast_to(atol + rtol * e.abs(), a.shape)
    diff = (a - e).abs()
    ok = (diff <= allowed) | (a == e)
    if equal_nan:
        ok |= torch.isnan(a) & torch.isnan(e)
    bad = ~ok
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    finite = torch.isfinite(diff)
    worst = torch.where(finite, diff, torch.zeros_like(diff))
    i = int(worst.reshape(-1).argmax())
    rule = "<= atol" + (f" + {rtol:g} * |expected|" if rtol else "")
    atol_text = f"{atol.item():.3g}" if atol.numel() == 1 else "elementwise"
    raise AssertionError(
        f"{what}: {n_bad} of {a.numel()} elements not within |actual - expected| {rule} (atol {atol_text})"
        f"{_not_finite_note(a, e)}; max finite |diff| {worst.reshape(-1)[i].item():.3g} at {_index(i, a.shape)}"
        f" (allowed {allowed.reshape(-1)[i].item():.3g}); first mismatches:\n{_listing(bad, a, e, allowed)}")


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_2 / ||expected||_2`` in float64: NaN if either holds NaN, 0 for two equal
    all-zero tensors, inf for a nonzero ``actual`` against an all-zero ``expected``."""
    a, e = _pair(actual, expected, "rel_rms_error")
    num, den = (a.double() - e.double()).norm().item(), e.double().norm().item()
    if den == 0:
        return 0.0 if num == 0 else (math.nan if math.isnan(num) else math.inf)
    return num / den


def assert_rel_rms(actual: torch.Tensor, expected: torch.Tensor, tol: float, *, what: str = "values") -> None:
    """Assert the relative RMS error ``||actual - expected||_2 / ||expected||_2 <= tol`` (float64).

    Any NaN or inf in either tensor fails, listing where; otherwise a failure lists the elements
    with the largest errors.
    """
    a, e = _pair(actual, expected, what)
    a, e = a.double(), e.double()
    non_finite = ~torch.isfinite(a) | ~torch.isfinite(e)
    if non_finite.any():
        raise AssertionError(f"{what}: {int(non_finite.sum())} of {a.numel()} elements are NaN/inf"
                             f"{_not_finite_note(a, e)}; first:\n{_listing(non_finite, a, e)}")
    err = rel_rms_error(a, e)
    if err <= tol:
        return
    diff = (a - e).abs().reshape(-1)
    largest = torch.zeros(a.numel(), dtype=torch.bool)
    largest[diff.topk(min(SHOWN, a.numel())).indices] = True
    raise AssertionError(f"{what}: relative RMS error {err:.3g} > {tol:g} (||actual - expected|| "
                         f"{(a - e).norm().item():.3g}, ||expected|| {e.norm().item():.3g}); largest errors:\n"
                         f"{_listing(largest.reshape(a.shape), a, e)}")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, *, equal_nan: bool = False, check_dtype: bool = True,
                 what: str = "values") -> None:
    """Assert exact elementwise equality (``-0 == +0``; NaN equals NaN only with ``equal_nan``).

    The dtypes must match unless ``check_dtype=False`` (then values compare after type promotion).
    """
    a, e = _pair(actual, expected, what)
    if check_dtype and a.dtype != e.dtype:
        raise AssertionError(f"{what}: dtype {a.dtype} != expected {e.dtype}")
    if a.is_floating_point() or e.is_floating_point():
        a, e = a.double(), e.double()          # exact for every float dtype; float8 has no == of its own
    ok = a == e
    if equal_nan:
        ok |= torch.isnan(a) & torch.isnan(e)
    bad = ~ok
    n_bad = int(bad.sum())
    if n_bad:
        raise AssertionError(f"{what}: {n_bad} of {a.numel()} elements differ{_not_finite_note(a, e)}; "
                             f"first:\n{_listing(bad, a, e)}")
