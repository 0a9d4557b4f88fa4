"""The Nemotron 3 hybrid model (to come): HF-compatible config, layers, HF / ModelOpt checkpoint I/O,
hybrid caches, generation with multi-token prediction."""
