"""Data-parallel SFT: tokens/s on 1 vs 2 ranks (`mlx.launch --backend ring` on loopback), the
gradient all-reduce's time and bytes per step, and a worked estimate for 2-8 Macs.

Both runs are `mlxpt train sft` on the bundled default model (SmolLM2-135M, LoRA) with the same
global batch, one BLAS thread per rank (OPENBLAS_NUM_THREADS=1), no validation. tokens/s is the
median over the steps after `--warmup`; the all-reduce numbers come from rank 0's "done" event
(one all_sum of a flat float32 buffer per step: the LoRA gradients, loss, weight and metrics).

The estimate: a fixed global batch split over N ranks costs T_c / N of compute per step (T_c:
the one-rank step time, stated below) plus the ring all-reduce, which moves 2(N-1)/N x B bytes
per rank and takes 2(N-1) latency hops: T_ar = 2(N-1)/N x B / bandwidth + 2(N-1) x latency.
Speed-up = T_c / (T_c / N + T_ar).

The 2-rank run goes through `python -m mlxpt.launch` (what `--ranks` runs: MLX's launcher with
its per-rank I/O threads waiting instead of spinning, mlxpt/launch.py); `--launchers mlx,mlxpt`
adds a run through `mlx.launch` itself, to show what its spinning threads cost. The launcher's
own CPU seconds (utime + stime, from /proc) are reported for each.

    .venv/bin/python bench/distributed.py [--steps 8] [--warmup 2] [--batch-size 4]
                                          [--max-seq-len 256] [--step-time S] [--json out.json]
                                          [--launchers mlxpt|mlx,mlxpt]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
LINKS = {  # name: (bytes/s, latency s)
    "Thunderbolt 5 (80 Gb/s, 5 us)": (80e9 / 8, 5e-6),
    "Thunderbolt 5 (80 Gb/s, 10 us)": (80e9 / 8, 10e-6),
    "10 GbE (10 Gb/s, 50 us)": (10e9 / 8, 50e-6),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of process `pid` (not its children), from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(ranks: int, args, runs: Path, launcher: str = "mlxpt") -> dict:
    argv = [sys.executable, "-m", "mlxpt.cli", "train", "sft", "--runs-dir", str(runs / f"r{ranks}-{launcher}"),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
            "--eval-batches", "0", "--regression-data", "none", "--save-every", "100000", "--events", "json"]  # fmt: skip
    if ranks > 1:
        start = [str(LAUNCH)] if launcher == "mlx" else [sys.executable, "-m", "mlxpt.launch"]
        argv = [*start, "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port()), "--", *argv]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    # a stdin that never has data nor ends: mlx.launch polls its stdin, and on /dev/null (always
    # readable) that poll spins a core the ranks need
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    used = [0.0]

    def watch() -> None:  # the launcher's CPU time, read until it exits
        while (t := cpu_seconds(proc.pid)) is not None and proc.poll() is None:
            used[0] = t
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    try:
        out, err = proc.communicate(timeout=args.timeout)
    finally:  # a timeout or a signal: the launcher and its ranks go too
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(r)
        os.close(w)
    p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    wall = time.perf_counter() - t0
    events = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    steps = [e for e in events if e["event"] == "step"][args.warmup :]
    done = next((e for e in events if e["event"] == "done"), None)
    if not steps or done is None:
        raise SystemExit(f"{ranks} ranks failed:\n{p.stderr[-3000:]}")
    out = {
        "ranks": ranks,
        "launcher": launcher if ranks > 1 else "-",
        "launcher_cpu_s": used[0] if ranks > 1 else 0.0,
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in steps),
        "step_time_s": statistics.median(e["step_time_s"] for e in steps),
        "tokens_per_step": statistics.median(e["tokens"] for e in steps),
        "wall_s": wall,
    }
    if ranks > 1:
        n = max(1, done["allreduces"])
        out["allreduce_s_per_step"] = done["allreduce_s"] / n
        out["allreduce_bytes_per_step"] = done["allreduce_bytes"] / n
    return out


def estimate(bytes_per_step: float, step_time: float) -> list[dict]:
    rows = []
    for link, (bw, lat) in LINKS.items():
        for n in (2, 4, 8):
            t_ar = 2 * (n - 1) / n * bytes_per_step / bw + 2 * (n - 1) * lat
            rows.append({"link": link, "ranks": n, "allreduce_ms": t_ar * 1e3,
                         "speedup": step_time / (step_time / n + t_ar)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--step-time", type=float, default=None, help="T_c for the estimate (default: measured, 1 rank)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=280, help="seconds a run may take")
    ap.add_argument(
        "--launchers", default="mlxpt", help="comma list of mlxpt (python -m mlxpt.launch), mlx (mlx.launch)"
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: clean up the ranks
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp))
        multi = [run(2, args, Path(tmp), name) for name in args.launchers.split(",")]
    two = multi[-1]
    step_time = args.step_time or one["step_time_s"]
    rows = estimate(two["allreduce_bytes_per_step"], step_time)
    print(f"load average at start {load:.1f} ({os.cpu_count()} CPUs): timings are noisy on a shared machine")
    print(
        "| ranks | launcher | launcher CPU s | tokens/s | step s | tokens/step | all-reduce ms/step | all-reduce bytes/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in (one, *multi):
        ar = f"{r['allreduce_s_per_step'] * 1e3:.1f}" if "allreduce_s_per_step" in r else "-"
        by = f"{r['allreduce_bytes_per_step']:,.0f}" if "allreduce_bytes_per_step" in r else "-"
        print(
            f"| {r['ranks']} | {r['launcher']} | {r['launcher_cpu_s']:.1f} | {r['tokens_per_s']:.0f} | {r['step_time_s']:.2f} "
            f"| {r['tokens_per_step']:.0f} | {ar} | {by} |"
        )
    print(
        f"\nestimate with T_c = {step_time:.3f} s a step on one rank and B = {two['allreduce_bytes_per_step']:,.0f} bytes:"
    )
    print("| link | ranks | all-reduce ms | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['link']} | {r['ranks']} | {r['allreduce_ms']:.3f} | {r['speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"runs": [one, *multi], "estimate": rows, "load": load}, indent=1))


if __name__ == "__main__":
    main()
