"""The backend function behind the ``nemotron`` entry point.

Not decorated with ``torch._dynamo.register_backend``: the entry point registers it under the same
name, and a second registration fails with "duplicate name".
"""
from __future__ import annotations

from collections.abc import Mapping

from .. import dispatch
from .passes import FUSIONS, KERNELS, NemotronPasses

KNOWN_OPTIONS = frozenset({"fusions", "kernels", "cudagraphs", "force_disable_caches", "report"})


def _check_options(options) -> dict:
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options: expected a dict for backend 'nemotron', got {type(options).__name__}")
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"options: unknown key(s) {unknown} for backend 'nemotron'; known: {sorted(KNOWN_OPTIONS)}")
    fusions = options.get("fusions", FUSIONS)
    if isinstance(fusions, str) or not isinstance(fusions, (list, tuple, set, frozenset)) or \
            any(f not in FUSIONS for f in fusions):
        raise ValueError(f"options['fusions']: expected a list drawn from {list(FUSIONS)}, got {fusions!r}")
    kernels = options.get("kernels")
    if kernels is not None and kernels not in KERNELS:
        raise ValueError(f"options['kernels']: expected one of {list(KERNELS)} or None (by device), got {kernels!r}")
    report = options.get("report")
    if report is not None and not isinstance(report, list):
        raise TypeError(f"options['report']: expected a list (the passes append to it) or None, got "
                        f"{type(report).__name__}")
    return dict(fusions=tuple(fusions), kernels=kernels,
                cudagraphs=dispatch.check_bool("options['cudagraphs']", options.get("cudagraphs", False)),
                force_disable_caches=dispatch.check_bool("options['force_disable_caches']",
                                                         options.get("force_disable_caches", False)),
                report=report)


def nemotron_backend(gm, example_inputs, *, mode=None, options=None, **kwargs):
    """torch.compile backend: this package's passes on the post-grad graph, Inductor for the rest.

    Args (through ``torch.compile(..., mode=...)`` or ``torch.compile(..., options=...)``; torch.compile
    takes one or the other):
        mode: an Inductor mode ("default", "reduce-overhead", "max-autotune", ...).
        options: ``fusions`` (subset of ``("noop", "norm_quant", "moe")``, default all),
            ``kernels`` (``"triton" | "reference"``; default: by device — Triton on CUDA, the
            references on CPU; ``NEMOTRON_KERNELS`` / :func:`nemotron.dispatch.use` when set),
            ``cudagraphs`` (Inductor's CUDA graphs, as ``mode="reduce-overhead"``),
            ``force_disable_caches`` (tests: make the passes run every time), ``report`` (a list the
            passes append their per-graph reports to; see :func:`nemotron.graph.explain`).
        Unknown keys and values of the wrong type raise, so a typo never silently compiles
        something else.

    The lowering pass decides each op's implementation at compile time and pins it in the graph
    (:mod:`nemotron.dispatch`); the compiled graph runs exactly those, whatever the environment
    says later.

    Graphs without package ops (and CPU graphs) go through Inductor unchanged apart from no-op
    elimination: the passes only rewrite what they recognize.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    opts = _check_options(options)
    passes = NemotronPasses(opts["fusions"], opts["kernels"], opts["report"])
    patches = dict(list_mode_options(mode) if mode else {})
    patches["post_grad_custom_post_pass"] = passes
    if opts["cudagraphs"]:
        patches["triton.cudagraphs"] = True
    if opts["force_disable_caches"]:
        patches["force_disable_caches"] = True
    return compile_fx(gm, example_inputs, config_patches=patches)
