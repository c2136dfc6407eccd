"""A process reward model against an outcome-only reward model, used the same way: each scores
every step prefix of the held-out stepwise rows, and the step metrics of decode/prm.py are taken.

    python bench/prm_vs_rm.py pairs --out DIR            # preference pairs from assets/prm (for `train rm`)
    python bench/prm_vs_rm.py score --prm RUN --rm RUN   # metrics of both on assets/prm/valid.jsonl

Pairs: each bundled problem's correct solution (chosen) against its corrupted copy (rejected), the
steps joined by newlines, so the reward model sees the same solutions with outcome labels only.
Scoring: the PRM's probability after each step (`score_many`); the reward model's reward of the
prompt with the steps so far as the response. The AUC needs no threshold; the reward model's
step and first-error accuracies use the threshold that is best on the train split (its rewards
have no fixed scale), the PRM's 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.config import ASSETS  # noqa: E402


def rows_of(split: str) -> list[dict]:
    return [json.loads(x) for x in (ASSETS / "prm" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def make_pairs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = rows_of(split)
        pairs = []
        for good, bad in zip(rows[0::2], rows[1::2], strict=True):
            assert good["prompt"] == bad["prompt"] and all(good["labels"]) and not all(bad["labels"])
            chosen, rejected = "\n".join(good["completions"]), "\n".join(bad["completions"])
            if isinstance(good["prompt"], list):  # chat form: responses are assistant messages
                chosen, rejected = (
                    [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}],
                )
            pairs.append({"prompt": good["prompt"], "chosen": chosen, "rejected": rejected})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        print(f"{split}: {len(pairs)} pairs -> {out / split}.jsonl")


def rm_prefix_scores(rm, rows: list[dict]) -> list[list[float]]:
    prompts, responses, sizes = [], [], []
    for r in rows:
        steps = r["completions"]
        sizes.append(len(steps))
        for k in range(1, len(steps) + 1):
            prompts.append(r["prompt"])
            text = "\n".join(steps[:k])
            responses.append([{"role": "assistant", "content": text}] if isinstance(r["prompt"], list) else text)
    flat = rm.score_batch(prompts, responses)
    out, i = [], 0
    for n in sizes:
        out.append(flat[i : i + n])
        i += n
    return out


def best_threshold(scores: list[list[float]], labels: list[list[bool]]) -> float:
    from mlxpt.decode.prm import step_accuracy

    candidates = sorted({p for s in scores for p in s})
    return max(candidates, key=lambda t: step_accuracy(scores, labels, t))


def metrics(scores, labels, threshold: float) -> dict:
    from mlxpt.decode.prm import first_error_accuracy, roc_auc, step_accuracy

    return {
        "step_accuracy": step_accuracy(scores, labels, threshold),
        "first_error_accuracy": first_error_accuracy(scores, labels, threshold),
        "auc": roc_auc([p for s in scores for p in s], [y for ys in labels for y in ys]),
        "last_step_auc": roc_auc([s[-1] for s in scores], [y[-1] for y in labels]),
    }


def score(prm_run: str, rm_run: str) -> None:
    from mlxpt.decode.prm import load_process_reward_model
    from mlxpt.decode.reward_model import load_reward_model

    valid, train = rows_of("valid"), rows_of("train")
    labels = [r["labels"] for r in valid]
    prm = load_process_reward_model(prm_run)
    p_scores = [prm.score_many(r["prompt"], [r["completions"]])[0] for r in valid]
    results = {"prm": metrics(p_scores, labels, 0.5)}
    del prm
    rm = load_reward_model(rm_run, batch_size=16)
    t = best_threshold(rm_prefix_scores(rm, train), [r["labels"] for r in train])
    results["rm"] = {**metrics(rm_prefix_scores(rm, valid), labels, t), "threshold": t}
    steps = sum(len(x) for x in labels)
    print(f"{len(valid)} held-out solutions, {steps} steps ({sum(sum(x) for x in labels)} correct)")
    for name, m in results.items():
        print(f"{name}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("--prm", required=True)
    s.add_argument("--rm", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pairs":
        make_pairs(Path(args.out))
    else:
        score(args.prm, args.rm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
