"""The ``nemotron`` torch.compile backend. For now it hands the FX graph to Inductor unchanged; the
lowering and fusion passes over this package's custom ops come later.

The backend is registered only through the ``torch_dynamo_backends`` entry point ``nemotron``
(``torch.compile(f, backend="nemotron")`` finds it without importing this package first).
"""
from .backend import nemotron_backend

__all__ = ["nemotron_backend"]
