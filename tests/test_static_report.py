"""The sm_90 static report's rules hold for every kernel at the Super shapes (``python -m bench.static``).

Rules: no kernel spills registers, and every configuration the public API accepts fits the per-block
shared-memory limit of H100/H200 (232,448 B), since a launch over it fails only on a GPU. The kernels
that break a rule today are listed in ``KNOWN`` with what they break and the measured value: every
other kernel must satisfy both rules, and every listed one must still break exactly what is listed,
so a fix fails this test until its entry is removed.

The report compiles for sm_90 in a subprocess without the Triton interpreter (this process runs
kernels interpreted). The SSD scan is compiled for every dtype and chunk size ``ssd_scan`` accepts
at the Nemotron head and state sizes (P = 64, N = 128).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.static import SMEM_PER_BLOCK, violations

ROOT = Path(__file__).resolve().parents[1]

# case -> {rule: measured value}: spill = bytes of spill stores, smem = bytes of shared memory. Empty
# since the SSD scan became four chunk-parallel kernels (its 14 entries, up to 55,272 B of spills and
# 1,017,856 B of shared memory, went with the one-kernel scan).
KNOWN: dict[str, dict] = {}

# The FP4 -> bf16 expansion's budget in the W4A16 GEMM and the MoE kernels' hot loops (SASS instructions
# per weight, the MMA included), and the cases over it with their measured value: k/v_proj, whose
# 256 x 4096 weight fills the GPU only in 16-wide mma.sync tiles (17..32 rows) or 32-wide wgmma ones
# (33..64 rows). W4A4 expands the activations too and is not held to it.
SASS_PER_WEIGHT = 6.0
KNOWN_SASS = {"nvfp4_gemm/super.kv_proj.M32": 6.89, "nvfp4_gemm/super.kv_proj.M64": 6.44}


def _report(*args) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "static.json"
        r = subprocess.run([sys.executable, "-m", "bench.static", "--preset", "super", "--json", str(out), *args],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return json.loads(out.read_text())["rows"]


def _check(rows: list[dict], expected_known: set) -> None:
    broken = {}
    for row in rows:
        for rule, value in violations(row).items():
            broken.setdefault(row["case"], {})[rule] = value
    seen = {row["case"] for row in rows}
    assert expected_known <= seen, f"known cases not measured (renamed?): {sorted(expected_known - seen)}"
    new = {c: v for c, v in broken.items() if c not in KNOWN}
    assert not new, f"kernels breaking a rule (no spills; smem <= {SMEM_PER_BLOCK} B): {new}"
    for case in sorted(expected_known):
        now = broken.get(case, {})
        assert set(now) == set(KNOWN[case]), (
            f"{case}: listed as breaking {KNOWN[case]}, now breaks {now or 'nothing'}: update KNOWN "
            "(remove the entry once fixed)")


def test_kernels_spill_nothing_and_fit_shared_memory():
    rows = _report()
    defined = {m for f in (ROOT / "nemotron").rglob("*.py") if "triton" in f.parts
               for m in re.findall(r"^def (_\w+_fwd_kernel)\(", f.read_text(), re.M)}
    missing = defined - {r.get("kernel") for r in rows}
    assert not missing, f"kernels without a case in bench.static.cases(): {sorted(missing)}"
    _check(rows, set(KNOWN))
    fp4 = [r for r in rows if r["unit"] == "weight" and (r["case"].startswith("nvfp4_gemm/")
                                                         or r["case"].startswith("moe_experts/super.nvfp4"))]
    assert fp4 and all(r["per_unit"] is not None for r in fp4), "hot loops not found"
    over = {r["case"]: r["per_unit"] for r in fp4 if r["per_unit"] > SASS_PER_WEIGHT}
    assert set(over) == set(KNOWN_SASS), f"SASS per weight over {SASS_PER_WEIGHT}: {over}; listed: {KNOWN_SASS}"
