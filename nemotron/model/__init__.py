"""The Nemotron 3 hybrid model: HF ``nemotron_h`` config and checkpoints, ModelOpt NVFP4 / FP8
exports, the hybrid cache, and generation with multi-token prediction."""
from .cache import HybridCache
from .config import NemotronHConfig
from .model import NemotronHForCausalLM

__all__ = ["NemotronHConfig", "NemotronHForCausalLM", "HybridCache"]
