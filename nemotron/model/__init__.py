"""The Nemotron 3 hybrid model: HF ``nemotron_h`` config and checkpoints, ModelOpt NVFP4 / FP8
exports, the hybrid cache, and generation with multi-token prediction."""
from .cache import HybridCache
from .checkpoint import CheckpointError
from .config import NemotronHConfig
from .model import NemotronHForCausalLM


def from_hf(hf_model, **kwargs) -> NemotronHForCausalLM:
    """This package's model with the weights of an HF transformers ``NemotronHForCausalLM``."""
    return NemotronHForCausalLM.from_hf(hf_model, **kwargs)


__all__ = ["NemotronHConfig", "NemotronHForCausalLM", "HybridCache", "CheckpointError", "from_hf"]
