"""Deterministic run folders and a scripted fake training child for the TUI tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

T0 = 1_764_000_000.0  # fixed clock: durations in snapshots never change


def make_run(root: Path, name: str, method: str, status: str, steps: int, done: int, **extra) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "model": {"model": "smollm2-135m", "quantize": "auto", "trust_remote_code": False},
        "data": {"data": "assets/sft", "batch_size": 4, "max_seq_len": 512},
        "train": {"steps": steps, "learning_rate": 1e-4},
        "method": method,
    }
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "status.json").write_text(json.dumps({"status": status, "step": done, "steps": steps, "pid": 1, **extra}))
    lines = []
    for s in range(1, done + 1):
        row = {
            "event": "step",
            "step": s,
            "loss": 2.0 * math.exp(-s / 10) + 0.3,
            "lr": 1e-4 * min(1.0, s / 5),
            "tokens_per_s": 150.0 + 10 * math.sin(s),
            "peak_memory_mb": 900.0 + s,
            "step_time_s": 1.5,  # 0.5 s a step is spent outside the steps: not training time
            "time": T0 + 2.0 * s,
        }
        if method == "dpo":
            row.update(
                margin=0.05 * s, accuracy=min(1.0, 0.5 + 0.03 * s), rewards_chosen=0.02 * s, rewards_rejected=-0.03 * s
            )
        if method == "grpo":
            row.update(
                reward_mean=0.2 + 0.02 * s,
                reward_std=0.1,
                kl=0.001 * s,
                clip_fraction=0.05,
                completion_len_mean=40 + s,
                completion_len_max=60 + s,
                **{"reward/correct": 0.1 + 0.02 * s, "reward/format": 0.5},
            )
            row.pop("loss")
        lines.append(row)
        if s % 5 == 0:
            lines.append(
                {"event": "eval", "step": s, "val_loss": 2.0 * math.exp(-s / 12) + 0.35, "time": T0 + 2.0 * s + 1}
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if done:
        ck = run / "checkpoints" / f"step-{done:08d}"
        ck.mkdir(parents=True)
        (ck / "manifest.json").write_text("{}")
    return run


def make_runs(root: Path) -> Path:
    """Four runs covering every status the listing shows (pid 1 is never ours: 'running' would
    be alive, so no run here claims to be running)."""
    make_run(root, "20261125-090000-sft", "sft", "finished", 20, 20)
    make_run(root, "20261125-100000-dpo", "dpo", "interrupted", 30, 12)
    make_run(root, "20261125-110000-grpo", "grpo", "failed", 40, 8, error="E402: 5 non-finite steps in a row (step 8)")
    make_run(root, "20261125-120000-quick", "sft", "finished", 10, 10)
    return root


FAKE_CHILD = r"""
import json, os, sys, time
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
os.makedirs(run_dir, exist_ok=True)
def emit(e):
    print(json.dumps(e), flush=True)
emit({"event": "start", "method": "sft", "run_dir": run_dir, "model": "fake", "backend": "mlx",
      "resumed_from_step": 0, "steps": 10, "train_rows": 4, "valid_rows": 0, "trainable_params": 1,
      "total_params": 2, "load_time_s": 0.0, "blas": "fake", "memory_estimate_mb": 1.0, "data": {}})
for s in (1, 2, 3):
    emit({"event": "step", "step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 10,
          "trained_tokens": 5, "tokens_per_s": 100.0, "step_time_s": 0.1, "peak_memory_mb": 10.0,
          "epoch": 0, "skipped": False, "bad_steps": 0})
print("fatal: simulated native crash", file=sys.stderr, flush=True)
os.abort()
"""


def write_pipeline(folder: Path, status: str, stages: list[tuple[str, str, str | None]], report: bool = False) -> None:
    """pipeline.json in the shape mlxpt/pipeline/run.py writes: (kind, status, run folder name)
    per stage; with `report`, report/report.md and a summary.json as report.py writes them."""
    state = {
        "name": "demo", "recipe_file": "recipes/demo.yaml", "recipe_hash": "abc123", "recipe": "name: demo\n",
        "created": "2026-11-25T13:00:00", "updated": "2026-11-25T13:10:00", "status": status,
        "stages": [
            {"stage": i, "kind": kind, "status": st, "run": run, **({"seconds": 60.0 * i} if st == "finished" else {})}
            for i, (kind, st, run) in enumerate(stages, 1)
        ],
    }  # fmt: skip
    if report:
        state["report"] = "report/report.md"
        out = folder / "report"
        out.mkdir(exist_ok=True)
        (out / "report.md").write_text("# Pipeline `demo`\n")
        acc = [
            {"eval_stage": 3, "model": m, "run": run, "data": d, "accuracy": a, "correct": int(a * 20), "total": 20}
            for m, run, d, a in (
                ("base", None, "gsm/test", 0.25), ("base", None, "ood/test", 0.40),
                ("1-sft", stages[0][2], "gsm/test", 0.45), ("1-sft", stages[0][2], "ood/test", 0.35),
            )
        ]  # fmt: skip
        summary = {"name": "demo", "recipe_hash": "abc123", "stages": state["stages"], "accuracy": acc}
        (out / "summary.json").write_text(json.dumps(summary))
    tmp = folder / "pipeline.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "pipeline.json")


def make_pipeline(root: Path, status: str = "running") -> Path:
    """A pipeline folder (sft, then dpo, then eval) beside its stage runs: the sft stage finished,
    the dpo stage running at step 12/30 (the caller holds the folder's lock for a live one)."""
    make_run(root, "20261125-130100-demo-1-sft", "sft", "finished", 20, 20)
    make_run(root, "20261125-130500-demo-2-dpo", "dpo", "interrupted", 30, 12)
    folder = root / "20261125-130000-pipeline-demo"
    folder.mkdir(parents=True)
    write_pipeline(folder, status, [("sft", "finished", "20261125-130100-demo-1-sft"),
                                    ("dpo", status, "20261125-130500-demo-2-dpo"), ("eval", "pending", None)])  # fmt: skip
    return folder
