"""The Nemotron 3 hybrid model: HF ``nemotron_h`` config and checkpoints, ModelOpt NVFP4 / FP8
exports, the hybrid cache, and generation with multi-token prediction."""
import os

from .cache import HybridCache
from .checkpoint import CheckpointError
from .config import NemotronHConfig
from .model import NemotronHForCausalLM


def from_hf(hf_model, **kwargs) -> NemotronHForCausalLM:
    """This package's model with the weights of an HF transformers ``NemotronHForCausalLM``."""
    return NemotronHForCausalLM.from_hf(hf_model, **kwargs)


DEMO_CHECKPOINTS = ("nvfp4", "bf16")


def demo_checkpoint(kind: str = "nvfp4") -> str:
    """The directory of a shipped ``stdlib-tiny`` model trained on the Python standard library (see
    ``nemotron train``): ``"nvfp4"``, trained natively in NVFP4 (``NVFP4Recipe.nemotron3()``) and
    exported in ModelOpt NVFP4 format, or ``"bf16"``, the high-precision baseline trained on the same
    batches. Each holds config.json, model.safetensors and tokenizer.json, and loads with
    :meth:`NemotronHForCausalLM.from_pretrained`; ``assets/results.json`` beside them holds their
    measured held-out numbers."""
    if kind not in DEMO_CHECKPOINTS:
        raise ValueError(f"kind: expected one of {DEMO_CHECKPOINTS}, got {kind!r}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", f"stdlib-tiny-{kind}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"kind: the {kind} demo checkpoint is missing from the installed package ({path})")
    return path


__all__ = ["NemotronHConfig", "NemotronHForCausalLM", "HybridCache", "CheckpointError", "from_hf",
           "demo_checkpoint", "DEMO_CHECKPOINTS"]
