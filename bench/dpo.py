"""DPO and the reward model on the default model and the bundled preference data: the issue's
must-show numbers.

- `--method dpo`: held-out preference accuracy of the implicit reward before and after training,
  and (`--generate N`) greedy generations on N held-out prompts, base vs tuned: how often the
  reply ends with an `Answer: n` line, and how often n is right.
- `--method rm`: held-out pairwise accuracy of the Bradley–Terry reward model, from the run's
  validation and again from `load_reward_model(run).score_batch` (the scorer best-of-N uses).
Both report step time and peak memory.

Usage: python bench/dpo.py [--method dpo|rm] [--train 200] [--valid 100] [--steps 40] [--lr 5e-4]
                           [--generate 50] [--adapter RUN  (generation only, for a finished run)]
Too slow for a test on a 2-core CPU (the reference pass and each step run the 135M model).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxpt.config import DPOConfig, RMConfig, apply_flat  # noqa: E402

ANSWER_LINE = re.compile(r"^Answer: (-?\d+(?:\.\d+)?)\s*$", re.MULTILINE)


def pref_rows(split: str, n: int) -> list[dict]:
    lines = (ROOT / "assets" / "pref" / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(x) for x in lines]


def train(args, tmp: Path) -> tuple[Path, list[dict], dict]:
    for split, n in (("train", args.train), ("valid", args.valid)):
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref_rows(split, n)))
    cfg = RMConfig() if args.method == "rm" else DPOConfig()
    settings = {
        "model": args.model, "data": str(tmp), "runs_dir": str(tmp / "runs"), "steps": args.steps,
        "learning_rate": args.lr, "batch_size": args.batch_size, "warmup_steps": 2,
        "eval_every": args.eval_every or max(1, args.steps // 2), "eval_batches": -1, "save_every": args.steps,
    }  # fmt: skip
    if args.method == "dpo":
        settings.update(beta=args.beta, loss_type=args.loss_type)
    apply_flat(cfg, settings, source="bench")
    t0 = time.time()
    events: list[dict] = []
    first: dict = {}

    def emit(e: dict) -> None:
        events.append(e)
        first.setdefault(e["event"], time.time())
        if e["event"] in ("reference", "eval") or (e["event"] == "step" and e["step"] % 5 == 0):
            keep = ("event", "step", "loss", "accuracy", "margin", "val_loss", "val_accuracy", "status")
            print(f"{time.time() - t0:7.1f}s", {k: e[k] for k in keep if k in e}, flush=True)

    if args.method == "rm":
        from mlxpt.train.rm import run_rm

        run_dir, _ = run_rm(cfg, emit=emit)
    else:
        from mlxpt.train.dpo import run_dpo

        run_dir, _ = run_dpo(cfg, emit=emit)
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    result = {
        "method": args.method,
        "settings": settings,
        "val_accuracy": {e["step"]: e["val_accuracy"] for e in evals},
        "val_margin": {e["step"]: e["val_margin"] for e in evals},
        "step_time_s_median": statistics.median(e["step_time_s"] for e in steps[2:] or steps),
        "peak_memory_mb": max(e["peak_memory_mb"] for e in steps),
        "start_s": first["start"] - t0,  # load (+ the reference pass for DPO)
        "train_s": time.time() - t0,
        "run_dir": str(run_dir),
    }
    return run_dir, events, result


EQUATION = re.compile(r"(-?\d+)\s*([-+*/x×])\s*(-?\d+)\s*=\s*(-?\d+)")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "x": int.__mul__, "×": int.__mul__}


def reply_style(text: str, gold: str) -> dict:
    """What separates chosen from rejected in the bundled pairs, measured on one reply: an `Answer:`
    line (vs none), that line equal to the last worked step (vs a copy slip), right step arithmetic
    (vs a slip), and the right answer."""
    got = ANSWER_LINE.findall(text)
    eqs = EQUATION.findall(text)
    ok = [int(c) == (int(a) // int(b) if op == "/" and int(b) else OPS.get(op, lambda *_: None)(int(a), int(b)))
          for a, op, b, c in eqs]  # fmt: skip
    return {
        "answer_line": bool(got),
        "consistent": bool(got) and bool(eqs) and float(got[-1]) == float(eqs[-1][3]),
        "correct": bool(got) and float(got[-1]) == float(gold),
        "steps": len(ok),
        "steps_right": sum(ok),
    }


def generation_check(run_dir: Path, model_ref: str, n: int, max_tokens: int) -> dict:
    """Greedy replies to the first n held-out prompts, base model vs base + adapter, decoded in
    batches of 16 (`decode.batch.generate_many`), scored with `reply_style`."""
    from mlxpt.decode.batch import generate_many
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.models import load

    rows = pref_rows("valid", n)
    out: dict = {}
    for name, adapter in (("base", None), ("tuned", str(run_dir))):
        model, tok = load(model_ref, adapter=adapter)
        prompts = [
            chat_prompt(tok, ([{"role": "system", "content": r["system"]}] if "system" in r else [])
                        + [{"role": "user", "content": r["prompt"]}])
            for r in rows
        ]  # fmt: skip
        t0 = time.time()
        texts = [c.text for i in range(0, n, 16) for c in generate_many(model, tok, prompts[i : i + 16], max_tokens)]
        styles = [reply_style(t, ANSWER_LINE.findall(r["chosen"])[-1]) for t, r in zip(texts, rows, strict=True)]
        steps = sum(s["steps"] for s in styles)
        out[name] = {
            **{f"{k}_rate": sum(s[k] for s in styles) / len(rows) for k in ("answer_line", "consistent", "correct")},
            "step_arithmetic_right": sum(s["steps_right"] for s in styles) / max(1, steps),
            "steps_per_reply": steps / len(rows),
            "n": len(rows),
            "max_tokens": max_tokens,
            "seconds": time.time() - t0,
            "samples": texts[:3],
        }
        print(name, {k: v for k, v in out[name].items() if k != "samples"}, flush=True)
    return out


def rm_check(run_dir: Path, n: int) -> dict:
    """Held-out pairwise accuracy of the saved reward model through the public scorer."""
    from mlxpt.decode.reward_model import load_reward_model

    rows = pref_rows("valid", n)
    rm = load_reward_model(run_dir)
    t0 = time.time()
    prompts = [([{"role": "system", "content": r["system"]}] if "system" in r else []) + [
        {"role": "user", "content": r["prompt"]}
    ] for r in rows]  # fmt: skip
    c = rm.score_batch(prompts, [r["chosen"] for r in rows])
    r_ = rm.score_batch(prompts, [r["rejected"] for r in rows])
    acc = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(c, r_, strict=True)) / len(rows)
    return {"scorer_accuracy": acc, "pairs": len(rows), "score_s_per_response": (time.time() - t0) / (2 * len(rows))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["dpo", "rm"], default="dpo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=200, help="first N pairs of assets/pref/train.jsonl")
    ap.add_argument("--valid", type=int, default=100, help="first N pairs of assets/pref/valid.jsonl")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", default="sigmoid")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=0, help="validate every N steps (default: steps / 2)")
    ap.add_argument("--generate", type=int, default=0, help="DPO: greedy-generate on N held-out prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapter", help="skip training: the finished run to check")
    args = ap.parse_args(argv)
    result: dict = {}
    if args.adapter:
        run_dir = Path(args.adapter)
    else:
        run_dir, _, result = train(args, Path(tempfile.mkdtemp(prefix=f"bench-{args.method}-")))
        print(json.dumps(result, indent=1), flush=True)
    if args.method == "rm":
        result["scorer"] = rm_check(run_dir, args.valid)
    elif args.generate:
        result["generation"] = generation_check(run_dir, args.model, args.generate, args.max_tokens)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
