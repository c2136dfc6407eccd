"""SFT throughput side by side: `mlxpt train sft`, `mlx_lm.lora` and TRL's `SFTTrainer`.

All three train the same float32 copy of the default model (SmolLM2-135M, made once by
bench/sft.py's `float_model`) on the bundled chat data, loss on every token, batch 4, max
length 256, LoRA r=8 alpha=16 on all 7 linear projections of the last 16 blocks, Adam with
bias correction (torch's `adamw_torch` with weight decay 0; mlx-lm with
`bias_correction: true`), constant lr 1e-4, no gradient clipping, the same BLAS thread count
(`--threads`, exported as OMP/OPENBLAS/MKL_NUM_THREADS to every child). Tools run interleaved
(the order rotates every repeat); each run is a child process whose peak RSS comes from `wait4`.

Tools: `mlx-lm` (mlx_lm.lora, mlxpt's OpenBLAS swap applied first, as bench/sft.py's
"same-blas"), `mlxpt` (packing on, the default), `mlxpt-padded` (packing off), `mlxpt-ranks`
(`--ranks THREADS`: data-parallel, one process of one BLAS thread per core, the same global
batch; its peak RSS is one rank's, and every rank holds a copy of the model), `trl` (TRL
1.16 + PEFT on torch CPU, gradient checkpointing off like the mlx tools, no packing: TRL's
default; the peers harness's hooks/trl_inner.py).

Throughput counts real next-token targets only (row length - 1; no padding, no extra pad
target) over the steps after `--warmup`: mlxpt reports them; mlx-lm's count has one extra per row
(bench/sft.py removes it); TRL's `attention_mask.sum()` counts whole rows (one more than targets).

The TRL venv is the peers harness's (`/tmp/venv-trl`, pinned as in ../shared/peers/setup_envs.sh),
created by this script if it is missing, never by `make setup`.

    .venv/bin/python bench/sft_peers.py [--steps 20] [--repeats 2] [--tools mlxpt,mlx-lm,trl]
                                        [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import ROOT, float_model, machine, run_child, source, summarise, versions  # noqa: E402
from sft import commands as sft_commands  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
TRL_VENV = Path(os.environ.get("VENV_TRL", "/tmp/venv-trl"))
# as ../shared/peers/setup_envs.sh pins them; torch first and alone (the CPU wheel)
TRL_PINS = [["torch==2.13.0"], ["torch==2.13.0", "trl==1.16.0", "peft==0.21.2", "transformers==5.24.0",
                                "datasets==5.2.0", "accelerate==1.15.0"]]  # fmt: skip
TOOLS = ("mlx-lm", "mlxpt", "mlxpt-padded", "mlxpt-ranks", "trl")


def trl_python() -> Path:
    """The TRL venv's python, created with the harness's pins if missing."""
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {TRL_VENV} (pinned TRL/torch CPU, takes minutes) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        for pins in TRL_PINS:
            subprocess.run([str(TRL_VENV / "bin" / "pip"), "install", "-q", *pins], check=True)
    return py


def trl_command(args: list[str], python_args: list[str] | None = None) -> tuple[list[str], dict]:
    """(command, env) of the harness's hooks/trl_inner.py in the TRL venv with `args`; `python_args`
    go before the script (e.g. `-c CODE` that patches TRL, then runs it). Its JSON lines are tagged
    "BENCHJSON ": the shell untags them, and wait4 on the shell still sees the trainer's peak RSS."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    inner = [str(trl_python()), *(python_args or []), str(PEERS / "hooks" / "trl_inner.py"), *args]
    return ["sh", "-c", " ".join(f"'{x}'" for x in inner) + " | sed -u 's/^BENCHJSON //'"], env


def with_threads(env: dict, threads: int) -> dict:
    """`env` with every BLAS/OpenMP thread count set to `threads` (the same for every tool)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def command(tool: str, a, f32: Path, tmp: Path, tag: str) -> tuple[list[str], dict]:
    if tool == "trl":
        cmd, env = trl_command(["--mode", "sft", "--model", str(f32), "--data", str(a.data), "--out", str(tmp / tag),
                                "--iters", str(a.steps), "--batch", str(a.batch_size), "--max-seq", str(a.max_seq_len),
                                "--lr", str(a.learning_rate), "--num-layers", str(a.num_layers),
                                "--gradient-checkpointing", "off"])  # fmt: skip
    else:
        cmd, env = sft_commands("same-blas", "mlxpt" if tool.startswith("mlxpt") else "mlx-lm", a, f32, tmp, tag)
        if tool == "mlx-lm":  # Adam with bias correction, like torch and mlxpt
            (tmp / "lora.yaml").write_text(
                f"lora_parameters:\n  rank: {a.rank}\n  scale: {a.alpha / a.rank}\n  dropout: 0.0\n"
                "optimizer: adam\noptimizer_config:\n  adam:\n    bias_correction: true\n"
            )
        if tool.startswith("mlxpt"):  # no forgetting monitor: the other tools generate nothing either
            cmd += ["--regression-data", "none"]
        if tool == "mlxpt-padded":
            (tmp / "padded.yaml").write_text("packing: false\n")
            cmd += ["--config", str(tmp / "padded.yaml")]
        if tool == "mlxpt-ranks":  # the same cores as one process of `threads` BLAS threads
            return cmd + ["--ranks", str(a.threads)], with_threads(env, 1)
    return cmd, with_threads(env, a.threads)


def summarise_trl(events: list[dict], warmup: int, batch: int, rows: int = 1) -> dict:
    """bench/sft.py's summary fields from trl_inner.py's step lines (attention_mask sums: row
    lengths, one more than the next-token targets of each of the `rows` rows per example)."""
    losses = {e["step"]: e["loss"] for e in events if e.get("kind") == "log" and "loss" in e}
    steps = [
        {"step": e["step"], "loss": losses.get(e["step"]), "time": e["dt"], "raw": e["tokens"],
         "norm": e["tokens"] - rows * batch, "peak_mb": 0.0}
        for e in events if e.get("kind") == "step" and e.get("tokens")
    ]  # fmt: skip
    meas = [s for s in steps if s["step"] > warmup]
    if not meas:
        return {"steps": steps, "measured": 0}
    t = sum(s["time"] for s in meas)
    return {
        "steps": steps,
        "measured": len(meas),
        "tok_s": sum(s["norm"] for s in meas) / t,
        "s_step_median": statistics.median(s["time"] for s in meas),
        "tokens_per_seq": sum(s["norm"] for s in meas) / (batch * len(meas)),
        "s_step_min": min(s["time"] for s in meas),
        "final_loss": next((s["loss"] for s in reversed(steps) if s["loss"] is not None), None),
        "padded_positions": sum(e.get("padded_tokens") or 0 for e in events if e.get("kind") == "step"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", default="mlx-lm,mlxpt,trl", help=f"comma-separated, from {', '.join(TOOLS)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of throughput")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "assets" / "sft"))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", help="write every run's numbers here (after each run)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    a = ap.parse_args()
    a.oob_steps = a.steps  # bench/sft.py's commands() reads it
    tools = [t for t in a.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool {bad[0]!r}; choose from {', '.join(TOOLS)}")
    f32 = float_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="mlxpt-bench-peers-"))
    runs = []
    try:
        for r in range(a.repeats):
            order = tools[r % len(tools) :] + tools[: r % len(tools)]  # rotate: interleaved
            for tool in order:
                tag = f"{tool}-{r}"
                cmd, env = command(tool, a, f32, tmp, tag)
                load = os.getloadavg()[0]
                print(f"[{time.strftime('%H:%M:%S')}] {tag} (load {load:.2f}) ...", file=sys.stderr, flush=True)
                rc, events, rss, wall = run_child(cmd, env, a.timeout, tmp / f"{tag}.log")
                if tool == "trl":
                    s = summarise_trl(events, a.warmup, a.batch_size)
                else:
                    s = summarise("mlxpt" if tool.startswith("mlxpt") else "mlx-lm", events, a.warmup, a.batch_size)
                run = {"tool": tool, "repeat": r, "rc": rc, "rss_mb": rss, "wall_s": wall, "load_before": load, **s}
                runs.append(run)
                if a.json:
                    Path(a.json).write_text(json.dumps({"meta": meta(a, f32), "runs": runs}, indent=1))
                if rc != 0 or not s.get("measured"):
                    print(f"  FAILED (exit {rc}); log: {tmp / f'{tag}.log'}", file=sys.stderr)
                    print((tmp / f"{tag}.log").read_text()[-3000:], file=sys.stderr)
                    a.keep = True
                else:
                    print(f"  {s['tok_s']:.0f} tok/s, {s['s_step_median']:.2f} s/step, RSS {rss:.0f} MB, {wall:.0f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if a.keep:
            print(f"scratch kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(runs, a, f32, tools)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def meta(a, f32: Path) -> dict:
    return {"machine": machine(), "versions": versions(), "source": source(), "args": vars(a), "float_model": str(f32)}


def report(runs: list[dict], a, f32: Path, tools: list[str]) -> None:
    print(f"\nSFT, {a.model} as float32 ({f32.name}), batch {a.batch_size}, max len {a.max_seq_len}, LoRA r={a.rank} "
          f"alpha={a.alpha:g} on all linears of the last {a.num_layers} blocks, Adam (bias-corrected) lr "
          f"{a.learning_rate:g}, no clipping, {a.threads} threads, {a.steps} steps ({a.warmup} warm-up excluded); "
          f"mlxpt from {source()}\n")  # fmt: skip
    print("| tool | repeat | tok/s (real targets) | s/step (median) | peak RSS MB | load before | loss @ last |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        if not r.get("measured"):
            print(f"| {r['tool']} | {r['repeat']} | failed (exit {r['rc']}) | | | | |")
            continue
        loss = "–" if r.get("final_loss") is None else f"{r['final_loss']:.3f}"
        print(f"| {r['tool']} | {r['repeat']} | {r['tok_s']:.0f} | {r['s_step_median']:.2f} | {r['rss_mb']:.0f} "
              f"| {r['load_before']:.2f} | {loss} |")  # fmt: skip
    if "mlxpt" in tools:
        print_ratios(runs, tools, a.repeats, "tok_s", "tok/s")


def print_ratios(runs: list[dict], tools: list[str], repeats: int, key: str, unit: str) -> None:
    """A markdown table: mlxpt's `key` over each other tool's, per repeat, and the peak RSS of both."""
    print(f"\n| vs | mlxpt / tool, {unit} per repeat | RSS MB mlxpt / tool |")
    print("|---|---|---|")
    for tool in [t for t in tools if t != "mlxpt"]:
        ratios, rss = [], []
        for rep in range(repeats):
            us = [r for r in runs if r["tool"] == "mlxpt" and r["repeat"] == rep and r.get("measured")]
            them = [r for r in runs if r["tool"] == tool and r["repeat"] == rep and r.get("measured")]
            if us and them:
                ratios.append(us[0][key] / them[0][key])
                rss.append(f"{us[0]['rss_mb']:.0f} / {them[0]['rss_mb']:.0f}")
        print(f"| {tool} | {', '.join(f'{x:.2f}' for x in ratios) or '–'} | {', '.join(rss) or '–'} |")


if __name__ == "__main__":
    sys.exit(main())
