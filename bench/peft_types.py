"""Prefix tuning and bottleneck adapters beside LoRA: validation loss, step time and peak memory.

Each type trains the default model (SmolLM2-135M) on the bundled SFT data with `make run`'s
recipe (60 steps, learning rate 5e-4, 20 warm-up steps, batch 4, 16 adapted layers), as
`mlxpt train sft` child processes started together, so all of them see the same machine load
at the same time (this machine is shared; run them one after another on a quiet one with
--sequential). Deviations from the recipe: validation every 20 steps on 5 batches (20 of the
200 validation rows, so a run stopped by the budget still reports how far it got), the
forgetting monitor off (`--regression-data none`), and the prefix at learning rate 5e-3
(prefix tuning's usual larger rate; `--prefix-lr` changes it). The untuned model's
validation loss is LoRA's (and the adapter's) step-0 value: both start as the base.

Step time is the median over steps after the first 5; peak memory is MLX's own peak
(`peak_memory_mb` of the step reports) and the child's peak RSS (`os.wait4`). A wall-clock
budget (`--budget-min`, default 14) stops children that run past it with SIGINT (they save a
checkpoint) and reports the steps they reached.

    .venv/bin/python bench/peft_types.py [--steps 60] [--budget-min 14] [--sequential] [--json out.json]
    .venv/bin/python bench/peft_types.py --resume /tmp/peft-bench-XXXX [--only prefix adapter]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLXPT = [sys.executable, "-m", "mlxpt.cli"]
TYPES = {  # name: extra flags
    "lora": [],
    "prefix": ["--fine-tune-type", "prefix", "--prefix-length", "16"],
    "adapter": ["--fine-tune-type", "adapter", "--adapter-size", "16"],
}


def command(name: str, args, runs: Path) -> list[str]:
    if args.resume:  # continue a stopped session's runs (exact resume: as if never stopped)
        return [*MLXPT, "train", "--resume", str(next((runs / name).glob("*peft-*")))]
    lr = args.prefix_lr if name == "prefix" else "5e-4"
    return [
        *MLXPT, "train", "sft", *TYPES[name], "--steps", str(args.steps), "--learning-rate", lr,
        "--warmup-steps", "20", "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
        "--save-every", "30", "--regression-data", "none", "--runs-dir", str(runs / name), "--name", f"peft-{name}",
    ]  # fmt: skip


def _trainable(log: Path) -> str | None:
    """The trainable-parameter count the child printed at its start ("trainable 1.30M of ...")."""
    found = re.search(r"trainable (\S+) of", log.read_text(errors="replace")) if log.is_file() else None
    return found.group(1) if found else None


def summarise(name: str, runs: Path, rss_kb: int, wall: float, rc: int) -> dict:
    folder = next((runs / name).glob("*peft-*"), None)
    rows = []
    if folder is not None and (folder / "metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if r.get("event") == "step"]
    evals = [r for r in rows if r.get("event") == "eval" and "val_loss" in r]
    times = [r["step_time_s"] for r in steps[5:]] or [r["step_time_s"] for r in steps]
    return {
        "type": name,
        "exit": rc,
        "steps": len(steps),
        "val_loss_start": evals[0]["val_loss"] if evals else None,
        "val_loss_end": evals[-1]["val_loss"] if len(evals) > 1 else None,
        "val_loss_at": evals[-1]["step"] if evals else None,
        "step_time_s": statistics.median(times) if times else None,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in steps), default=None),
        "peak_rss_mb": rss_kb / 1024,
        "trainable": _trainable(runs / f"{name}.log"),
        "wall_s": wall,
    }


def run_all(names, args, runs: Path, budget: float, sequential: bool) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start, out, live = time.monotonic(), {}, {}
    queue = list(names)

    def launch(name):
        log = open(runs / f"{name}.log", "a")  # noqa: SIM115 - closed when the child is reaped
        p = subprocess.Popen(command(name, args, runs), cwd=ROOT, env=env, stdout=log, stderr=log)
        live[p.pid] = (name, p, time.monotonic(), log)

    while queue or live:
        while queue and (not sequential or not live):
            launch(queue.pop(0))
        if time.monotonic() - start > budget:
            for _, p, _, _ in live.values():
                p.send_signal(signal.SIGINT)
            budget = float("inf")  # once
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(1)
            continue
        name, p, t0, log = live.pop(pid)
        log.close()
        rc = os.waitstatus_to_exitcode(status)
        out[name] = summarise(name, runs, usage.ru_maxrss, time.monotonic() - t0, rc)
        print(json.dumps(out[name]), flush=True)
    return [out[n] for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--budget-min", type=float, default=14.0)
    ap.add_argument("--prefix-lr", default="5e-3")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=5, help="4-row validation batches per evaluation")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--only", nargs="*", choices=list(TYPES), default=list(TYPES))
    ap.add_argument("--resume", help="a stopped session's runs folder: resume its runs (--only picks which)")
    ap.add_argument("--json")
    args = ap.parse_args()
    runs = Path(args.resume) if args.resume else Path(tempfile.mkdtemp(prefix="peft-bench-"))
    print(f"runs in {runs}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = run_all(args.only, args, runs, args.budget_min * 60, args.sequential)
    base = next((r["val_loss_start"] for r in rows if r["type"] in ("lora", "adapter") and r["val_loss_start"]), None)
    print(f"\nuntuned model's validation loss: {base}")
    print("| type | steps | val loss (start -> end) | below untuned | step time (s) | peak MLX MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        below = "yes" if base is not None and r["val_loss_end"] is not None and r["val_loss_end"] < base else "no"
        print(
            f"| {r['type']} | {r['steps']} | {r['val_loss_start']} -> {r['val_loss_end']} | {below} | "
            f"{r['step_time_s']:.2f} | {r['peak_memory_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
            if r["step_time_s"] is not None
            else f"| {r['type']} | {r['steps']} | - | - | - | - | {r['peak_rss_mb']:.0f} |"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"untuned_val_loss": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
