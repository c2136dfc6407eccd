"""DPO throughput side by side: `mlxpt train dpo` and TRL's `DPOTrainer` (torch CPU, PEFT LoRA).

Both train the same float32 copy of the default model (SmolLM2-135M, bench/sft.py's
`float_model`, as bench/sft_peers.py) on the first `--pairs` bundled preference pairs
(assets/pref, system prompts left out: the harness's TRL script renders the prompt as one user
turn), batch 4 pairs, max length 256, sigmoid DPO with beta 0.1, LoRA r=8 alpha=16 dropout 0 on
all 7 linear projections of the last 16 blocks, Adam with bias correction (torch's `adamw_torch`
with weight decay 0), constant lr, no gradient clipping, gradient checkpointing off for both, the
same thread count (`--threads`, exported as OMP/OPENBLAS/MKL_NUM_THREADS to every child). Tools
run interleaved (the order rotates every repeat); each run is a child process whose peak RSS
comes from `wait4`. `--pairs` defaults to steps x batch: one epoch, each pair once.

Tools:
  mlxpt            `mlxpt train dpo` as shipped: the reference log-probs computed once before step
                   1, each prompt run once per pair (shared-prompt scoring)
  mlxpt-plain      the same with --plain-scoring: chosen and rejected as whole rows, as TRL does
  trl              TRL 1.16 `DPOTrainer` as shipped: the reference (adapter off) forward inside
                   every step (the peers harness's hooks/trl_inner.py --mode dpo)
  trl-precomputed  the same with `precompute_ref_log_probs=True`: the reference computed before
                   training, as mlxpt does (the same work per step)

Throughput counts every real token of the chosen and the rejected row as a next-token target
(row length - 1 each, the prompt included in both rows): what mlxpt reports per step; TRL's
`attention_mask.sum()` counts row lengths, so 2 per pair are taken off. Both tools compute every
one of these positions' logits (mlxpt-plain and TRL) or their hidden states (mlxpt runs each
prompt once, then the head only where a response token is predicted), while only response tokens
carry the loss. Both tools render and tokenize the pairs alike: over one epoch their counts are
equal (1,487 tokens for the first 8 pairs); per step they differ, as the batches do (mlxpt groups
pairs of similar length, TRL draws them at random). `pairs/s` is batch / step time. Steps after
`--warmup` are measured.

Sanity check: at step 1 the policy is the reference (LoRA B = 0), so every tool's sigmoid DPO
loss must be log 2 = 0.6931 (TRL logs it rounded to 4 digits); the script exits 1 if one is not.

The TRL venv is the peers harness's (`/tmp/venv-trl`, pinned as in ../shared/peers/setup_envs.sh),
created by bench/sft_peers.py's `trl_python` if it is missing, never by `make setup`.

    .venv/bin/python bench/dpo_peers.py [--steps 20] [--repeats 2] [--threads 2]
                                        [--tools mlxpt,trl,trl-precomputed] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_peer import mlxpt_cmd  # noqa: E402
from sft import ROOT, float_model, run_child, source, summarise  # noqa: E402
from sft_peers import meta, print_ratios, summarise_trl, trl_command, with_threads  # noqa: E402

TOOLS = ("mlxpt", "mlxpt-plain", "trl", "trl-precomputed")
LN2 = math.log(2)

# Runs the harness's trl_inner.py (its path is argv[1]) with DPOConfig(precompute_ref_log_probs=True).
_PRECOMPUTE = r"""
import runpy, sys
import trl
class DPOConfig(trl.DPOConfig):
    def __init__(self, *a, **kw):
        kw["precompute_ref_log_probs"] = True
        super().__init__(*a, **kw)
trl.DPOConfig = DPOConfig
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_pairs(src: Path, n: int, out: Path) -> Path:
    """The first `n` pairs of `src` without system prompts, as `out`/train.jsonl (both tools read it)."""
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()][:n]
    out.mkdir(parents=True, exist_ok=True)
    keep = ("prompt", "chosen", "rejected")
    (out / "train.jsonl").write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    return out


def command(tool: str, a, f32: Path, data: Path, tmp: Path, tag: str) -> tuple[list[str], dict]:
    if tool.startswith("trl"):
        cmd, env = trl_command(
            ["--mode", "dpo", "--model", str(f32), "--data", str(data), "--out", str(tmp / tag),
             "--iters", str(a.steps), "--batch", str(a.batch_size), "--max-seq", str(a.max_seq_len),
             "--lr", str(a.learning_rate), "--beta", str(a.beta), "--num-layers", str(a.num_layers),
             "--gradient-checkpointing", "off"],
            ["-c", _PRECOMPUTE] if tool == "trl-precomputed" else None,
        )  # fmt: skip
    else:
        cmd = mlxpt_cmd(a, f32, data, tmp, tag, plain=tool == "mlxpt-plain") + ["--regression-data", "none"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))  # this checkout's mlxpt
        env.pop("MLXPT_BLAS", None)
    return cmd, with_threads(env, a.threads)


def summarise_run(tool: str, events: list[dict], a) -> dict:
    """sft.py's / sft_peers.py's per-run summary plus pairs/s, the step-1 loss and mlxpt's reference pass."""
    if tool.startswith("trl"):
        s = summarise_trl(events, a.warmup, a.batch_size, rows=2)
    else:
        s = summarise("mlxpt", events, a.warmup, a.batch_size)
        refs = [e["elapsed_s"] for e in events if e.get("event") == "reference" and e.get("status") == "computing"]
        s["reference_s"] = refs[-1] if refs else None
    if s.get("measured"):
        meas = [x for x in s["steps"] if x["step"] > a.warmup]
        s["pairs_s"] = a.batch_size * len(meas) / sum(x["time"] for x in meas)
    s["loss_1"] = next((x["loss"] for x in s.get("steps", []) if x["step"] == 1), None)
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", default="mlxpt,trl,trl-precomputed", help=f"comma-separated, from {', '.join(TOOLS)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of throughput")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "assets" / "pref" / "train.jsonl"))
    ap.add_argument("--pairs", type=int, default=None, help="first N pairs of --data (default: steps x batch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", help="write every run's numbers here (after each run)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    a = ap.parse_args()
    tools = [t for t in a.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool {bad[0]!r}; choose from {', '.join(TOOLS)}")
    a.pairs = a.pairs or a.steps * a.batch_size
    f32 = float_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="mlxpt-bench-dpo-peers-"))
    data = write_pairs(Path(a.data), a.pairs, tmp / "data")
    runs = []
    try:
        for r in range(a.repeats):
            order = tools[r % len(tools) :] + tools[: r % len(tools)]  # rotate: interleaved
            for tool in order:
                tag = f"{tool}-{r}"
                cmd, env = command(tool, a, f32, data, tmp, tag)
                load = os.getloadavg()[0]
                print(f"[{time.strftime('%H:%M:%S')}] {tag} (load {load:.2f}) ...", file=sys.stderr, flush=True)
                rc, events, rss, wall = run_child(cmd, env, a.timeout, tmp / f"{tag}.log")
                s = summarise_run(tool, events, a)
                runs.append(
                    {"tool": tool, "repeat": r, "rc": rc, "rss_mb": rss, "wall_s": wall, "load_before": load, **s}
                )
                if a.json:
                    Path(a.json).write_text(json.dumps({"meta": meta(a, f32), "runs": runs}, indent=1))
                if rc != 0 or not s.get("measured"):
                    print(f"  FAILED (exit {rc}); log: {tmp / f'{tag}.log'}", file=sys.stderr)
                    print((tmp / f"{tag}.log").read_text()[-3000:], file=sys.stderr)
                    a.keep = True
                else:
                    print(f"  {s['pairs_s']:.2f} pairs/s, {s['tok_s']:.0f} tok/s, {s['s_step_median']:.2f} s/step, "
                          f"RSS {rss:.0f} MB, step-1 loss {s['loss_1']}, {wall:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if a.keep:
            print(f"scratch kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sane = report(runs, a, f32, tools)
    return 0 if sane and all(r["rc"] == 0 for r in runs) else 1


def report(runs: list[dict], a, f32: Path, tools: list[str]) -> bool:
    """Print the tables; False if a step-1 loss is not log 2."""
    print(f"\nDPO (sigmoid, beta {a.beta:g}), {a.model} as float32 ({f32.name}), {a.pairs} pairs, batch {a.batch_size} "
          f"pairs, max len {a.max_seq_len}, LoRA r=8 alpha=16 on all linears of the last {a.num_layers} blocks, Adam "
          f"(bias-corrected) lr {a.learning_rate:g}, no clipping, no gradient checkpointing, {a.threads} threads, "
          f"{a.steps} steps ({a.warmup} warm-up excluded); mlxpt from {source()}\n")  # fmt: skip
    print("| tool | repeat | pairs/s | tok/s (real targets) | s/step (median) | peak RSS MB | load before "
          "| loss @ step 1 | loss @ last | mlxpt reference pass s | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sane = True
    for r in runs:
        if not r.get("measured"):
            print(f"| {r['tool']} | {r['repeat']} | failed (exit {r['rc']}) |" + " |" * 8)
            continue
        first, last = r.get("loss_1"), r.get("final_loss")
        sane = sane and first is not None and abs(first - LN2) < 1e-3
        ref = r.get("reference_s")
        print(f"| {r['tool']} | {r['repeat']} | {r['pairs_s']:.2f} | {r['tok_s']:.0f} | {r['s_step_median']:.2f} "
              f"| {r['rss_mb']:.0f} | {r['load_before']:.2f} | {'–' if first is None else f'{first:.4f}'} "
              f"| {'–' if last is None else f'{last:.4f}'} | {'–' if ref is None else f'{ref:.1f}'} "
              f"| {r['wall_s']:.0f} |")  # fmt: skip
    print(f"\nstep-1 loss check (policy = reference, so log 2 = {LN2:.4f}): {'ok' if sane else 'FAILED'}")
    if "mlxpt" in tools:
        print_ratios(runs, tools, a.repeats, "pairs_s", "pairs/s")
    return sane


if __name__ == "__main__":
    sys.exit(main())
