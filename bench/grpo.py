"""GRPO benchmarks on the default model and the bundled prompts: the issue's must-show numbers.

- `--part sampling`: G completions of one prompt sampled as one batch (prompt prefilled once,
  KV cache copied to G rows) vs one by one, same sampler settings: generated tokens/s of each.
- `--part accuracy`: held-out greedy accuracy (bundled assets/grpo/test.jsonl, first --test
  prompts) of the starting model, then `--steps` of GRPO, then the tuned model; the answer
  format rate (`Answer: n` last line) before and after, so a format collapse shows.
  `--model` may be an SFT'd (fused) model: say which in BENCHMARKS.md.
- `--part score`: the same held-out accuracy for each of `--model a,b@checkpoint,...`.
- `--part step`: mean GRPO step time and peak memory over `--steps` (for the peer comparison
  in bench/grpo_peer.py, which runs mlx-lm-lora's GRPO on the same settings).

Usage: python bench/grpo.py --part sampling|accuracy|step|score [--model smollm2-135m] [--steps 40]
       [--test 100] [--G 8] [--max-tokens 96] [--lr 2e-5] [--out result.json] [--keep DIR]
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

from mlxpt import _blas  # noqa: E402

_blas.activate()

from mlxpt.config import GRPOConfig, apply_flat  # noqa: E402

PROMPT = "Mia has 12 apples. She buys 7 more and gives 5 to Leo. How many apples does Mia have now?"


def test_examples(tok, n: int, max_seq_len: int, max_tokens: int):
    from mlxpt.data.prompts import encode_prompts, load_prompts

    _, rows = load_prompts(ROOT / "assets" / "grpo", require=("answer",))
    examples, _ = encode_prompts(rows[:n], tok, max_seq_len, max_tokens, "drop")
    return examples


def greedy_accuracy(model, tok, examples, max_tokens: int) -> dict:
    """Accuracy, answer-format rate and true-equation share (`arithmetic` reward) of greedy
    completions, the accuracy on the first 100 prompts (the set of the earlier runs), which
    prompts were right, and the time it took."""
    from mlxpt.decode.batch import generate_many
    from mlxpt.rewards import REWARDS

    t0 = time.perf_counter()
    right: list[int] = []
    formatted = tokens = 0
    arithmetic = 0.0
    for i in range(0, len(examples), 16):
        part = examples[i : i + 16]
        for e, c in zip(part, generate_many(model, tok, [e.tokens for e in part], max_tokens), strict=True):
            right.append(int(REWARDS["accuracy"](e.row.prompt, c.text, **e.row.fields) == 1.0))
            formatted += REWARDS["format"](e.row.prompt, c.text) == 1.0
            arithmetic += REWARDS["arithmetic"](e.row.prompt, c.text)
            tokens += len(c.tokens)
    n = max(1, len(examples))
    return {"accuracy": sum(right) / n, "accuracy_first100": sum(right[:100]) / max(1, len(right[:100])),
            "format_rate": formatted / n, "arithmetic": arithmetic / n, "prompts": len(examples),
            "mean_tokens": tokens / n, "seconds": time.perf_counter() - t0, "right": right}  # fmt: skip


def _brief(score: dict) -> dict:
    return {k: v for k, v in score.items() if k != "right"}


def part_sampling(args) -> dict:
    from mlxpt.decode.batch import GroupStats, generate_group
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.decode.sampling import make_sampler
    from mlxpt.models.loader import load

    model, tok = load(args.model)
    prompt = chat_prompt(tok, [{"role": "user", "content": PROMPT}])
    generate_group(model, tok, prompt, 2, 8)  # warm-up
    out = {"G": args.G, "max_tokens": args.max_tokens, "repeats": args.repeats, "batched": [], "one_by_one": []}
    for r in range(args.repeats):
        st = GroupStats()
        t0 = time.perf_counter()
        generate_group(model, tok, prompt, args.G, args.max_tokens, make_sampler(1.0, seed=r), stats=st)
        out["batched"].append({"tokens": st.generated_tokens, "seconds": time.perf_counter() - t0})
        print(f"repeat {r}: batched {out['batched'][-1]}", flush=True)
        t0 = time.perf_counter()
        n = 0
        for i in range(args.G):
            (c,) = generate_group(model, tok, prompt, 1, args.max_tokens, make_sampler(1.0, seed=1000 * r + i))
            n += len(c.tokens)
        out["one_by_one"].append({"tokens": n, "seconds": time.perf_counter() - t0})
        print(f"repeat {r}: one by one {out['one_by_one'][-1]}", flush=True)
    for k in ("batched", "one_by_one"):
        out[f"{k}_tokens_per_s"] = statistics.median(x["tokens"] / x["seconds"] for x in out[k])
    out["speedup"] = out["batched_tokens_per_s"] / out["one_by_one_tokens_per_s"]
    print(f"G={args.G}: batched {out['batched_tokens_per_s']:.1f} tok/s, one by one "
          f"{out['one_by_one_tokens_per_s']:.1f} tok/s -> {out['speedup']:.2f}x")  # fmt: skip
    return out


def grpo_config(args, tmp: Path) -> GRPOConfig:
    cfg = GRPOConfig()
    apply_flat(
        cfg,
        {
            "model": args.model, "data": args.data, "runs_dir": str(tmp / "runs"), "steps": args.steps, "learning_rate": args.lr,
            "batch_size": args.batch_size, "num_generations": args.G, "max_completion_length": args.max_tokens,
            "eval_every": 0, "eval_batches": 0, "save_every": args.save_every or args.steps, "keep": 1000,
            "warmup_steps": 2, "beta": args.beta,
            "rewards": args.rewards, "reward_weights": args.reward_weights, "loss_type": args.loss_type, "temperature": args.temperature,
            "num_layers": args.num_layers, "rank": args.rank, "seed": args.seed,
            "skip_zero_std_groups": args.skip_zero_std,
        },
        source="bench",
    )  # fmt: skip
    return cfg


def train(args, tmp: Path) -> tuple[Path, list[dict], float]:
    from mlxpt.train.grpo import run_grpo

    events: list[dict] = []

    def emit(e: dict) -> None:
        events.append(e)
        if e["event"] == "step":
            print(f"step {e['step']:>3}  reward {e['reward_mean']:.3f}  acc {e.get('reward/accuracy')}  arith {e.get('reward/arithmetic')}  "
                  f"len {e['completion_len_mean']:.0f}  kl {e.get('kl', 0):.4f}  {e['step_time_s']:.1f} s", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    run_dir, _ = run_grpo(grpo_config(args, tmp), emit=emit)
    return run_dir, events, time.perf_counter() - t0


def part_step(args) -> dict:
    with tempfile.TemporaryDirectory() as t:
        _, events, wall = train(args, Path(t))
    steps = [e for e in events if e["event"] == "step"]
    times = [e["step_time_s"] for e in steps[1:]] or [steps[0]["step_time_s"]]  # step 1 compiles
    out = {"steps": len(steps), "mean_step_s": statistics.mean(times), "median_step_s": statistics.median(times),
           "peak_memory_mb": max(e["peak_memory_mb"] for e in steps), "wall_s": wall,
           "gen_share": statistics.mean(e["gen_time_s"] / e["step_time_s"] for e in steps[1:] or steps)}  # fmt: skip
    print(json.dumps(out))
    return out


def part_accuracy(args) -> dict:
    from mlxpt.models.loader import load

    model, tok = load(args.model)
    examples = test_examples(tok, args.test, 512, args.max_tokens)
    before = greedy_accuracy(model, tok, examples, args.max_tokens)
    print(f"before: {_brief(before)}", flush=True)
    del model
    with tempfile.TemporaryDirectory() as t:
        run_dir, events, wall = train(args, Path(args.keep or t))
        model, tok = load(args.model, adapter=str(run_dir))
        after = greedy_accuracy(model, tok, examples, args.max_tokens)
        print(f"after: {_brief(after)}", flush=True)
        curve = [{"step": 0, **before}]
        if args.save_every:  # every saved checkpoint, as an adapter
            from mlxpt.runs import list_checkpoints

            for ck in list_checkpoints(run_dir):
                model, tok = load(args.model, adapter=str(ck))
                curve.append(
                    {"step": int(ck.name.split("-")[-1]), **greedy_accuracy(model, tok, examples, args.max_tokens)}
                )
                print(f"checkpoint {ck.name}: {_brief(curve[-1])}", flush=True)
    steps = [e for e in events if e["event"] == "step"]
    return {"before": before, "after": after, "curve": curve, "gain_points": 100 * (after["accuracy"] - before["accuracy"]),
            "train_wall_s": wall, "steps": len(steps), "reward_first": steps[0]["reward_mean"],
            "reward_last5": statistics.mean(e["reward_mean"] for e in steps[-5:])}  # fmt: skip


def part_score(args) -> dict:
    """Held-out greedy accuracy of each `--model` (`path` or `path@adapter-or-checkpoint`)."""
    from mlxpt.models.loader import load

    out = {}
    for spec in args.model.split(","):
        path, _, adapter = spec.partition("@")
        model, tok = load(path, adapter=adapter or None)
        out[spec] = greedy_accuracy(model, tok, test_examples(tok, args.test, 512, args.max_tokens), args.max_tokens)
        print(f"{spec}: {_brief(out[spec])}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("sampling", "accuracy", "step", "score"), required=True)
    ap.add_argument("--model", default="smollm2-135m", help="score: comma-separated, each path[@adapter]")
    ap.add_argument(
        "--data",
        default=str(ROOT / "assets" / "grpo"),
        help="training prompts (held-out: always the bundled test split)",
    )
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--loss-type", default="grpo")
    ap.add_argument("--rewards", default="accuracy,format")
    ap.add_argument("--reward-weights", default=None, help="comma-separated, one per reward (default: 1 each)")
    ap.add_argument("--skip-zero-std", action="store_true", help="train only on groups whose rewards differ")
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--save-every", type=int, default=0, help="accuracy: also score the checkpoint every N steps")
    ap.add_argument("--keep", default=None, metavar="DIR", help="accuracy: keep the GRPO run under DIR/runs")
    args = ap.parse_args()
    parts = {"sampling": part_sampling, "accuracy": part_accuracy, "step": part_step, "score": part_score}
    result = parts[args.part](args)
    result["args"] = vars(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
