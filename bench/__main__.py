"""``python -m bench <kernel>...``: run benchmarks, print the table, write JSON + PNG.

One failing op (an exception, or our kernel disagreeing with the reference) does not stop the others:
its traceback is printed, it is listed at the end, and the exit status is 1."""
from __future__ import annotations

import argparse
import sys
import traceback

import nemotron  # noqa: F401  (chooses Triton's interpreter before triton is imported)

from . import harness
from .registry import registry


def main(argv=None) -> int:
    ops = registry()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("kernels", nargs="*", help=f"kernels to run (default all): {', '.join(ops)}")
    p.add_argument("--shapes", default=None,
                   help="shape set: nemotron | trimmed | sweep | smoke (default: nemotron on GPU, smoke on CPU); "
                        f"trimmed: an op's own trimmed set, else the first {harness.TRIMMED_DEFAULT} Nemotron shapes")
    p.add_argument("--impls", default=None, help="comma-separated implementations (default all)")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON/PNG")
    a = p.parse_args(argv)
    unknown = [k for k in a.kernels if k not in ops]
    if unknown:
        p.error(f"unknown kernel(s) {unknown}; known: {list(ops)}")
    device = harness.env_device()
    shape_set = a.shapes or ("nemotron" if device.type == "cuda" else "smoke")
    names = a.kernels or list(ops)
    for name in names:
        if harness.shapes_for(ops[name], shape_set) is None:
            p.error(f"--shapes: {name} has shape sets {list(ops[name].shapes)}, not {shape_set!r}")
    failed = []
    for name in names:
        try:
            doc = harness.run(ops[name], shape_set, device, impls=a.impls.split(",") if a.impls else None)
            harness.print_table(doc)
            if not a.no_save:
                print(f"wrote {harness.save(doc)}")
        except Exception as e:  # noqa: BLE001  (one broken op must not cost the others their measurements)
            traceback.print_exc()
            failed.append(f"{name}: {type(e).__name__}: {e}"[:500])
            print(f"FAILED {failed[-1]}", flush=True)
        print(flush=True)
    if failed:
        print(f"{len(failed)} of {len(names)} benchmarks failed:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
