"""Training a small Nemotron-H on the Python standard library: the data (``data``: the corpus split,
the byte-level BPE, step-determined batches) and the loop (``loop``: recipes bf16 / nvfp4 and its
ablations, MTP loss, checkpoints and bit-identical resume, evaluation); ``nemotron train`` / ``eval``."""
from . import data, loop  # noqa: F401
