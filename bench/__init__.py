"""Benchmarks: every kernel against its peers on the same inputs, through one runner.

    python -m bench nvfp4_quantize [--shapes nemotron|sweep|smoke] [--impls triton,torch]

Results: a table on stdout, ``bench/results/<device>/<kernel>.json`` and ``.png``. The same ops are
collected by pytest-benchmark (``pytest bench/ --benchmark-only``).
"""
