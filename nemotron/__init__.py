"""nemotron-kernels: fused NVFP4, Mamba-2 SSD and LatentMoE kernels and the ``nemotron``
torch.compile backend for Nemotron 3 hybrid models.

Without a CUDA device, importing the package turns on Triton's interpreter (see ``nemotron.dispatch``).
"""
from . import dispatch  # noqa: F401  (first: chooses Triton's interpreter before triton is imported)
from .quantize import prepare_training_, quantize_

__version__ = "0.1.0"
__all__ = ["quantize_", "prepare_training_", "dispatch", "nvfp4", "ssm_kernels", "moe_kernels", "attention", "model",
           "graph", "train"]

_SUBPACKAGES = ("nvfp4", "ssm_kernels", "moe_kernels", "attention", "model", "graph", "train")


def __getattr__(name):
    """``nemotron.model``, ``nemotron.graph``, ... import on first use (``graph`` pulls in Inductor)."""
    if name in _SUBPACKAGES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nemotron' has no attribute {name!r}")
