"""Distillation on the default model (issue 24's must-show): token-level (GKD, forward KL on the
teacher's logits) vs sequence-level (SFT on the teacher's greedy answers), from a long-SFT teacher
into a fresh LoRA on the base model, on the same prompts and the same number of steps.

- The teacher: `--teacher RUN` (an SFT run of the default model), else the newest finished SFT run
  under runs/ with at least --teacher-steps steps, else one is trained (`mlxpt train sft`).
- `topk`: the error of the top-k cache, mean |KL_full - KL_topk| per trained token of forward
  KL(teacher || base) on the first --rows rows of assets/sft/valid.jsonl, K = 16 and 64 (the
  top-k distributions renormalised, as `--teacher-cache top-k` trains them).
- `train`: both students on the first steps x batch rows of assets/sft/train.jsonl (one epoch,
  the same prompts), then greedy accuracy (`mlxpt eval`) of the base, the teacher and both
  students on the first --test rows of assets/sft/test.jsonl. Teacher tokens: the trained
  positions scored by the teacher (token) and the answer tokens it generated (sequence).

Usage: python bench/distill.py [--teacher RUN] [--steps 30] [--test 50] [--parts topk,train]
       [--budget-s 900] [--out bench-out/distill]; writes <out>/result.json and prints it.
Every command runs under what is left of --budget-s (15 min): past it the bench stops.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MLXPT = str(Path(sys.executable).with_name("mlxpt"))
TEST = "assets/sft/test.jsonl"
RECIPE = [
    "--learning-rate",
    "5e-4",
    "--batch-size",
    "4",
    "--eval-every",
    "0",
    "--save-every",
    "1000",
    "--regression-data",
    "none",
]
DEADLINE = [float("inf")]  # time.time() after which no command may run on (--budget-s, 15 min by default)


def sh(args: list[str], log: Path) -> None:
    print("$", " ".join(args), file=sys.stderr, flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        left = DEADLINE[0] - time.time()
        if left <= 0:
            raise TimeoutError("out of --budget-s before: " + " ".join(args[:3]))
        subprocess.run(args, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT, timeout=left)


def find_teacher(out: Path, steps: int) -> Path:
    """A finished SFT run of the default model with >= `steps` steps, or a new one."""
    for run in sorted((ROOT / "runs").glob("*"), reverse=True):
        try:
            cfg, status = (json.loads((run / n).read_text()) for n in ("config.json", "status.json"))
        except (OSError, ValueError):
            continue
        ok = cfg.get("method") == "sft" and cfg["model"]["model"] == "smollm2-135m"
        if ok and status.get("status") == "finished" and cfg["train"]["steps"] >= steps:
            return run
    runs = out / "runs"
    sh([MLXPT, "train", "sft", "--runs-dir", str(runs), "--name", "teacher", "--steps", str(steps),
        "--learning-rate", "5e-4", "--warmup-steps", "20", "--eval-every", "0"], out / "log.txt")  # fmt: skip
    return sorted(runs.glob("*-teacher"))[-1]


def topk_error(teacher: Path, rows: int, ks=(16, 64)) -> dict:
    """mean |KL_full - KL_topk| per trained token of forward KL(teacher || base)."""
    import mlx.core as mx

    from mlxpt.backends.mlx_backend import position_logprobs
    from mlxpt.data.batching import collate, trained_positions
    from mlxpt.data.encode import encode_all, pad_id_of
    from mlxpt.data.formats import scan_jsonl
    from mlxpt.models.loader import load
    from mlxpt.train.distill import top_k

    base, tok = load("smollm2-135m")
    tuned, _ = load("smollm2-135m", adapter=str(teacher))
    data, _ = scan_jsonl(ROOT / "assets/sft/valid.jsonl")
    examples, _ = encode_all(data[:rows], tok, max_len=512)
    full, errs = [], {k: [] for k in ks}
    none = mx.zeros((0,), mx.int32)
    for s in range(0, len(examples), 8):
        inputs, _, mask = collate(examples[s : s + 8], pad_id_of(tok))
        index, weight = trained_positions(mask)
        n = int((weight > 0).sum())
        x, i = mx.array(inputs), mx.array(index)
        ls = np.array(position_logprobs(base, None, x, i, none), np.float64)[:n]
        lt = np.array(position_logprobs(tuned, None, x, i, none), np.float64)[:n]
        kl = (np.exp(lt) * (lt - ls)).sum(-1)
        full.append(kl)
        for k in ks:
            ids, _ = top_k(lt.astype(np.float32), k)
            a, b = np.take_along_axis(lt, ids, -1), np.take_along_axis(ls, ids, -1)
            a = a - np.log(np.exp(a).sum(-1, keepdims=True))
            b = b - np.log(np.exp(b).sum(-1, keepdims=True))
            errs[k].append(np.abs(kl - (np.exp(a) * (a - b)).sum(-1)))
    kl_all = np.concatenate(full)
    out = {"tokens": int(kl_all.size), "kl_full_mean": float(kl_all.mean())}
    for k in ks:
        e = np.concatenate(errs[k])
        out[f"k{k}_mean_abs_err"], out[f"k{k}_max_abs_err"] = float(e.mean()), float(e.max())
    return out


def metric(run: Path, name: str):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "step"][-1].get(name)


def accuracy(out: Path, tag: str, adapter: Path | None, test: int) -> float:
    res = out / f"eval-{tag}.json"
    args = [MLXPT, "eval", "--strategies", "greedy", "--data", TEST, "--limit", str(test), "--out", str(res)]
    sh(args + (["--adapter", str(adapter)] if adapter else []), out / "log.txt")
    return round(100 * json.loads(res.read_text())["results"][-1]["accuracy"], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--teacher-steps", type=int, default=60)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--test", type=int, default=50)
    ap.add_argument("--rows", type=int, default=64, help="topk: validation rows")
    ap.add_argument("--parts", default="topk,train")
    ap.add_argument("--out", default="bench-out/distill")
    ap.add_argument("--budget-s", type=float, default=900, help="wall-clock cap of the whole bench")
    args = ap.parse_args(argv)
    DEADLINE[0] = time.time() + args.budget_s
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher = Path(args.teacher).resolve() if args.teacher else find_teacher(out, args.teacher_steps)
    result: dict = {"teacher": str(teacher), "steps": args.steps, "test_rows": args.test}
    if "topk" in args.parts:
        t = time.time()
        result["topk"] = topk_error(teacher, args.rows) | {"s": round(time.time() - t, 1)}
        print(json.dumps(result["topk"]), flush=True)
    if "train" in args.parts:
        data = out / "data"
        data.mkdir(exist_ok=True)
        lines = (ROOT / "assets/sft/train.jsonl").read_text().splitlines(keepends=True)
        (data / "train.jsonl").write_text("".join(lines[: args.steps * 4]))
        (data / "valid.jsonl").write_text("".join((ROOT / "assets/sft/valid.jsonl").read_text().splitlines(True)[:16]))
        runs, students = out / "runs", {}
        for mode in ("token", "sequence"):
            t = time.time()
            sh([MLXPT, "train", "distill", "--teacher", str(teacher), "--mode", mode, "--data", str(data),
                "--steps", str(args.steps), "--warmup-steps", "5", "--max-completion-length", "96",
                "--runs-dir", str(runs), "--name", f"student-{mode}", *RECIPE], out / "log.txt")  # fmt: skip
            run = sorted(runs.glob(f"*-student-{mode}"))[-1]
            students[mode] = run
            result[mode] = {"run": str(run), "teacher_tokens": metric(run, "teacher_tokens"),
                            "train_s": round(time.time() - t, 1), "last_loss": metric(run, "loss")}  # fmt: skip
            print(json.dumps({mode: result[mode]}), flush=True)
        result["accuracy"] = {}  # students first: what a short --budget-s keeps
        for tag, adapter in (*students.items(), ("teacher", teacher), ("base", None)):
            result["accuracy"][tag] = accuracy(out, tag, adapter, args.test)
            print(json.dumps({"accuracy": result["accuracy"]}), flush=True)
    result["wall_s"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
