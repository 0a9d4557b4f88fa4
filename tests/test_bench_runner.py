"""The benchmark runner and the staged GPU script, on CPU: the script parses and names its stages, the
runner measures every op past one that fails (and exits non-zero), ``trimmed`` shape sets resolve,
and ``bench.model`` hands out its document after every measured row."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

import bench.__main__ as runner
from bench import harness, model as bench_model
from bench.harness import BenchOp

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"


def test_gpu_session_script_parses_and_has_stages():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 2 and "1|2|3|all" in r.stderr           # no stage: usage, nothing runs
    text = SCRIPT.read_text()
    for stage in ("stage1", "stage2", "stage3"):
        assert f"{stage}() {{" in text
    assert "--no-deps" in text and "NEMOTRON_RESULTS_DIR" in text and "--shapes trimmed" in text


def _op(name, fn):
    return BenchOp(name=name, shapes={"smoke": [(4,)]}, make_inputs=lambda s, d, seed: (torch.ones(s),),
                   impls={"impl": fn}, peers=(), bytes=lambda s: 4 * s[0])


def _broken(x):
    raise RuntimeError("kernel exploded")


@pytest.fixture
def fake_ops(monkeypatch):
    ops = {"first_broken": _op("first_broken", _broken), "second_fine": _op("second_fine", lambda x: x * 2)}
    monkeypatch.setattr(runner, "registry", lambda: ops)
    monkeypatch.setattr(harness, "measure_roofline", lambda device: dict(copy_gbps=1.0, bf16_tflops=1.0))
    monkeypatch.setattr(harness, "env_device", lambda: torch.device("cpu"))
    return ops


def test_runner_goes_past_a_failing_op(fake_ops, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    assert runner.main(["--shapes", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "FAILED first_broken: RuntimeError: kernel exploded" in out
    assert "second_fine on" in out and "1 of 2 benchmarks failed" in out
    saved = list(tmp_path.rglob("*.json"))
    assert [p.name for p in saved] == ["second_fine.json"]          # the op after the failure was measured


def test_runner_all_fine_exits_zero(fake_ops, capsys):
    assert runner.main(["second_fine", "--shapes", "smoke", "--no-save"]) == 0


def test_trimmed_shapes():
    op = BenchOp(name="x", shapes={"nemotron": [(1,), (2,), (3,), (4,), (5,)]}, make_inputs=None, impls={}, peers=(),
                 bytes=None)
    assert harness.shapes_for(op, "trimmed") == [(1,), (2,), (3,)]
    assert harness.shapes_for(op, "sweep") is None
    op.shapes["trimmed"] = [(5,)]
    assert harness.shapes_for(op, "trimmed") == [(5,)]
    from bench.registry import registry
    ops = registry()
    for name in ("nvfp4_linear", "moe_experts", "ssd_scan", "selective_state_update"):
        shapes = harness.shapes_for(ops[name], "trimmed")
        assert shapes and len(shapes) <= 12, name


def test_model_bench_emits_each_row(tmp_path, monkeypatch):
    seen = []
    doc = bench_model.run("tiny", None, ["reference"], ["eager"], [8], [8, 16], 1, None, torch.device("cpu"),
                          emit=lambda d: seen.append(len(d["rows"])))
    assert seen == [1, 2, 3] and len(doc["rows"]) == 3 and "partial" not in doc
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    path = bench_model._save(doc)
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
