"""GRPO step time and memory: mlx-lm-lora (`--train-mode grpo`) vs `mlxpt train grpo`, side by side.

Both train the same float32 copy of the default model (bench/sft.py's `float_model`) on the same
rows of the bundled assets/grpo/train.jsonl, with the same OpenBLAS (mlxpt's `_blas.activate()`
runs first in both processes): 2 prompts per step, G=8 completions each, at most 96 new tokens,
temperature 1.0, LoRA rank 8 / scale 2 on all linear layers of the last 16 blocks, Adam at a
constant 2e-5, beta 0.04, the `grpo` loss normalisation, epsilon 0.2 (on-policy, so clipping
changes nothing). mlx-lm-lora lives in its own venv (never in pyproject):

    python3 -m venv /tmp/mlxlora-venv && /tmp/mlxlora-venv/bin/pip install mlx-lm-lora "mlx[cpu]" cmeel-openblas

Same prompts: every row gets an explicit system message. mlx-lm-lora puts its own think/answer
system prompt on rows without one; rows without one here get SmolLM2's template default, which is
what mlxpt renders for them, so both tools tokenise identical conversations.
Same rewards: mlx-lm-lora's built-in rewards score <think>/<answer> tags, so it is given a reward
file wrapping mlxpt's own `accuracy` and `format` functions (weight 1 each, as in mlxpt).
Same sampler: mlx-lm-lora's GRPO always samples with top_p 0.95 / top_k 20 (GRPOTrainingArgs
defaults that its CLI never sets), so mlxpt runs with `--top-p 0.95 --top-k 20` too.

Measured per step, excluding the first `--warmup` steps of each run (compilation):
- step time: mlxpt's `step_time_s`; mlx-lm-lora's `1 / iterations_per_second` with
  `--steps-per-report 1` (perf_counter from the end of one report to the end of the next step's
  `mx.eval`: batch, generation, rewards, reference and policy passes, update). No validation, no
  checkpoint inside either window.
- generated tokens: completion lengths incl. the stop token (mlxpt `completion_len_mean`,
  mlx-lm-lora `average_generated_tokens`) x prompts x G, and seconds per generated token. A
  policy that stops early makes a cheaper step, so compare per token as well as per step.
- generation time: mlxpt's `gen_time_s`; for mlx-lm-lora a timer around its `generate_grpo`
  (the wrapper only times it).
- peak memory: each tool's `mx.get_peak_memory()` and the child's peak RSS from `os.wait4`.

What differs by design: mlx-lm-lora loads a second model copy as the reference, decodes the 16
completions `batch_size` (2) rows at a time, and scores them in micro-batches of 2 rows (each with
a reference and a policy pass); mlxpt prefills each prompt once and decodes all 16 rows as one
batch, scores them in one pass, and gets the reference by switching the adapter off.
mlx-lm-lora also stops a completion at `</answer>` (its fixed end token); these prompts rarely
produce one.

    .venv/bin/python bench/grpo_peer.py [--repeats 2] [--steps 8] [--only mlxpt|mlx-lm-lora]
                                        [--first-repeat 1] [--json out.json]
    .venv/bin/python bench/grpo_peer.py --report a.json b.json   # tables of saved runs

On the 2-core CPU machine one full-size step took 562 s (mlxpt) and over 880 s (mlx-lm-lora) at
load average ~5: give `--timeout` room, or compare time per token at a smaller `--max-tokens`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dpo_peer import run  # noqa: E402  (child process with its own peak RSS)
from sft import float_model, machine, source, versions  # noqa: E402

PY = sys.executable
PEER_PY = "/tmp/mlxlora-venv/bin/python"
# SmolLM2's chat template adds this system turn when a conversation has none (what mlxpt renders)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# mlx-lm-lora's own CLI main(), with mlxpt's BLAS swap first, a callback printing its per-report
# dict as JSON, and a timer around its rollout function (behaviour unchanged).
_PEER = r"""
import json, sys, time
from mlxpt import _blas  # stdlib only: loads OpenBLAS before mlx, as `mlxpt train` does
blas = _blas.activate()
import mlx.core as mx
from mlx_lm.tuner.callbacks import TrainingCallback
import mlx_lm_lora.train as T
import mlx_lm_lora.trainer.grpo_trainer as G
gen = {"s": 0.0, "calls": 0}
_generate = G.generate_grpo
def timed_generate(*a, **k):
    t0 = time.perf_counter()
    out = _generate(*a, **k)
    gen["s"] += time.perf_counter() - t0
    gen["calls"] += 1
    return out
G.generate_grpo = timed_generate
class CB(TrainingCallback):
    def on_train_loss_report(self, info):
        print("BENCH " + json.dumps({"event": "step", **info, "gen_time_s": gen["s"]}), flush=True)
        gen["s"] = 0.0
    def on_val_loss_report(self, info):
        print("BENCH " + json.dumps({"event": "eval", **info}), flush=True)
_run = T.run
T.run = lambda args, training_callback=None: _run(args, CB())
print("BENCH " + json.dumps({"event": "start", "blas": blas, "t": time.time()}), flush=True)
sys.argv = ["mlx_lm_lora.train"] + sys.argv[1:]
T.main()
print("BENCH " + json.dumps({"event": "done", "t": time.time()}), flush=True)
"""

# mlxpt's reward functions, registered under mlx-lm-lora's batch calling convention.
_REWARDS = r"""
import sys
sys.path.insert(0, {root!r})
from mlxpt.rewards import accuracy, format_reward
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function

@register_reward_function()
def mlxpt_accuracy(prompts, completions, answer, types=None):
    return [accuracy(p, c, answer=a) for p, c, a in zip(prompts, completions, answer)]

@register_reward_function()
def mlxpt_format(prompts, completions, answer, types=None):
    return [format_reward(p, c) for p, c in zip(prompts, completions)]
"""


def write_data(tmp: Path, rows: int | None) -> Path:
    """The bundled GRPO prompts, each with an explicit system turn, as one folder both tools read."""
    out = tmp / "data"
    out.mkdir()
    lines = (ROOT / "assets" / "grpo" / "train.jsonl").read_text().splitlines()
    with open(out / "train.jsonl", "w") as f:
        for line in lines[:rows]:
            if line.strip():
                row = json.loads(line)
                f.write(json.dumps({"system": row.pop("system", DEFAULT_SYSTEM), **row}) + "\n")
    (tmp / "rewards.py").write_text(_REWARDS.format(root=str(ROOT)))
    return out


def peer_cmd(a, f32: Path, data: Path, tmp: Path, tag: str) -> list[str]:
    cfg = tmp / "peer.yaml"
    cfg.write_text(f"lora_parameters:\n  rank: {a.rank}\n  scale: {a.alpha / a.rank}\n  dropout: 0.0\nfuse: false\n")
    return [a.peer_python, "-c", _PEER, "--model", str(f32), "--train", "--train-mode", "grpo",
            "--train-type", "lora", "--data", str(data), "-c", str(cfg), "--optimizer", "adam",
            "--batch-size", str(a.batch_size), "--iters", str(a.steps), "--num-layers", str(a.num_layers),
            "--max-seq-length", str(a.max_seq_len), "--learning-rate", str(a.lr), "--beta", str(a.beta),
            "--group-size", str(a.G), "--max-completion-length", str(a.max_tokens),
            "--temperature", str(a.temperature), "--epsilon", "0.2", "--grpo-loss-type", "grpo",
            "--reward-functions-file", str(tmp / "rewards.py"),
            "--reward-functions", "mlxpt_accuracy,mlxpt_format",
            "--steps-per-report", "1", "--steps-per-eval", "100000", "--save-every", "100000",
            "--adapter-path", str(tmp / f"peer-{tag}"), "--seed", "0"]  # fmt: skip


def mlxpt_cmd(a, f32: Path, data: Path, tmp: Path, tag: str) -> list[str]:
    return [PY, "-m", "mlxpt.cli", "train", "grpo", "--events", "json", "--model", str(f32), "--quantize", "none",
            "--data", str(data), "--batch-size", str(a.batch_size), "--max-seq-len", str(a.max_seq_len),
            "--num-layers", str(a.num_layers), "--rank", str(a.rank), "--alpha", str(a.alpha), "--targets", "all",
            "--steps", str(a.steps), "--learning-rate", str(a.lr), "--optimizer", "adam",
            "--clip-grad-norm", "0", "--schedule", "constant", "--warmup-steps", "0",
            "--num-generations", str(a.G), "--max-completion-length", str(a.max_tokens),
            "--temperature", str(a.temperature), "--top-p", "0.95", "--top-k", "20", "--beta", str(a.beta),
            "--epsilon", "0.2", "--loss-type", "grpo", "--rewards", "accuracy,format",
            "--log-completions-every", "0", "--eval-every", "0", "--eval-batches", "0",
            "--save-every", "100000", "--runs-dir", str(tmp / "runs"), "--name", tag, "--seed", "0"]  # fmt: skip


def parse_steps(tool: str, lines: list[str], rows: int) -> tuple[list[dict], dict]:
    """One dict per optimiser step in a shared shape, plus run-level extras (BLAS, load time)."""
    steps, extra = [], {}
    for line in lines:
        s = line[6:] if line.startswith("BENCH ") else line
        if not s.startswith("{"):
            continue
        try:
            e = json.loads(s)
        except json.JSONDecodeError:
            continue
        if e.get("event") == "start":
            extra["blas"] = e.get("blas")
            if "load_time_s" in e:
                extra["load_s"] = e["load_time_s"]
        if e.get("event") != "step":
            continue
        if tool == "mlxpt":
            steps.append({"step": e["step"], "time": e["step_time_s"], "gen_s": e["gen_time_s"],
                          "len": e["completion_len_mean"], "reward": e["reward_mean"],
                          "acc": e.get("reward/accuracy"), "mx_peak_mb": e["peak_memory_mb"]})  # fmt: skip
        else:
            steps.append({"step": e["iteration"], "time": 1.0 / e["iterations_per_second"], "gen_s": e["gen_time_s"],
                          "len": e["train_average_generated_tokens"], "reward": e["train_total_rewards_mean"],
                          "acc": e.get("train_mlxpt_accuracy_mean"), "mx_peak_mb": e["peak_memory"] * 1e3})  # fmt: skip
    for st in steps:
        st["gen_tokens"] = st["len"] * rows
    return steps, extra


def summarise(steps: list[dict], warmup: int) -> dict:
    meas = [s for s in steps if s["step"] > warmup]
    if not meas:  # e.g. killed by --timeout during step 2: keep what step 1 showed
        if not steps:
            return {"measured": 0}
        return {"measured": 0, "first_step_s": steps[0]["time"], "first_gen_s": steps[0]["gen_s"],
                "first_len": steps[0]["len"], "mx_peak_mb": steps[0]["mx_peak_mb"]}  # fmt: skip
    t, toks, gen = (sum(s[k] for s in meas) for k in ("time", "gen_tokens", "gen_s"))
    return {
        "measured": len(meas),
        "s_step_mean": t / len(meas),
        "s_step_median": statistics.median(s["time"] for s in meas),
        "s_step_min": min(s["time"] for s in meas),
        "completion_len_mean": statistics.mean(s["len"] for s in meas),
        "gen_tokens_per_step": toks / len(meas),
        "ms_per_gen_token": 1e3 * t / max(toks, 1),
        "gen_share": gen / t,
        "gen_tok_s": toks / max(gen, 1e-9),
        "first_step_s": steps[0]["time"],
        "mx_peak_mb": max(s["mx_peak_mb"] for s in steps),
        "reward_mean": statistics.mean(s["reward"] for s in steps),
    }


def report(results: list[dict], a) -> None:
    print(f"\nGRPO, {a.model} float32, {a.batch_size} prompts x G={a.G}, <= {a.max_tokens} new tokens, "
          f"T={a.temperature} top_p 0.95 top_k 20, LoRA r={a.rank} scale {a.alpha / a.rank:g} on the last "
          f"{a.num_layers} blocks, beta {a.beta}, Adam lr {a.lr:g}; first {a.warmup} step(s) excluded\n")  # fmt: skip
    print("| tool | repeat | steps | s/step mean | s/step median | tokens/completion | gen tokens/step "
          "| ms/gen token | gen share | gen tok/s | step 1 s | mx peak MB | peak RSS MB | reward |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r.get("measured"):
            first = (
                f"step 1: {r['first_step_s']:.0f} s, {r['first_len']:.1f} tok/completion" if "first_step_s" in r else ""
            )
            print(f"| {r['tool']} | {r['repeat']} | {r['steps']} (exit {r['rc']}) | no measured step | {first} |"
                  + " |" * 7 + f" {r['peak_rss_mb']:.0f} | |")  # fmt: skip
            continue
        print(f"| {r['tool']} | {r['repeat']} | {r['steps']} | {r['s_step_mean']:.2f} | {r['s_step_median']:.2f} "
              f"| {r['completion_len_mean']:.1f} | {r['gen_tokens_per_step']:.0f} | {r['ms_per_gen_token']:.1f} "
              f"| {r['gen_share']:.2f} | {r['gen_tok_s']:.1f} | {r['first_step_s']:.1f} | {r['mx_peak_mb']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | {r['reward_mean']:.3f} |")  # fmt: skip
    ok = {
        t: {r["repeat"]: r for r in results if r["tool"] == t and r.get("measured")} for t in ("mlxpt", "mlx-lm-lora")
    }
    pairs = [(ok["mlxpt"][k], ok["mlx-lm-lora"][k]) for k in sorted(ok["mlxpt"]) if k in ok["mlx-lm-lora"]]
    if pairs:
        print(
            "\n| repeat | step time mlxpt/peer | time per gen token mlxpt/peer | mx peak mlxpt/peer | RSS mlxpt/peer |"
        )
        print("|---|---|---|---|---|")
        for m, p in pairs:
            print(f"| {m['repeat']} | {m['s_step_mean'] / p['s_step_mean']:.2f} "
                  f"| {m['ms_per_gen_token'] / p['ms_per_gen_token']:.2f} | {m['mx_peak_mb'] / p['mx_peak_mb']:.2f} "
                  f"| {m['peak_rss_mb'] / p['peak_rss_mb']:.2f} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="leading steps left out (compilation)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--first-repeat", type=int, default=0, help="index of the first repeat (odd: mlxpt runs first)")
    ap.add_argument("--only", choices=("mlxpt", "mlx-lm-lora"))
    ap.add_argument("--rows", type=int, default=None, help="first N prompts of assets/grpo/train.jsonl")
    ap.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child run")
    ap.add_argument("--peer-python", default=PEER_PY, help="python of the mlx-lm-lora venv")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data)")
    ap.add_argument("--json", help="also write the results here (after every run)")
    ap.add_argument("--report", metavar="JSON", nargs="+", help="only print the tables of saved --json files")
    a = ap.parse_args()
    if a.report:
        saved = [json.loads(Path(p).read_text()) for p in a.report]
        report([r for s in saved for r in s["results"]], argparse.Namespace(**saved[0]["args"]))
        return 0

    f32 = float_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpo-peer-"))
    data = write_data(tmp, a.rows)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLXPT_BLAS", None)
    results = []
    try:
        for rep in range(a.first_repeat, a.first_repeat + a.repeats):
            tools = ("mlx-lm-lora", "mlxpt") if rep % 2 == 0 else ("mlxpt", "mlx-lm-lora")  # interleaved
            for tool in [t for t in tools if a.only in (None, t)]:
                tag = f"{tool}-{rep}"
                cmd = peer_cmd(a, f32, data, tmp, tag) if tool == "mlx-lm-lora" else mlxpt_cmd(a, f32, data, tmp, tag)
                print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", file=sys.stderr, flush=True)
                load0 = Path("/proc/loadavg").read_text().split()[0]
                rc, lines, rss, wall = run(cmd, env, a.timeout, tmp / f"{tag}.log")
                load = f"{load0}-{Path('/proc/loadavg').read_text().split()[0]}"  # 1-min load, start-end
                steps, extra = parse_steps(tool, lines, a.batch_size * a.G)
                r = {"tool": tool, "repeat": rep, "rc": rc, "steps": len(steps), "peak_rss_mb": rss, "wall_s": wall, "load": load,
                     **extra, **summarise(steps, a.warmup), "per_step": steps}  # fmt: skip
                results.append(r)
                brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "per_step"}
                print(json.dumps(brief), file=sys.stderr, flush=True)
                if rc != 0 or not r.get("measured"):
                    print(f"{tool} failed (exit {rc}); log kept: {tmp / f'{tag}.log'}", file=sys.stderr)
                    print((tmp / f"{tag}.log").read_text()[-3000:], file=sys.stderr)
                    a.keep = True
                if a.json:
                    meta = {"machine": machine(), "versions": versions(), "source": source(), "float_model": str(f32)}
                    Path(a.json).write_text(json.dumps({"args": vars(a), "meta": meta, "results": results}, indent=1))
    finally:
        if a.keep:
            print(f"scratch kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, a)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
