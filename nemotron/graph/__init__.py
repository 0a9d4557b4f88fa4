"""The ``nemotron`` torch.compile backend: graph passes over this package's custom ops (no-op
elimination, norm + NVFP4 quantize + W4A4 GEMM fusion, MoE route + experts fusion, kernel lowering),
Inductor for everything else.

The backend is registered only through the ``torch_dynamo_backends`` entry point ``nemotron``
(``torch.compile(f, backend="nemotron")`` finds it without importing this package first).
"""
from __future__ import annotations

from .backend import nemotron_backend
from .passes import FUSIONS, KERNELS, NemotronPasses

__all__ = ["nemotron_backend", "NemotronPasses", "explain", "compile_regions", "FUSIONS", "KERNELS"]


class Explanation:
    """What the backend did to each graph: the fusions applied, and every package op as a row
    ``(op, impl, kernel, shape)``: the implementation pinned in the node (what runs), its description
    with the reasons other implementations were passed over, and the op's output shape."""

    def __init__(self, graphs: list):
        self.graphs = graphs

    @property
    def fusions(self) -> dict:
        total: dict = {}
        for g in self.graphs:
            for k, v in g["fusions"].items():
                total[k] = total.get(k, 0) + v
        return total

    @property
    def ops(self) -> list:
        return [row for g in self.graphs for row in g["ops"]]

    def __str__(self) -> str:
        lines = []
        for i, g in enumerate(self.graphs):
            fused = ", ".join(f"{k}: {v}" for k, v in g["fusions"].items())
            lines.append(f"graph {i}: rewrites {fused or 'none'}")
            for op, _, kernel, shape in g["ops"]:
                lines.append(f"  {op:34s} {str(list(shape)):18s} -> {kernel}")
        return "\n".join(lines)


def explain(model, example_inputs, example_kwargs=None, *, options=None) -> Explanation:
    """Compile ``model`` with the ``nemotron`` backend (caches off, so every pass runs), call it once
    on the example inputs, and report each graph's rewrites and each package op's kernel.

    Example::

        >>> print(nemotron.graph.explain(model, (input_ids,)))
    """
    import torch

    report: list = []
    opts = {**(options or {}), "report": report, "force_disable_caches": True}
    compiled = torch.compile(model, backend=lambda gm, ex: nemotron_backend(gm, ex, options=opts))
    with torch.no_grad():
        compiled(*example_inputs, **(example_kwargs or {}))
    return Explanation(report)


def compile_regions(model, **compile_kwargs):
    """Regional compilation: compile each layer (``backbone.layers[i]``, the MTP sublayers) instead of the
    whole model, so one compiled graph serves every layer of the same kind (Dynamo inlines the module
    and treats its parameters as inputs); returns the model. ``compile_kwargs`` go to
    ``Module.compile`` (default ``backend="nemotron"``)."""
    compile_kwargs.setdefault("backend", "nemotron")
    layers = list(model.backbone.layers) + (list(model.mtp.layers) if getattr(model, "mtp", None) is not None else [])
    for layer in layers:
        layer.compile(**compile_kwargs)
    return model
