"""The one kernel dispatch of the package: each op's implementations, the choice between them, and
the argument checks the op families share.

Every ``nemotron::*`` op lists its implementations here in order of preference (:data:`TABLE`), each
with the condition it needs. :func:`choose` picks the first that accepts the call and keeps the
reason each earlier one was rejected, so a report can say why a path did not run:

* ``triton``: this package's Triton kernels. They need a CUDA tensor, or a CPU tensor while Triton
  runs interpreted (``TRITON_INTERPRET=1``, which ``import nemotron`` turns on when no GPU exists).
  Chosen by default on CUDA only: on CPU the references are the fast path.
* ``scaled_mm``: ``torch._scaled_mm`` (FP8 GEMM), on CUDA devices of capability >= 8.9.
* ``torch``: a fast plain-torch path (fp32 math, batched matmuls, table lookups), on any device; the
  CPU default where an op has one. Equal to the reference bit for bit (quantizers) or up to fp32
  summation order (GEMMs), which the tests check.
* ``reference``: the plain-torch reference (``<family>/reference.py``, fp32 or fp64 in a fixed
  order), on any device: the oracle of every test, and the path of ops with nothing faster.

The choice is forced three ways, strongest first: an op's explicit ``impl`` argument (what the
``nemotron`` backend's lowering pass writes into each graph node at compile time, so that what runs
is what :func:`nemotron.graph.explain` prints); the :func:`use` context (thread- and task-local);
the ``NEMOTRON_KERNELS`` environment variable (``triton``, ``torch`` or ``reference``), read once at import.
Forcing ``triton`` on an op that has no Triton kernel (routing, permutation, the FP8 GEMM) keeps
its other implementations; forcing an implementation that cannot run raises, naming the reason.

Triton fixes at import time whether ``@triton.jit`` functions (its own library included) are
compiled or interpreted, so the interpreter can be turned on only before Triton is imported. When
something imported Triton first on a machine without a GPU, the references still run; a forced
``triton`` says what to do.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import sys
from typing import Callable, Optional

import torch


def _choose_mode() -> None:
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_choose_mode()

KERNELS = ("triton", "torch", "reference")      # what ``use``, ``NEMOTRON_KERNELS`` and the backend's ``kernels`` name
_ENV = "NEMOTRON_KERNELS"
_ENV_VALUE = os.environ.get(_ENV, "").strip().lower() or None     # read once
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("nemotron_kernels", default=None)
_trace: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("nemotron_trace", default=None)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (on CPU tensors)."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def _check_kernels(name: str, value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in KERNELS:
        raise ValueError(f"{name}: expected one of {list(KERNELS)} (or unset), got {value!r}")
    return value.strip().lower()


def forced() -> Optional[str]:
    """The kernel family forced on this thread/task: :func:`use`, else ``NEMOTRON_KERNELS``, else None."""
    return _forced.get() or _check_kernels(_ENV, _ENV_VALUE)


@contextlib.contextmanager
def use(kernels: Optional[str]):
    """Force ``"triton"``, ``"torch"`` or ``"reference"`` implementations (None: by device) inside the block.

    Example::

        >>> with nemotron.dispatch.use("triton"):      # the kernels, interpreted on a CPU machine
        ...     y = nemotron.nvfp4.linear(x, w)
    """
    token = _forced.set(_check_kernels("kernels", kernels))
    try:
        yield
    finally:
        _forced.reset(token)


@contextlib.contextmanager
def trace():
    """Collect ``(op, implementation)`` for every op call that runs inside the block, nested calls
    included (how the tests check that a compiled graph runs what its report says).

    Example::

        >>> with nemotron.dispatch.trace() as ran:
        ...     compiled(x)
        >>> ran[:2]
        [('causal_conv1d', 'reference'), ('ssd_scan', 'reference')]
    """
    log: list = []
    token = _trace.set(log)
    try:
        yield log
    finally:
        _trace.reset(token)


# ---- the implementation table -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Call:
    """What a choice depends on: the device, its capability, the dtype and the row count of the op's
    leading tensor argument (real or fake), and whether an implementation was forced."""
    device: str
    capability: Optional[tuple]
    dtype: torch.dtype
    rows: Optional[int]
    forced: Optional[str]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def _call(x: torch.Tensor, want: Optional[str]) -> Call:
    dev = x.device
    cap = _capability(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else None
    rows = None
    if x.dim():
        n = x.numel() // x.shape[-1] if x.shape[-1] else 0
        rows = n if isinstance(n, int) else None           # symbolic under dynamic shapes
    return Call(dev.type, cap, x.dtype, rows, want)


def _needs_triton(c: Call) -> Optional[str]:
    if c.device == "cuda":
        if interpreting():
            return "Triton runs interpreted (TRITON_INTERPRET=1), so it takes CPU tensors, not CUDA ones"
        return None
    if c.device != "cpu":
        return f"no Triton kernels for {c.device} tensors"
    if c.forced != "triton":
        return "CPU tensor (plain torch is the fast path there; force 'triton' to interpret the kernel)"
    if not interpreting():
        return ("Triton was imported before nemotron without TRITON_INTERPRET=1, so its kernels cannot run "
                "on CPU; set TRITON_INTERPRET=1 in the environment or import nemotron before triton")
    return None


def _needs_scaled_mm(c: Call) -> Optional[str]:
    if c.device != "cuda":
        return "torch._scaled_mm needs a CUDA device"
    if c.capability < (8, 9):
        return f"torch._scaled_mm needs capability >= 8.9, the device has {c.capability}"
    return None


def _always(c: Call) -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op: its name, the kernel family it belongs to, what a report says
    it runs (a string, or a function of the call), and the condition it needs (None = usable)."""
    name: str
    family: str
    kernel: object
    needs: Callable[[Call], Optional[str]] = _always

    def describe(self, c: Call) -> str:
        return self.kernel(c) if callable(self.kernel) else self.kernel


def _triton(kernel) -> Impl:
    return Impl("triton", "triton", kernel, _needs_triton)


def _needs_triton_not_fp64(c: Call) -> Optional[str]:
    if c.dtype == torch.float64:
        return "float64 inputs (gradient checks) run on the torch path"
    return _needs_triton(c)


def _moe_triton(kernel) -> Impl:
    return Impl("triton", "triton", kernel, _needs_triton_not_fp64)


def _gemm(what: str):
    def text(c: Call) -> str:
        if c.rows is None:
            return f"Triton NVFP4 GEMM {what} (split-K for M <= 64, persistent above)"
        return f"Triton NVFP4 GEMM {what} ({'split-K, M <= 64' if c.rows <= 64 else 'persistent, M > 64'})"
    return text


REFERENCE = Impl("reference", "reference", "reference (plain torch)")
_FAST = lambda what: Impl("torch", "torch", what)  # noqa: E731  (a fast plain-torch path, checked against the reference)
_DECODE = "torch fp32 decode update, the elementwise work of all tokens at once"
_TORCH = lambda what: Impl("reference", "reference", what)  # noqa: E731  (the torch ops are the kernel and the reference)

TABLE: dict[str, tuple] = {
    "nvfp4_amax": (_triton("Triton amax"), REFERENCE),
    "nvfp4_quantize": (_triton("Triton NVFP4 quantize"), _FAST("torch NVFP4 quantize (fp32, byte-equal)"), REFERENCE),
    "nvfp4_quantize_row_col": (_triton("Triton fused rowwise + columnwise (RHT) NVFP4 quantize"),
                               _FAST("two torch NVFP4 quantizes"), REFERENCE),
    "nvfp4_dequantize": (_triton("Triton NVFP4 dequantize"), _FAST("torch NVFP4 dequantize (fp16 bit placement, bit-equal)"),
                         REFERENCE),
    "hadamard16": (_triton("Triton RHT"), REFERENCE),
    "nvfp4_linear": (_triton(_gemm("(packed FP4 expanded in registers)")),
                     _FAST("torch NVFP4 GEMM (exact lookup expansion per row chunk, fp32 / bf16 matmul)"), REFERENCE),
    "norm_nvfp4_linear": (_triton(lambda c: "Triton RMSNorm+NVFP4 quantize -> " + _gemm("W4A4")(c)), REFERENCE),
    "fp8_linear": (Impl("scaled_mm", "torch", "torch._scaled_mm FP8 GEMM", _needs_scaled_mm), REFERENCE),
    "ssd_scan": (_triton("Triton chunk-parallel SSD scan (chunk cumsum, chunk states, state pass, chunk scan)"),
                 REFERENCE),
    "causal_conv1d": (_triton("Triton causal conv1d"), REFERENCE),
    "causal_conv1d_update": (_triton("Triton causal conv1d"), _FAST(_DECODE), REFERENCE),
    "selective_state_update": (_triton("Triton selective state update"),
                               _FAST(_DECODE + "; with state_indices the reference"), REFERENCE),
    "selective_state_update_multi": (_triton("Triton multi-token selective state update (state in registers)"),
                                     _FAST(_DECODE), REFERENCE),
    "causal_conv1d_update_multi": (_triton("Triton multi-token causal conv1d update"), _FAST(_DECODE), REFERENCE),
    "gated_rmsnorm": (_triton("Triton gated RMSNorm"), REFERENCE),
    "moe_route": (_FAST("torch sigmoid top-k, fp32, fewer ops (bit-equal)"),
                  _TORCH("torch sigmoid top-k, fp32 (the reference)")),
    "moe_permute": (_TORCH("torch stable sort + scatter-add, no host sync (the reference)"),),
    "moe_combine": (_TORCH("torch fixed-order sum of the k slots (the reference)"),),
    "moe_expert_slots": (_moe_triton("Triton grouped GEMM (gather, relu2 and routing weight fused)"),
                         _FAST("torch fp32 grouped matmuls"), REFERENCE),
    "moe_experts": (_moe_triton("Triton grouped GEMM (gather, relu2, routing weight fused; deterministic combine)"),
                    _FAST("torch fp32 grouped matmuls"), REFERENCE),
    "moe_routed_experts": (_moe_triton("torch routing + Triton grouped GEMM in one op"),
                           _FAST("torch routing + fp32 grouped matmuls"), REFERENCE),
    "decode_attention": (_triton("Triton split-KV flash decoding over the live KV (partial softmax per split + reduction)"),
                         _FAST("torch SDPA per row on the live KV slice"), REFERENCE),
}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation chosen for one call, and ``(name, reason)`` for each one passed over."""
    op: str
    impl: Impl
    call: Call
    rejected: tuple = ()

    @property
    def name(self) -> str:
        return self.impl.name

    def __str__(self) -> str:
        text = self.impl.describe(self.call)
        if self.rejected:
            text += "  [" + "; ".join(f"not {n}: {why}" for n, why in self.rejected) + "]"
        return text


def choose(op: str, x: torch.Tensor, impl: str = "", *, kernels: Optional[str] = None, record: bool = True) -> Choice:
    """The implementation of ``op`` for a call whose leading tensor is ``x`` (real or fake).

    ``impl`` names one implementation outright (raises if it cannot run); else ``kernels`` (or
    :func:`forced`) restricts the choice to a family; else the first usable one by device.
    ``record=False`` keeps a compile-time decision out of :func:`trace`.
    """
    impls = TABLE[op]
    if impl:
        match = [i for i in impls if i.name == impl]
        if not match:
            raise ValueError(f"impl: {op} has implementations {[i.name for i in impls]}, got {impl!r}")
        c = _call(x, match[0].family)
        why = match[0].needs(c)
        if why is not None:
            raise ValueError(f"nemotron::{op}: the {impl} implementation cannot run here: {why}")
        return _ran(Choice(op, match[0], c), record)
    want = _check_kernels("kernels", kernels) or forced()
    c = _call(x, want)
    pool = list(impls)
    if want is not None:                  # an op with no implementation of that family keeps all of its own
        pool = [i for i in impls if i.family == want] or pool
    rejected = []
    for i in pool:
        why = i.needs(c)
        if why is None:
            return _ran(Choice(op, i, c, tuple(rejected)), record)
        rejected.append((i.name, why))
    reasons = "; ".join(f"{n}: {why}" for n, why in rejected)
    raise ValueError(f"nemotron::{op}: no implementation of the forced kind {want!r} can run here ({reasons})")


def _ran(choice: Choice, record: bool) -> Choice:
    log = _trace.get()
    if log is not None and record:
        log.append((choice.op, choice.name))
    return choice


# ---- argument checks the families share -------------------------------------------------------

def flattens(x: torch.Tensor) -> bool:
    """True when the leading dims of ``x`` flatten to one without a copy."""
    try:
        x.view(-1, x.shape[-1])
        return True
    except RuntimeError:
        return False


def check_int(name: str, v, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``v`` as an int in ``[lo, hi]``; bools and floats are refused (``top_k=True`` is not 1)."""
    import numbers
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}: expected an int in {rng}, got {v}")
    return v


def check_float(name: str, v, *, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False) -> float:
    """``v`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ints are taken,
    bools, NaN and inf refused."""
    import math
    import numbers
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        span = "" if lo is None and hi is None else \
            f" in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}: expected a finite float{span}, got {v}")
    return v


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")
    return v
