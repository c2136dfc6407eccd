"""SFT throughput: `mlx_lm.lora` vs `mlxpt train sft`, side by side on one machine.

Both tools train the same float32 copy of the default model (SmolLM2-135M) on the bundled
chat data with the same batch size, sequence cap, adapted layers, LoRA rank/scale, Adam and
learning rate. Two settings:

  same-blas   both with the same OpenBLAS (mlxpt's own swap, `mlxpt._blas.activate()`, is run
              before mlx-lm imports mlx, so both processes bind the identical library)
  out-of-box  each tool as installed: mlx-lm with the wheel's reference BLAS, mlxpt default
              (`--model smollm2-135m`, which swaps BLAS and dequantises to float32 itself)

Each run is a child process; its peak RSS comes from `os.wait4` (that child only), next to the
tool's own `mx.get_peak_memory()`. Throughput excludes the first `--warmup` steps. Token counts
are normalised: mlx-lm 0.32 trains one extra target per sequence (the padding token after the
last real token) and counts it; the `tok/s` column counts only real next-token targets
(sequence length - 1) for both tools, `tok/s raw` is what each tool reports.

    .venv/bin/python bench/sft.py [--repeats 2] [--steps 12] [--only same-blas|out-of-box]
                                  [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mlxpt.models.loader.home (no mlx import in this process)

PY = sys.executable

# Writes a float32 copy of the default model (mlxpt's loader dequantises it) for both tools.
_MAKE_F32 = r"""
import json, os, shutil, sys
from pathlib import Path
from mlxpt.models.loader import load, resolve
import mlx.core as mx
from mlx_lm.utils import save_model, save_config
ref, out = sys.argv[1], Path(sys.argv[2])
src = resolve(ref)
model, tok = load(ref, quantize="none")
dtypes = {str(v.dtype) for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters())}
assert dtypes == {"mlx.core.float32"}, dtypes
tmp = out.with_name(out.name + f".tmp{os.getpid()}")
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)
save_model(tmp, model)
cfg = json.loads((src / "config.json").read_text())
cfg.pop("quantization", None)
cfg.pop("quantization_config", None)
cfg["torch_dtype"] = "float32"
save_config(cfg, tmp / "config.json")
for f in src.iterdir():
    if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
        shutil.copy(f, tmp / f.name)
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
print(out)
"""

# mlx_lm.lora's own main(), with its reporting callback swapped for one printing JSON lines
# (full precision instead of the rounded console table). BENCH_BLAS=openblas runs mlxpt's BLAS
# swap first, exactly as `mlxpt train` does; otherwise mlx-lm gets the wheel's reference BLAS.
_MLX_LM = r"""
import json, os, sys
blas = "reference (as installed)"
if os.environ.get("BENCH_BLAS") == "openblas":
    from mlxpt import _blas
    blas = _blas.activate()
import mlx_lm.lora as L
from mlx_lm.tuner.callbacks import TrainingCallback
class CB(TrainingCallback):
    def on_train_loss_report(self, info):
        print("BENCH " + json.dumps({"event": "step", **info}), flush=True)
    def on_val_loss_report(self, info):
        print("BENCH " + json.dumps({"event": "eval", **info}), flush=True)
L.get_reporting_callbacks = lambda *a, **k: CB()
print("BENCH " + json.dumps({"event": "start", "blas": blas}), flush=True)
sys.argv = ["mlx_lm.lora"] + sys.argv[1:]
L.main()
print("BENCH " + json.dumps({"event": "done"}), flush=True)
"""


def float_model(ref: str) -> Path:
    """The cached float32 copy of `ref` (made once, in a child process)."""
    from mlxpt.models.loader import home, resolve

    src = resolve(ref)  # converts the GGUF once if needed (no mlx import)
    out = home() / "bench" / f"{src.name}-f32"
    if not (out / "config.json").exists():
        print(f"writing a float32 copy of {ref} to {out} ...", file=sys.stderr, flush=True)
        subprocess.run([PY, "-c", _MAKE_F32, ref, str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def run_child(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, list[dict], float, float]:
    """(exit code, JSON events, peak RSS MB of this child, wall seconds)."""
    t0 = time.perf_counter()
    events: list[dict] = []
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        out_lines = []
        for line in p.stdout:
            out_lines.append(line)
            s = line[6:] if line.startswith("BENCH ") else line
            if s.startswith("{"):
                try:
                    events.append(json.loads(s))
                except json.JSONDecodeError:
                    pass
        _, status, ru = os.wait4(p.pid, 0)  # rusage of this child alone
        p.returncode = os.waitstatus_to_exitcode(status)
        timer.cancel()
        err.write("\n--- stdout ---\n" + "".join(out_lines[-40:]))
    return p.returncode, events, ru.ru_maxrss / 1024, time.perf_counter() - t0


def summarise(tool: str, events: list[dict], warmup: int, batch: int) -> dict:
    """Per-run numbers from either tool's step events (one event per optimiser step)."""
    steps = []
    for e in events:
        if e.get("event") != "step":
            continue
        if tool == "mlxpt":
            steps.append(
                {
                    "step": e["step"],
                    "loss": e["loss"],
                    "time": e["step_time_s"],
                    "raw": e["tokens"],  # sum of (len - 1): real next-token targets
                    "norm": e["tokens"],
                    "peak_mb": e["peak_memory_mb"],
                }
            )
        else:
            dt = 1.0 / e["iterations_per_second"]  # steps_per_report = 1
            raw = round(e["tokens_per_second"] * dt)  # trained targets incl. one pad per row
            steps.append(
                {
                    "step": e["iteration"],
                    "loss": e["train_loss"],
                    "time": dt,
                    "raw": raw,
                    "norm": raw - batch,
                    "peak_mb": e["peak_memory"] * 1e3,
                }
            )
    meas = [s for s in steps if s["step"] > warmup]
    if not meas:
        return {"steps": steps, "measured": 0}
    t = sum(s["time"] for s in meas)
    return {
        "steps": steps,
        "measured": len(meas),
        "tok_s": sum(s["norm"] for s in meas) / t,
        "tok_s_raw": sum(s["raw"] for s in meas) / t,
        "best_step_tok_s": max(s["norm"] / s["time"] for s in meas),  # least disturbed step
        "s_step_median": statistics.median(s["time"] for s in meas),
        "s_step_min": min(s["time"] for s in meas),
        "s_step_max": max(s["time"] for s in meas),
        "warmup_s": sum(s["time"] for s in steps if s["step"] <= warmup),
        "tokens_per_seq": sum(s["norm"] for s in meas) / (batch * len(meas)),
        "final_loss": steps[-1]["loss"],
        "final_step": steps[-1]["step"],
        "tool_peak_mb": max(s["peak_mb"] for s in steps),
    }


def commands(setting: str, tool: str, a, f32: Path, tmp: Path, tag: str) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env.pop("MLXPT_BLAS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # this mlxpt
    steps = a.steps if setting == "same-blas" else a.oob_steps
    if tool == "mlx-lm":
        cfg = tmp / "lora.yaml"
        cfg.write_text(
            f"lora_parameters:\n  rank: {a.rank}\n  scale: {a.alpha / a.rank}\n  dropout: 0.0\noptimizer: adam\n"
        )
        env["BENCH_BLAS"] = "openblas" if setting == "same-blas" else "reference"
        cmd = [PY, "-c", _MLX_LM, "--train", "--model", str(f32), "--data", str(a.data),
               "-c", str(cfg), "--fine-tune-type", "lora", "--optimizer", "adam",
               "--batch-size", str(a.batch_size), "--iters", str(steps),
               "--num-layers", str(a.num_layers), "--max-seq-length", str(a.max_seq_len),
               "--learning-rate", str(a.learning_rate), "--steps-per-report", "1",
               "--val-batches", "1", "--steps-per-eval", "100000", "--save-every", "100000",
               "--adapter-path", str(tmp / f"adapters-{tag}"), "--seed", "0"]  # fmt: skip
    else:
        model = ["--model", str(f32), "--quantize", "none"] if setting == "same-blas" else []
        cmd = [PY, "-m", "mlxpt.cli", "train", "sft", "--events", "json", *model,
               "--data", str(a.data), "--mask", "none", "--batch-size", str(a.batch_size),
               "--max-seq-len", str(a.max_seq_len), "--num-layers", str(a.num_layers),
               "--rank", str(a.rank), "--alpha", str(a.alpha), "--targets", "all",
               "--steps", str(steps), "--learning-rate", str(a.learning_rate),
               "--optimizer", "adam", "--clip-grad-norm", "0", "--schedule", "constant",
               "--warmup-steps", "0", "--eval-every", "0", "--eval-batches", "0",
               "--save-every", "100000", "--runs-dir", str(tmp / "runs"), "--name", tag,
               "--seed", "0"]  # fmt: skip
    return cmd, env


def fmt(x, spec=".0f"):
    return "–" if x is None else format(x, spec)


def rng(xs, spec=".0f"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    lo, hi = min(xs), max(xs)
    return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{format(lo, spec)}–{format(hi, spec)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="steps per same-blas run")
    ap.add_argument("--oob-steps", type=int, default=2, help="steps per out-of-box run (reference BLAS is slow)")
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of throughput")
    ap.add_argument("--oob-warmup", type=int, default=1, help="leading steps left out in out-of-box runs")
    ap.add_argument("--only", choices=["same-blas", "out-of-box"])
    ap.add_argument("--json", help="write every run's numbers here")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "assets" / "sft"))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, adapters)")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of a saved --json file")
    a = ap.parse_args()
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        meta = saved["meta"]
        report(saved["runs"], argparse.Namespace(**meta["args"]), Path(meta["float_model"]), meta.get("source", "?"))
        return 0

    settings = [a.only] if a.only else ["same-blas", "out-of-box"]
    f32 = float_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="mlxpt-bench-sft-"))
    runs = []
    try:
        for setting in settings:
            for r in range(a.repeats):
                tools = ["mlx-lm", "mlxpt"] if r % 2 == 0 else ["mlxpt", "mlx-lm"]  # interleave
                for tool in tools:
                    tag = f"{setting}-{tool}-{r}"
                    cmd, env = commands(setting, tool, a, f32, tmp, tag)
                    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", file=sys.stderr, flush=True)
                    rc, events, rss, wall = run_child(cmd, env, a.timeout, tmp / f"{tag}.log")
                    warm = a.warmup if setting == "same-blas" else a.oob_warmup
                    s = summarise(tool, events, warm, a.batch_size)
                    blas = next((e.get("blas") for e in events if e.get("event") == "start"), None)
                    run = {"setting": setting, "tool": tool, "repeat": r, "rc": rc, "rss_mb": rss, "warmup_used": warm,
                           "wall_s": wall, "blas": blas, **s}  # fmt: skip
                    runs.append(run)
                    if a.json:  # after every run, so an interrupted benchmark keeps what it measured
                        write_json(a.json, runs, a, f32)
                    if rc != 0 or not s.get("measured"):
                        print(f"  FAILED (exit {rc}); log: {tmp / f'{tag}.log'}", file=sys.stderr)
                        print((tmp / f"{tag}.log").read_text()[-3000:], file=sys.stderr)
                        a.keep = True
                    else:
                        print(
                            f"  {s['tok_s']:.0f} tok/s, {s['s_step_median']:.2f} s/step, "
                            f"RSS {rss:.0f} MB, loss {s['final_loss']:.3f}, {wall:.0f} s",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"scratch kept in {tmp}", file=sys.stderr)

    report(runs, a, f32)
    if a.json:
        write_json(a.json, runs, a, f32)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def write_json(path: str, runs: list[dict], a, f32: Path) -> None:
    meta = {"machine": machine(), "versions": versions(), "source": source(), "args": vars(a), "float_model": str(f32)}
    Path(path).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


def source() -> str:
    """Which mlxpt was measured: the commit of ROOT and whether mlxpt/ has local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "mlxpt"], capture_output=True, text=True
        )
    except OSError:
        return f"{ROOT} (no git)"
    if head.returncode != 0:
        return f"{ROOT} (not a git checkout)"
    return f"{ROOT} at {head.stdout.strip()}" + (" with local changes in mlxpt/" if dirty.stdout.strip() else "")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) // 2**20 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem} GB, {platform.platform()}"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-cpu", "mlx-lm", "cmeel-openblas", "mlxpt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def best_step(r: dict) -> float:
    warm = r.get("warmup_used", 0)
    return max(s["norm"] / s["time"] for s in r["steps"] if s["step"] > warm) if r.get("steps") else float("nan")


def report(runs: list[dict], a, f32: Path, src: str | None = None) -> None:
    print(f"\nSFT, {a.model} as float32 ({f32.name}), batch {a.batch_size}, max seq {a.max_seq_len}, "
          f"LoRA r={a.rank} scale={a.alpha / a.rank:g} on all linears of the last {a.num_layers} layers, "
          f"Adam lr {a.learning_rate:g}; first {a.warmup} steps excluded; mlxpt from {src or source()}\n")  # fmt: skip
    print(
        "| setting | tool | repeat | BLAS | steps | tok/s | tok/s raw | best-step tok/s | s/step (median) | warm-up s "
        "| peak RSS MB | tool peak MB | tok/seq | loss @ last step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        blas = (r.get("blas") or "?").split(",")[0].replace(" (cmeel-openblas wheel", " (cmeel wheel)")
        if not r.get("measured"):
            print(f"| {r['setting']} | {r['tool']} | {r['repeat']} | {blas} | failed (exit {r['rc']}) |" + " |" * 9)
            continue
        print(
            f"| {r['setting']} | {r['tool']} | {r['repeat']} | {blas} | {r['final_step']} | {r['tok_s']:.0f} "
            f"| {r['tok_s_raw']:.0f} | {best_step(r):.0f} | {r['s_step_median']:.2f} | {r['warmup_s']:.1f} | {r['rss_mb']:.0f} "
            f"| {r['tool_peak_mb']:.0f} | {r['tokens_per_seq']:.1f} | {r['final_loss']:.3f} |"
        )
    print("\n| setting | mlx-lm tok/s | mlxpt tok/s | ratio mlxpt/mlx-lm (per repeat) | "
          "mlx-lm RSS MB | mlxpt RSS MB | RSS ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for setting in dict.fromkeys(r["setting"] for r in runs):
        ok = [r for r in runs if r["setting"] == setting and r.get("measured")]
        ref = [r for r in ok if r["tool"] == "mlx-lm"]
        us = [r for r in ok if r["tool"] == "mlxpt"]
        ratios = []
        for rep in sorted({r["repeat"] for r in ok}):
            x = [r["tok_s"] for r in ref if r["repeat"] == rep]
            y = [r["tok_s"] for r in us if r["repeat"] == rep]
            if x and y:
                ratios.append(y[0] / x[0])
        rss_ratio = (
            (statistics.median(r["rss_mb"] for r in us) / statistics.median(r["rss_mb"] for r in ref))
            if ref and us
            else None
        )
        print(
            f"| {setting} | {rng([r['tok_s'] for r in ref])} | {rng([r['tok_s'] for r in us])} "
            f"| {', '.join(f'{x:.2f}' for x in ratios) or '–'} | {rng([r['rss_mb'] for r in ref])} "
            f"| {rng([r['rss_mb'] for r in us])} | {fmt(rss_ratio, '.2f')} |"
        )


if __name__ == "__main__":
    sys.exit(main())
