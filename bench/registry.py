"""Every benchmark op, by name (the runner and the pytest-benchmark view read this one table)."""
from . import attention, moe, nvfp4, nvfp4_linear, nvfp4_training, ssm


def registry() -> dict:
    return {**nvfp4.ops(), **nvfp4_linear.ops(), **nvfp4_training.ops(), **ssm.ops(), **moe.ops(), **attention.ops()}
