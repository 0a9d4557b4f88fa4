"""pytest-benchmark view of every benchmark op (the same ops as ``python -m bench``).

``pytest bench/ --benchmark-only`` times them (each call synchronized); CI runs this file with
``--benchmark-disable`` so a broken benchmark fails the build.
"""
import pytest
import torch

from bench import harness
from bench.registry import registry

OPS = registry()
DEVICE = harness.env_device()
SHAPE_SET = "nemotron" if DEVICE.type == "cuda" else "smoke"


@pytest.mark.parametrize("op_name, impl", [(o, i) for o, op in OPS.items() for i in op.impls])
def test_benchmark(benchmark, op_name, impl):
    op = OPS[op_name]
    args = op.make_inputs(op.shapes[SHAPE_SET][0], DEVICE, 0)
    fn = op.impls[impl]

    def call():
        out = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(call)
    assert out is not None
    if op.verify is not None and impl.startswith("triton"):   # the runner's gate: our kernels match the reference
        peers = {p: op.impls[p](*args) for p in op.peers if p in op.impls}
        op.verify(args, {impl: out, **peers})
