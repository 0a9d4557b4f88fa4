"""Test harness: markers, hypothesis profiles, the device kernels run on, NaN-poisoned allocations.

* ``@pytest.mark.gpu`` tests are skipped without CUDA; run them with ``pytest -m gpu`` on a GPU.
* ``@pytest.mark.slow`` marks long tests; deselect with ``-m "not slow"``.
* Hypothesis profile from ``NEMOTRON_HYPOTHESIS_PROFILE``: ``ci`` (default, few examples, fast on
  2 CPU cores under the Triton interpreter) or ``dev`` (thorough).
* ``kernel_device``: where Triton kernels run here: ``cuda``, or ``cpu`` under the interpreter
  (``import nemotron`` turns it on when no GPU exists; it must happen before triton is imported).
"""
import os
import sys

import nemotron  # noqa: F401  (first: chooses Triton's interpreter on CPU machines)
import pytest
import torch
from hypothesis import HealthCheck, settings

from nemotron import dispatch

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("NEMOTRON_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """The device whose tensors the Triton kernels accept in this process."""
    return torch.device("cpu") if dispatch.interpreting() else torch.device("cuda")


_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.element_size() > 1:
        t.fill_(float("nan"))
    elif t.element_size() == 1:
        t.view(torch.uint8).fill_(0x7F)      # E4M3 NaN / an unlikely code byte
    elif t.dtype in (torch.int16, torch.int32, torch.int64):
        t.fill_(0x5555)
    return t


def _from_package() -> bool:
    return sys._getframe(2).f_globals.get("__name__", "").startswith("nemotron")


@pytest.fixture(autouse=True)
def poison_package_allocations(monkeypatch):
    """Memory the package allocates with torch.empty* starts as NaN / 0x55, so an unwritten tile fails loudly."""
    def empty(*args, **kwargs):
        t = _real_empty(*args, **kwargs)
        return _poison(t) if _from_package() and t.numel() else t

    def empty_like(*args, **kwargs):
        t = _real_empty_like(*args, **kwargs)
        return _poison(t) if _from_package() and t.numel() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
