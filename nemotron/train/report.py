"""The training report: evaluate finished runs, ship the demo checkpoints, write the logs and the plot.

    python -m nemotron.train.report --runs RUNS_DIR [--ship] [--docs docs/training]

``RUNS_DIR`` holds one directory per run, as ``nemotron train --out RUNS_DIR/NAME`` writes them. Every
finished run (one with ``model/``) is evaluated on the full held-out split (:func:`loop.evaluate`).
Written:

  DOCS/results.json        per run: its arguments, training time and throughput, held-out loss,
                           bits per byte, MTP acceptance; the corpus manifest (Python version, file
                           digests); the command that reproduces the run
  DOCS/logs/NAME.jsonl     each run's log (floats to 6 significant digits)
  DOCS/loss_curves.png     training loss per step of every run (needs matplotlib)

``--merge`` keeps the evaluations an earlier call wrote to DOCS/results.json. With ``--ship`` the runs named ``nvfp4`` and ``bf16`` are copied into the package
(``nemotron/model/assets/stdlib-tiny-{nvfp4,bf16}``, see :func:`nemotron.model.demo_checkpoint`) with
``assets/results.json``, the numbers the tests check the shipped models against.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional

from . import data as d
from . import loop

SHIPPED = ("nvfp4", "bf16")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "assets")


def _records(log_path: str) -> tuple[dict, list]:
    """(the first start record, the step records of the final history) of a run's log.jsonl."""
    start, steps = None, {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("event") == "start":
                start = start or r
            else:
                steps[r["step"]] = r
    if start is None:
        raise ValueError(f"log_path: {log_path} has no start record")
    return start, [steps[k] for k in sorted(steps)]


def command(start: dict, name: str) -> str:
    """The command line that reproduces a run from its log's start record."""
    return (f"OMP_NUM_THREADS=1 python -m nemotron train --out runs/{name} --recipe {start['recipe']} "
            f"--steps {start['steps']} --seed {start['seed']} --batch-size {start['batch_size']} "
            f"--seq-len {start['seq_len']} --lr {start['lr']:g}")


def evaluate_run(run_dir: str, name: str, *, max_tokens: Optional[int] = None) -> dict:
    """A finished run's arguments, throughput and held-out evaluation."""
    start, steps = _records(os.path.join(run_dir, loop.LOG))
    if not steps or steps[-1]["step"] != start["steps"]:
        raise ValueError(f"run_dir: {run_dir} has not finished ({steps[-1]['step'] if steps else 0} of "
                         f"{start['steps']} steps)")
    model_dir = os.path.join(run_dir, loop.MODEL_DIR)
    heldout, bpt = loop.stdlib_heldout(model_dir, os.path.join(run_dir, "data"))
    ev = loop.evaluate(model_dir, heldout, max_tokens=max_tokens, bytes_per_token=None if max_tokens else bpt)
    tail = steps[-50:]
    return {"recipe": start["recipe"], "seed": start["seed"], "steps": start["steps"],
            "tokens_trained": start["steps"] * start["batch_size"] * start["seq_len"],
            "params": start["params"], "compute": start["compute"],
            "train_minutes": steps[-1]["elapsed"] / 60,
            "train_tokens_per_s": sum(r["tokens_per_s"] for r in steps) / len(steps),
            "final_train_loss_50": sum(r["loss"] for r in tail) / len(tail),
            "heldout": ev, "command": command(start, name)}


def _round(v):
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v


def copy_log(run_dir: str, out_path: str) -> None:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(os.path.join(run_dir, loop.LOG), encoding="utf-8") as f, open(out_path, "w", encoding="utf-8") as g:
        for line in f:
            g.write(json.dumps({k: _round(v) for k, v in json.loads(line).items()}) + "\n")


def plot(runs: dict, path: str, *, smooth: int = 25) -> None:
    """Training loss (mean over ``smooth`` steps) against step, one line per run; the runs of the
    longest schedule on the left, the shorter (ablation) schedule on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_len: dict = {}
    for name, run_dir in runs.items():
        start, steps = _records(os.path.join(run_dir, loop.LOG))
        by_len.setdefault(start["steps"], []).append((name, steps))
    lengths = sorted(by_len, reverse=True)
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.5), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for name, steps in sorted(by_len[n]):
            loss = [r["loss"] for r in steps]
            xs = [r["step"] for r in steps][smooth - 1:]
            ys = [sum(loss[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(loss))]
            ax.plot(xs, ys, label=name, lw=1.2)
        ax.set_title(f"stdlib-tiny, {n} steps of 8 x 256 tokens")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (nats/token, mean of {smooth} steps)")
        lo = min(min(r["loss"] for r in s[-smooth:]) for _, s in by_len[n])
        ax.set_ylim(lo - 0.2, lo + 2.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ship(runs: dict, results: dict, assets: str = ASSETS) -> None:
    """Copy the ``nvfp4`` and ``bf16`` runs' models into the package, with their results."""
    for kind in SHIPPED:
        dst = os.path.join(assets, f"stdlib-tiny-{kind}")
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(runs[kind], loop.MODEL_DIR), dst)
    with open(os.path.join(assets, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"corpus": results["corpus"], "runs": {k: results["runs"][k] for k in SHIPPED}}, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nemotron.train.report", description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="the directory holding one directory per run")
    p.add_argument("--docs", default=os.path.join("docs", "training"))
    p.add_argument("--ship", action="store_true", help="copy the nvfp4 and bf16 runs into the package")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N held-out tokens only")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs DOCS/results.json already holds; evaluate only the others")
    a = p.parse_args(argv)
    runs = {n: os.path.join(a.runs, n) for n in sorted(os.listdir(a.runs))
            if os.path.isdir(os.path.join(a.runs, n, loop.MODEL_DIR))}
    if not runs:
        p.error(f"--runs: no finished runs (directories with {loop.MODEL_DIR}/) in {a.runs}")
    results = {"corpus": d.manifest(), "runs": {}}
    old = os.path.join(a.docs, "results.json")
    if a.merge and os.path.exists(old):
        with open(old, encoding="utf-8") as f:
            kept = json.load(f)
        if kept["corpus"] != results["corpus"]:
            p.error(f"--merge: {old} was measured on another corpus (Python {kept['corpus']['python']})")
        results["runs"] = {k: v for k, v in kept["runs"].items() if k in runs}
    for name, run_dir in runs.items():
        if name in results["runs"]:
            continue
        results["runs"][name] = evaluate_run(run_dir, name, max_tokens=a.max_tokens)
        copy_log(run_dir, os.path.join(a.docs, "logs", f"{name}.jsonl"))
        h = results["runs"][name]["heldout"]
        print(f"{name:22s} held-out loss {h['loss']:.4f}  bits/byte {h['bits_per_byte']:.4f}  "
              f"MTP k=1 {h['mtp_acceptance_k1']:.3f}  k=3 {h['mtp_acceptance_k3']:.3f}", flush=True)
    os.makedirs(a.docs, exist_ok=True)
    results["runs"] = dict(sorted(results["runs"].items()))
    with open(old, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    plot(runs, os.path.join(a.docs, "loss_curves.png"))
    if a.ship:
        missing = [k for k in SHIPPED if k not in runs]
        if missing:
            p.error(f"--ship: no finished run named {missing} in {a.runs}")
        ship(runs, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
