"""How the package runs its Triton kernels: compiled on CUDA, interpreted where there is no GPU.

Triton fixes at import time whether ``@triton.jit`` functions (its own library included) are
compiled or interpreted. ``import nemotron`` therefore sets ``TRITON_INTERPRET=1`` when no CUDA
device exists, the variable is unset and Triton is not imported yet, so the same kernel code runs
on CPU tensors (slowly) in CI and on laptops and the tests compare it with the references there.
"""
from __future__ import annotations

import os
import sys


def _choose_mode() -> None:
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_choose_mode()


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (on CPU tensors)."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def check_device(name: str, t) -> None:
    """A Triton launch needs CUDA tensors, or CPU tensors when interpreting; else a clear error."""
    if interpreting():
        if t.is_cuda:
            raise ValueError(f"{name}: Triton runs interpreted (TRITON_INTERPRET=1); pass a CPU tensor, got {t.device}")
    elif not t.is_cuda:
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor, got {t.device}; to run them on CPU set "
                         "TRITON_INTERPRET=1 before importing triton")
