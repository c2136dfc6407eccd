"""DPO step time and memory: mlx-lm-lora (`--train-mode dpo`) vs `mlxpt train dpo`, side by side.

Both train the same float32 copy of the default model (bench/sft.py's `float_model`) on the same
first N bundled preference pairs (with their system prompts), batch 4 pairs, the same sequence
cap, LoRA rank 8 / scale 2 on all linear layers of the last 16 blocks, Adam, beta 0.1, sigmoid
loss, with the same OpenBLAS (mlxpt's `_blas.activate()` runs first in both processes).
mlx-lm-lora lives in its own venv (it pins its own versions; never in pyproject):

    python3.11 -m venv /tmp/mlxlora-venv && /tmp/mlxlora-venv/bin/pip install mlx-lm-lora cmeel-openblas

mlx-lm-lora 5.10.2 calls a Metal-only `mx.device_info()` field in DPO; the child patches it in
(and makes `mx.set_wired_limit` a no-op) before training: the same CPU workaround as PEERS.md.

What differs by design: mlx-lm-lora runs a second model copy as the reference, with two extra
forward passes per step, and separate chosen and rejected passes; mlxpt computes the reference
log-probs once before step 1 (reported separately as part of `load_s`) and runs chosen and
rejected as one concatenated pass, each prompt run once per pair (shared-prompt scoring);
`mlxpt-plain` is mlxpt with `--plain-scoring` (each prompt twice, whole rows), run beside them
to show what the shared prompt gives. Step time excludes the first `--warmup` steps of each run;
`reference_s` is mlxpt's one-off reference pass (its last progress event).

    .venv/bin/python bench/dpo_peer.py [--repeats 2] [--steps 12] [--pairs 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sft import float_model  # noqa: E402

PY = sys.executable

_PEER = r"""
import json, os, sys, time
from mlxpt import _blas  # stdlib only: loads OpenBLAS before mlx, as `mlxpt train` does
blas = _blas.activate()
import mlx.core as mx
_info = mx.device_info
mx.device_info = lambda: {**_info(), "max_recommended_working_set_size": 0}
mx.set_wired_limit = lambda *a, **k: 0
print("BENCH " + json.dumps({"event": "start", "blas": blas, "t": time.time()}), flush=True)
from mlx_lm_lora.train import main
sys.argv = ["mlx_lm_lora.train"] + sys.argv[1:]
main()
print("BENCH " + json.dumps({"event": "done", "t": time.time()}), flush=True)
"""

ITER = re.compile(r"Iter (\d+): loss ([\d.]+).*?it/s ([\d.]+), tok/s ([\d.]+), peak_mem ([\d.]+)GB")


def run(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, list[str], float, float]:
    """(exit code, stdout lines, peak RSS MB of this child alone, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        lines = [line.rstrip("\n") for line in p.stdout]
        _, status, ru = os.wait4(p.pid, 0)
        timer.cancel()
        err.write("\n--- stdout ---\n" + "\n".join(lines[-60:]))
    return os.waitstatus_to_exitcode(status), lines, ru.ru_maxrss / 1024, time.perf_counter() - t0


def peer_cmd(a, f32: Path, data: Path, tmp: Path, tag: str) -> list[str]:
    cfg = tmp / "peer.yaml"
    cfg.write_text("lora_parameters:\n  rank: 8\n  scale: 2.0\n  dropout: 0.0\nfuse: false\n")
    return ["/tmp/mlxlora-venv/bin/python" if a.peer_python is None else a.peer_python, "-c", _PEER,
            "--model", str(f32), "--train", "--train-mode", "dpo", "--train-type", "lora", "--data", str(data),
            "-c", str(cfg), "--optimizer", "adam", "--batch-size", str(a.batch_size), "--iters", str(a.steps),
            "--num-layers", str(a.num_layers), "--max-seq-length", str(a.max_seq_len),
            "--learning-rate", str(a.learning_rate), "--beta", str(a.beta), "--dpo-cpo-loss-type", "sigmoid",
            "--steps-per-report", "1", "--val-batches", "1", "--steps-per-eval", "100000",
            "--save-every", "100000", "--adapter-path", str(tmp / f"peer-{tag}"), "--seed", "0"]  # fmt: skip


def mlxpt_cmd(a, f32: Path, data: Path, tmp: Path, tag: str, plain: bool = False) -> list[str]:
    return [PY, "-m", "mlxpt.cli", "train", "dpo", "--events", "json", "--model", str(f32), "--quantize", "none",
            "--data", str(data), "--batch-size", str(a.batch_size), "--max-seq-len", str(a.max_seq_len),
            "--num-layers", str(a.num_layers), "--rank", "8", "--alpha", "16", "--targets", "all",
            "--steps", str(a.steps), "--learning-rate", str(a.learning_rate), "--optimizer", "adam",
            "--clip-grad-norm", "0", "--schedule", "constant", "--warmup-steps", "0", "--beta", str(a.beta),
            "--eval-every", "0", "--eval-batches", "0", "--save-every", "100000",
            "--runs-dir", str(tmp / "runs"), "--name", tag, "--seed", "0"] + ["--plain-scoring"] * plain  # fmt: skip


def summarise(tool: str, lines: list[str], warmup: int) -> dict:
    times, peaks, losses, extra = [], [], [], {}
    for line in lines:
        s = line[6:] if line.startswith("BENCH ") else line
        if tool.startswith("mlxpt") and s.startswith("{"):
            e = json.loads(s)
            if e["event"] == "step":
                times.append(e["step_time_s"])
                peaks.append(e["peak_memory_mb"])
                losses.append(e["loss"])
            elif e["event"] == "start":
                extra = {**extra, "load_s": e["load_time_s"], "blas": e["blas"]}
            elif e["event"] == "reference" and e["status"] == "computing":
                extra = {**extra, "reference_s": e["elapsed_s"]}
        elif tool == "mlx-lm-lora":
            if s.startswith("{"):
                e = json.loads(s)
                if e["event"] == "start":
                    extra = {"blas": e["blas"]}
            elif m := ITER.search(s):
                times.append(1.0 / float(m.group(3)))
                peaks.append(float(m.group(5)) * 1000)
                losses.append(float(m.group(2)))
    measured = times[warmup:] or times
    return {
        "steps": len(times),
        "s_per_step_median": statistics.median(measured) if measured else None,
        "s_per_step_min": min(measured) if measured else None,
        "mx_peak_mb": max(peaks) if peaks else None,
        "loss_first_last": (losses[0], losses[-1]) if losses else None,
        **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=48, help="first N pairs of assets/pref/train.jsonl")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--peer-python", default=None, help="python of the mlx-lm-lora venv")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    f32 = float_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-peer-"))
    rows = (ROOT / "assets" / "pref" / "train.jsonl").read_text().splitlines()[: a.pairs]
    ours, theirs = tmp / "data-mlxpt", tmp / "data-peer"
    for d in (ours, theirs):
        d.mkdir()
        (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    # mlx-lm-lora requires a validation file (one batch is evaluated at iteration 1, timed apart)
    valid = (ROOT / "assets" / "pref" / "valid.jsonl").read_text().splitlines()[: a.batch_size]
    (theirs / "valid.jsonl").write_text("\n".join(valid) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLXPT_BLAS", None)
    results = []
    for rep in range(a.repeats):
        tools = ("mlx-lm-lora", "mlxpt", "mlxpt-plain")
        for tool in tools if rep % 2 == 0 else tools[::-1]:  # interleaved
            tag = f"{tool}-{rep}"
            if tool == "mlx-lm-lora":
                cmd = peer_cmd(a, f32, theirs, tmp, tag)
            else:
                cmd = mlxpt_cmd(a, f32, ours, tmp, tag, plain=tool == "mlxpt-plain")
            rc, lines, rss, wall = run(cmd, env, a.timeout, tmp / f"{tag}.log")
            r = {
                "tool": tool,
                "repeat": rep,
                "rc": rc,
                "peak_rss_mb": rss,
                "wall_s": wall,
                **summarise(tool, lines, a.warmup),
            }
            results.append(r)
            print(json.dumps(r), flush=True)
            if rc != 0:
                print(f"{tool} failed (exit {rc}); see {tmp / f'{tag}.log'}", file=sys.stderr)
    by = {
        t: [r for r in results if r["tool"] == t and r["rc"] == 0 and r["s_per_step_median"]]
        for t in ("mlxpt", "mlxpt-plain", "mlx-lm-lora")
    }
    for ours_, theirs_ in (("mlxpt", "mlx-lm-lora"), ("mlxpt-plain", "mlx-lm-lora"), ("mlxpt", "mlxpt-plain")):
        if by[ours_] and by[theirs_]:
            ratios = [
                m["s_per_step_median"] / p["s_per_step_median"] for m, p in zip(by[ours_], by[theirs_], strict=False)
            ]
            print(f"{ours_} / {theirs_} step time per repeat: {', '.join(f'{x:.2f}x' for x in ratios)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "float_model": str(f32), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
