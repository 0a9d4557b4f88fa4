"""The training report's log handling: the final history of a resumed log, the reproducing command,
the rounded log copy, the loss plot."""
import json

import pytest

from nemotron.train import report


def _log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


START = {"event": "start", "step": 0, "recipe": "nvfp4", "steps": 4, "batch_size": 8, "seq_len": 256, "lr": 0.003,
         "seed": 1, "params": 10, "device": "cpu", "compute": "x", "config": "ME"}


def _step(i, loss):
    return {"step": i, "lr": 0.003, "loss": loss, "mtp_loss": loss + 0.1, "grad_norm": 1.0, "tokens_per_s": 900.0,
            "elapsed": 2.0 * i}


def test_records_keep_the_last_history_of_each_step(tmp_path):
    # a run cut after step 3 and resumed from its step-2 checkpoint: step 3 is recorded twice
    _log(tmp_path / "log.jsonl", [START, _step(1, 5.0), _step(2, 4.0), _step(3, 3.5), {**START, "step": 2},
                                  _step(3, 3.25), _step(4, 3.0)])
    start, steps = report._records(str(tmp_path / "log.jsonl"))
    assert start["step"] == 0
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[2]["loss"] == 3.25


def test_records_need_a_start(tmp_path):
    _log(tmp_path / "log.jsonl", [_step(1, 5.0)])
    with pytest.raises(ValueError, match="log_path"):
        report._records(str(tmp_path / "log.jsonl"))


def test_command_reproduces_the_run():
    cmd = report.command(START, "nvfp4-seed1")
    assert "--out runs/nvfp4-seed1" in cmd and "--recipe nvfp4" in cmd and "--steps 4" in cmd and "--seed 1" in cmd


def test_copy_log_rounds_floats(tmp_path):
    (tmp_path / "run").mkdir()
    _log(tmp_path / "run" / "log.jsonl", [START, _step(1, 5.123456789)])
    report.copy_log(str(tmp_path / "run"), str(tmp_path / "out" / "a.jsonl"))
    lines = [json.loads(s) for s in (tmp_path / "out" / "a.jsonl").read_text().splitlines()]
    assert lines[0] == START and lines[1]["loss"] == 5.12346


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {}
    for name, steps in (("a", 60), ("b", 30)):
        (tmp_path / name).mkdir()
        _log(tmp_path / name / "log.jsonl", [{**START, "steps": steps}] + [_step(i, 6 - i / 20) for i in range(1, steps + 1)])
        runs[name] = str(tmp_path / name)
    report.plot(runs, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
