"""Combine `mlxpt eval --save-samples` result files (e.g. one per slice of the test set) and
re-run adaptive stopping offline on the stored sample answers, for several thresholds and batch
sizes, against fixed-N self-consistency on the same samples.

    .venv/bin/python bench/tts_eval.py eval_p0.json eval_p1.json ... [--png chart.png] [--gold prompts.jsonl]

`--gold` re-scores every stored answer against that prompt file's `answer` field (row = the
record's `line`): for a result file made before its labels were corrected.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.decode.votes import adaptive_schedule, vote  # noqa: E402
from mlxpt.rewards.extract import same_answer  # noqa: E402


def regrade(doc: dict, gold: list[str]) -> None:
    """Score `doc`'s stored answers against `gold` (by line) and recount its results in place."""
    correct: dict[tuple[str, str], int] = {}
    for label, recs in doc.get("details", {}).items():
        for r in recs:
            r["gold"] = gold[r["line"] - 1]
            for key, (answer, _) in r["answers"].items():
                r["answers"][key][1] = same_answer(answer, r["gold"])
                correct[label, key] = correct.get((label, key), 0) + r["answers"][key][1]
    for r in doc["results"]:
        key = (r["label"], f"{r['strategy']}@{r['n']}")
        if key in correct:
            r["correct"] = correct[key]
            r["accuracy"] = r["correct"] / r["total"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--png", default=None)
    p.add_argument("--gold", default=None, help="prompt JSONL whose answers replace the stored gold answers")
    a = p.parse_args()
    gold = [json.loads(line)["answer"] for line in Path(a.gold).read_text().splitlines()] if a.gold else None
    totals: dict[tuple[str, str, int], list] = {}  # (label, strategy, n) -> [correct, total, tokens, seconds, samples]
    records: dict[str, list] = {}
    for f in a.files:
        doc = json.loads(Path(f).read_text())
        if gold is not None:
            regrade(doc, gold)
        for r in doc["results"]:
            t = totals.setdefault((r["label"], r["strategy"], r["n"]), [0, 0, 0, 0.0, 0.0])
            t[0] += r["correct"]
            t[1] += r["total"]
            t[2] += r["generated_tokens"]
            t[3] += r["seconds"]
            t[4] += r["mean_samples"] * r["total"]
        for label, recs in doc.get("details", {}).items():
            records.setdefault(label, []).extend(recs)
    print(
        f"{'model':<8} {'strategy':<17} {'N':>3} {'accuracy':>9} {'correct':>8} {'samples':>8} {'tokens':>8} {'seconds':>8}"
    )
    for (label, s, n), (c, tot, tok, sec, smp) in totals.items():
        print(
            f"{label:<8} {s:<17} {n:>3} {c / tot * 100:>8.1f}% {c:>4}/{tot:<3} {smp / tot:>8.2f} {tok:>8} {sec:>8.1f}"
        )
    for label, recs in records.items():
        pools = [(r["pool"]["answers"], r["gold"]) for r in recs if "pool" in r]
        if not pools:
            continue
        budget = len(pools[0][0])
        fixed = sum(same_answer(vote(ans[:budget]).answer, gold) for ans, gold in pools)
        print(f"\n[{label}] {len(pools)} prompts; fixed N={budget} self-consistency: {fixed}/{len(pools)}")
        print(
            f"{'batch':>5} {'confidence':>10} {'accuracy':>9} {'mean samples':>12} {'of budget':>9} {'same answer as N=16':>20}"
        )
        for batch in (1, 2, 4):
            for conf in (None, 0.99, 0.95, 0.9, 0.8):
                used = [adaptive_schedule(ans, budget, batch, conf) for ans, _ in pools]
                got = [vote(ans[:u]).answer for (ans, _), u in zip(pools, used, strict=True)]
                ok = sum(same_answer(g, gold) for g, (_, gold) in zip(got, pools, strict=True))
                same = sum(g == vote(ans[:budget]).answer for g, (ans, _) in zip(got, pools, strict=True))
                mean = sum(used) / len(used)
                print(
                    f"{batch:>5} {conf if conf else 'safe':>10} {ok / len(pools) * 100:>8.1f}% "
                    f"{mean:>12.2f} {mean / budget * 100:>8.1f}% {same:>14}/{len(pools)}"
                )
    if a.png:
        from mlxpt.commands.eval import series_of
        from mlxpt.decode.plot import terminal_chart, write_png

        rows = [
            {"label": lb, "strategy": s, "n": n, "accuracy": c / tot, "mean_samples": smp / tot}
            for (lb, s, n), (c, tot, _, _, smp) in totals.items()
        ]
        series = series_of(rows)
        total = max(t[1] for t in totals.values())
        print()
        print(terminal_chart(series, title=f"accuracy vs samples ({total} prompts)"))
        write_png(a.png, series, title=f"accuracy vs samples, {total} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
