"""``python -m bench <kernel>...``: run benchmarks, print the table, write JSON + PNG."""
from __future__ import annotations

import argparse
import sys

import nemotron  # noqa: F401  (chooses Triton's interpreter before triton is imported)

from . import harness
from .registry import registry


def main(argv=None) -> int:
    ops = registry()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("kernels", nargs="*", help=f"kernels to run (default all): {', '.join(ops)}")
    p.add_argument("--shapes", default=None, help="shape set: nemotron | sweep | smoke (default: nemotron on GPU, smoke on CPU)")
    p.add_argument("--impls", default=None, help="comma-separated implementations (default all)")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON/PNG")
    a = p.parse_args(argv)
    unknown = [k for k in a.kernels if k not in ops]
    if unknown:
        p.error(f"unknown kernel(s) {unknown}; known: {list(ops)}")
    device = harness.env_device()
    shape_set = a.shapes or ("nemotron" if device.type == "cuda" else "smoke")
    for name in a.kernels or list(ops):
        op = ops[name]
        if shape_set not in op.shapes:
            p.error(f"--shapes: {name} has shape sets {list(op.shapes)}, not {shape_set!r}")
        doc = harness.run(op, shape_set, device, impls=a.impls.split(",") if a.impls else None)
        harness.print_table(doc)
        if not a.no_save:
            print(f"wrote {harness.save(doc)}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
