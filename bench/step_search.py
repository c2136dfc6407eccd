"""Step-level search measurements (issue 23, docs/prm.md, docs/compute-optimal.md).

    python bench/step_search.py split --data steps.jsonl --valid 40 --out DIR [--repeat R] [--extra assets/prm/train.jsonl]
    python bench/step_search.py prm-metrics --prm RUN [--prm RUN ...] --data DIR/valid.jsonl
    python bench/step_search.py rescore --eval RESULT.json --prm RUN [--out rows.json]
        (--data FILE --limit N as given to `mlxpt eval`: the prompts of the stored records)

`split`: a `mlxpt data label-steps` output cut into a PRM data folder: the last `--valid` rows
held out (valid.jsonl), the rest (plus `--extra` stepwise files) for training (train.jsonl).

`prm-metrics`: each PRM's step accuracy, first-error accuracy, AUC over steps and AUC of the
last step alone (decode/prm.step_metrics) on held-out stepwise rows, e.g. the policy's own
labelled steps.

`rescore`: the sample pools that `mlxpt eval --save-samples` stored (the same samples, hence the
same generated tokens, as its self-consistency and best-of-n rows) picked again with other
scorers: pass@N (the oracle), best-of-n by the arithmetic verifier, by the PRM's last step (the PRM as an outcome
model), by its lowest step, by its lowest step times the verifier's score, and a PRM-weighted vote (each answer's summed last-step scores).
Prints one row per data set, scorer and N with accuracy and generated tokens per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def split(data: str, valid: int, out: str, extra: list[str], repeat: int) -> None:
    rows = read_jsonl(data)
    keep = ("prompt", "completions", "labels")
    rows = [{k: r[k] for k in keep} for r in rows]
    train, held = rows[:-valid] * repeat, rows[-valid:]
    for path in extra:
        train += [{k: r[k] for k in keep} for r in read_jsonl(path)]
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("valid", held)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    print(f"{d}: {len(train)} train rows, {len(held)} valid rows")


def prm_metrics(runs: list[str], data: str) -> None:
    from mlxpt.decode.prm import load_process_reward_model, step_metrics

    rows = read_jsonl(data)
    labels = [[float(y) for y in r["labels"]] for r in rows]
    n_steps = sum(len(y) for y in labels)
    right = sum(y >= 0.5 for ys in labels for y in ys)
    print(f"{data}: {len(rows)} solutions, {n_steps} steps, {right} labelled >= 0.5")
    for run in runs:
        prm = load_process_reward_model(run)
        scores = [prm.score_steps(r["prompt"], r["completions"]) for r in rows]
        m = step_metrics(scores, labels)
        print(run, json.dumps({k: round(v, 3) for k, v in m.items()}))


def _steps(text: str) -> list[str]:
    return [x for x in text.split("\n") if x.strip()] or [""]


def rescore(eval_json: str, prm_run: str | None, out: str | None, data: list[str], limit: int | None) -> None:
    from mlxpt.decode.evaluate import read_rows

    result = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    details = result.get("details")
    if not details:
        sys.exit(f"{eval_json}: no details; run mlxpt eval with --save-samples")
    prm = None
    if prm_run:
        from mlxpt.decode.prm import load_process_reward_model

        prm = load_process_reward_model(prm_run)
    prompts = [(Path(d).parent.name + "/" + Path(d).stem, row.prompt) for d in data for row in read_rows(d, limit)]
    rows = []
    for model, recs in details.items():
        if len(recs) != len(prompts):
            sys.exit(f"{eval_json}: {len(recs)} records of {model}, but --data/--limit give {len(prompts)} prompts")
        by_set: dict = {}
        for (name, prompt), r in zip(prompts, recs, strict=True):
            if r.get("pool"):
                by_set.setdefault(f"{model} {name}", []).append((prompt, r))
        for label, pairs in by_set.items():
            rows += _rescored(label, pairs, prm)
    for r in rows:
        if "per_prompt" in r:
            continue
        print(
            f"{r['data']:<24} {r['scorer']:<18} N={r['n']:<3} {r['accuracy'] * 100:6.1f}%  {r['mean_tokens']:7.1f} tok/prompt"
        )
    if out:
        Path(out).write_text(json.dumps(rows, indent=1), encoding="utf-8")


def _rescored(label: str, pairs: list, prm) -> list[dict]:
    """Rows of every scorer and N for one data set's (prompt, record) pairs."""
    from mlxpt.decode.scorers import arithmetic_verifier
    from mlxpt.rewards.extract import same_answer

    per = []
    for prompt, r in pairs:
        pool = r["pool"]
        rec = {"gold": r["gold"], "answers": pool["answers"], "tokens": pool["tokens"],
               "verifier": [arithmetic_verifier(prompt, t) for t in pool["texts"]]}  # fmt: skip
        if prm is not None:
            got = prm.score_many(prompt, [_steps(t) for t in pool["texts"]])
            rec["prm_last"] = [s[-1] for s in got]
            rec["prm_min"] = [min(s) for s in got]
            rec["prm_min_x_verifier"] = [a * b for a, b in zip(rec["prm_min"], rec["verifier"], strict=True)]
        per.append(rec)

    def pick(p: dict, name: str, n: int):
        if name == "pass":  # the oracle: any of the first n right
            return next((a for a in p["answers"][:n] if same_answer(a, p["gold"])), None)
        if name == "prm_vote":  # weighted vote: each answer's summed last-step scores
            w: dict = {}
            for a, s in zip(p["answers"][:n], p["prm_last"][:n], strict=True):
                if a is not None:
                    w[a] = w.get(a, 0.0) + s
            return max(w, key=w.get) if w else None
        best = max(range(n), key=lambda j: (p[name][j], -j))
        return p["answers"][best]

    from mlxpt.decode.prm import roc_auc

    right = [bool(same_answer(a, p["gold"])) for p in per for a in p["answers"]]
    aucs = {name: roc_auc([x for p in per for x in p[name]], right)
            for name in ("verifier", "prm_last", "prm_min", "prm_min_x_verifier") if name in per[0]}  # fmt: skip
    print(f"{label}: {len(right)} samples, {sum(right)} right; sample-level AUC "
          + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items() if v is not None))  # fmt: skip
    rows = [{"data": label, "per_prompt": per}]  # every sample's scores, for sub-slices
    for n in sorted({len(p["answers"]) for p in per} | {1, 2, 4, 8, 16}):
        if n > min(len(p["answers"]) for p in per):
            continue
        tokens = sum(sum(p["tokens"][:n]) for p in per) / len(per)
        for name in ("pass", "verifier", "prm_last", "prm_min", "prm_min_x_verifier", "prm_vote"):
            if name.startswith("prm") and prm is None:
                continue
            correct = sum(bool(same_answer(pick(p, name, n), p["gold"])) for p in per)
            rows.append({"data": label, "scorer": name, "n": n, "accuracy": correct / len(per),
                         "prompts": len(per), "mean_tokens": round(tokens, 1)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--data", required=True)
    s.add_argument("--valid", type=int, default=40)
    s.add_argument("--out", required=True)
    s.add_argument("--extra", action="append", default=[])
    s.add_argument("--repeat", type=int, default=1, help="the policy's train rows this many times")
    m = sub.add_parser("prm-metrics")
    m.add_argument("--prm", action="append", required=True)
    m.add_argument("--data", required=True)
    r = sub.add_parser("rescore")
    r.add_argument("--eval", required=True)
    r.add_argument("--prm")
    r.add_argument("--out")
    r.add_argument("--data", action="append", required=True)
    r.add_argument("--limit", type=int)
    a = p.parse_args(argv)
    if a.cmd == "split":
        split(a.data, a.valid, a.out, a.extra, a.repeat)
    elif a.cmd == "prm-metrics":
        prm_metrics(a.prm, a.data)
    else:
        rescore(a.eval, a.prm, a.out, a.data, a.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
