"""Generalisation and forgetting on the default model (issue 22's must-show numbers).

Every number is greedy accuracy from `mlxpt eval` (batched, the same extractor as everywhere):
held-out = assets/sft/test.jsonl, OOD = assets/ood/test.jsonl (its own generator, phrasings and
step counts never trained on). Each part writes `<out>/<part>.json` and prints a table row.

- `--part quickstart`: the `make run` recipe (60 steps, lr 5e-4, 20 warm-up) on the bundled data,
  then base and adapter on the first --test rows of the held-out split and the whole OOD split.
- `--part monitor-v1`: the same recipe on the previous bundled data (the 2-3-step templates, from
  git commit f3bea46) with the forgetting monitor on the OOD split (--regression-rows rows, an
  evaluation every --eval-every steps): the OOD drop as training goes.
- `--part overtrain`: a deliberately over-trained run on the previous data (--steps at --lr),
  plain, with --kl-to-base, with --replay (the base model's own answers to the bundled general
  prompts, assets/general/self_answers.jsonl) and with both; the base and each adapter scored on
  the first --test rows of the previous held-out split and of the OOD split, and the default
  forgetting monitor's KL to the base on the general prompts logged at step 0 and at the end;
  `replay-sampled` replays the base model's sampled answers (temperature 1, --samples seeds).

Usage: python bench/forgetting.py --part quickstart|monitor-v1|overtrain [--variants plain,kl,replay,both]
       [--steps 120] [--lr 1e-3] [--kl 0.5] [--replay-ratio 0.25] [--test 100] [--out bench-out/forgetting]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLXPT = str(Path(sys.executable).with_name("mlxpt"))
V1_COMMIT = "f3bea46"  # the last commit with the 2-3-step template data
TEST, OOD, ARITH = "assets/sft/test.jsonl", "assets/ood/test.jsonl", "assets/ood/arith.jsonl"
RECIPE = ["--learning-rate", "5e-4", "--warmup-steps", "20"]


def sh(args: list[str], log: Path) -> None:
    print("$", " ".join(args), file=sys.stderr, flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(args, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)


def v1_data(out: Path) -> Path:
    """The previous bundled SFT data (train/valid/test) from git, for the forgetting runs."""
    folder = out / "v1-sft"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        blob = subprocess.run(
            ["git", "show", f"{V1_COMMIT}:assets/sft/{name}.jsonl"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (folder / f"{name}.jsonl").write_bytes(blob)
    return folder


def train(out: Path, name: str, flags: list[str]) -> Path:
    runs = out / "runs"
    sh([MLXPT, "train", "sft", "--runs-dir", str(runs), "--name", name, *flags], out / "log.txt")
    return sorted(runs.glob(f"*-{name}"))[-1]


def evaluate(out: Path, run: Path | None, sets: list[str], limit: int | None, tag: str, compare=True) -> dict:
    """{"label data": accuracy %} of base and the run's adapter (`compare`), the adapter alone,
    or the base alone (`run` None) on `sets`."""
    res = out / f"eval-{tag}.json"
    args = [MLXPT, "eval", "--strategies", "greedy", "--out", str(res)]
    if run:
        args += ["--compare" if compare else "--adapter", str(run)]
    for s in sets:
        args += ["--data", s]
    if limit:
        args += ["--limit", str(limit)]
    sh(args, out / "log.txt")
    doc = json.loads(res.read_text())
    return {f"{r['label']} {r['data']}": round(100 * r["accuracy"], 1) for r in doc["results"]} | {
        f"n {r['data']}": r["total"] for r in doc["results"]
    }


def sampled_answers(out: Path, samples: int) -> Path:
    """The base model's sampled answers (temperature 1, `samples` seeds) to the bundled general
    prompts: draws from the base distribution, not its argmax, for the replay-sampled variant."""
    path = out / "self_answers_sampled.jsonl"
    if not path.is_file():
        parts = []
        for seed in range(samples):
            one = out / f"self_answers_seed{seed}.jsonl"
            sh([MLXPT, "data", "self-answers", "--prompts", "assets/general/prompts.jsonl", "--out", str(one),
                "--temperature", "1.0", "--seed", str(seed)], out / "log.txt")  # fmt: skip
            parts.append(one.read_text())
        path.write_text("".join(parts))
    return path


def monitor_series(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: r.get(k) for k in ("step", "val_loss", "regression_accuracy", "regression_kl")}
        for r in rows
        if r.get("event") == "eval"
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", required=True, choices=("quickstart", "monitor-v1", "overtrain"))
    ap.add_argument("--out", default="bench-out/forgetting")
    ap.add_argument("--test", type=int, default=100, help="held-out rows scored (the OOD split is scored whole)")
    ap.add_argument("--steps", type=int, default=120, help="overtrain: optimiser steps")
    ap.add_argument("--lr", default="1e-3", help="overtrain: peak learning rate")
    ap.add_argument("--kl", default="0.5", help="overtrain: --kl-to-base weight")
    ap.add_argument("--replay-ratio", default="0.25", help="overtrain: --replay-ratio")
    ap.add_argument("--variants", default="plain,kl,replay,both")
    ap.add_argument("--samples", type=int, default=4, help="replay-sampled: sampled answers per general prompt")
    ap.add_argument("--regression-rows", default="60")
    ap.add_argument("--eval-every", default="10")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict = {"part": args.part, "started": t0}
    if args.part == "quickstart":
        run = train(out, "quickstart", ["--steps", "60", *RECIPE, "--eval-every", "30", "--save-every", "30"])
        result["monitor"] = monitor_series(run)
        result["accuracy"] = evaluate(out, run, [TEST], args.test, "quickstart-test")
        result["accuracy"] |= evaluate(out, run, [OOD], None, "quickstart-ood")
    elif args.part == "monitor-v1":
        data = v1_data(out)
        flags = ["--data", str(data), "--steps", "60", *RECIPE, "--eval-every", args.eval_every, "--save-every", "60",
                 "--regression-data", OOD, "--regression-rows", args.regression_rows]  # fmt: skip
        run = train(out, "monitor-v1", flags)
        result["monitor"] = monitor_series(run)
    else:
        data = v1_data(out)
        common = ["--data", str(data), "--steps", str(args.steps), "--learning-rate", args.lr, "--warmup-steps", "10",
                  "--eval-every", str(args.steps), "--save-every", str(args.steps)]  # fmt: skip
        replay = ["--replay", "assets/general/self_answers.jsonl", "--replay-ratio", args.replay_ratio]
        flags = {
            "plain": [],
            "kl": ["--kl-to-base", args.kl],
            "replay": replay,
            "both": ["--kl-to-base", args.kl, *replay],
        }
        if "replay-sampled" in args.variants.split(","):
            sampled = sampled_answers(out, args.samples)
            flags["replay-sampled"] = ["--replay", str(sampled), "--replay-ratio", args.replay_ratio]
        sets = [str(data / "test.jsonl"), OOD, ARITH]
        result["base"] = evaluate(out, None, sets, args.test, "over-base")
        result["variants"] = {}
        for v in args.variants.split(","):
            run = train(out, f"over-{v}", common + flags[v])
            acc = evaluate(out, run, sets, args.test, f"over-{v}", compare=False)
            result["variants"][v] = {
                "flags": flags[v],
                "accuracy": acc,
                "monitor": monitor_series(run),
                "run": str(run),
            }
            (out / f"{args.part}.json").write_text(json.dumps(result, indent=1))  # after each variant
    result["wall_s"] = round(time.time() - t0)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
