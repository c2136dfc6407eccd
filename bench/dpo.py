"""DPO on the default model and the bundled preference data: held-out preference accuracy of the
implicit reward before and after training (the issue's must-show number), step time, peak memory.

Usage: python bench/dpo.py [--train 200] [--valid 100] [--steps 40] [--lr 5e-4] [--beta 0.1]
Too slow for a test on a 2-core CPU (the reference pass and each step run the 135M model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxpt.config import DPOConfig, apply_flat  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=200, help="first N pairs of assets/pref/train.jsonl")
    ap.add_argument("--valid", type=int, default=100, help="first N pairs of assets/pref/valid.jsonl")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", default="sigmoid")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)
    from mlxpt.train.dpo import run_dpo

    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    for split, n in (("train", args.train), ("valid", args.valid)):
        lines = (ROOT / "assets" / "pref" / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]
        (tmp / f"{split}.jsonl").write_text("".join(lines))
    cfg = DPOConfig()
    settings = {
        "model": args.model, "data": str(tmp), "runs_dir": str(tmp / "runs"), "steps": args.steps,
        "learning_rate": args.lr, "beta": args.beta, "loss_type": args.loss_type, "batch_size": args.batch_size,
        "warmup_steps": 2, "eval_every": max(1, args.steps // 2), "eval_batches": -1, "save_every": args.steps,
    }  # fmt: skip
    apply_flat(cfg, settings, source="bench")
    t0 = time.time()
    events: list[dict] = []

    def emit(e: dict) -> None:
        events.append(e)
        if e["event"] in ("reference", "eval") or (e["event"] == "step" and e["step"] % 5 == 0):
            keep = ("event", "step", "loss", "accuracy", "margin", "val_loss", "val_accuracy", "status")
            print(f"{time.time() - t0:7.1f}s", {k: e[k] for k in keep if k in e}, flush=True)

    t_ref = {}
    run_dir, _ = run_dpo(cfg, emit=lambda e: (t_ref.setdefault(e["event"], time.time()), emit(e)))
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    result = {
        "settings": settings,
        "val_accuracy": {e["step"]: e["val_accuracy"] for e in evals},
        "val_margin": {e["step"]: e["val_margin"] for e in evals},
        "step_time_s_median": statistics.median(e["step_time_s"] for e in steps[2:] or steps),
        "peak_memory_mb": max(e["peak_memory_mb"] for e in steps),
        "load_and_reference_s": t_ref.get("reference", t0) - t0,
        "total_s": time.time() - t0,
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
