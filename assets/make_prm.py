"""Write assets/prm/{train,valid}.jsonl: stepwise-labelled arithmetic solutions for `mlxpt train prm`.

Usage: python assets/make_prm.py [--out assets/prm]. Running it twice gives identical bytes.
Problems come from `mlxpt.data.synth` with new seeds, none of them in any other bundled split
(SFT, preference, GRPO, out-of-distribution), so a PRM trained here never saw a test problem.
Only problems whose prompt does not ask for the bare number are used. Each gives two rows in
TRL's stepwise form, `{"prompt", "completions": [step, ...], "labels": [...], "answer"}`:
- the correct solution, its `a op b = c` steps then `Answer: n`, every label true;
- a copy with one error at step k (k drawn uniformly over the steps and the answer line): step k's
  result is off by 1-3 and the later steps compute on from the wrong value (each of them exact),
  so the final answer is wrong; at the answer line, the number is off. Labels are true before k
  and false from k on (from step k the solution can no longer reach the answer).
A quarter of the prompts carry a system prompt: those rows use the chat form (a message list).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import extract_answer, make_examples, make_split, problem_of, question_of  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

ASSETS = Path(__file__).resolve().parent
SFT_SPLITS = ((2000, 1), (200, 2), (200, 3))  # assets/make_datasets.py
PREF_SPLITS = ((1000, 11), (100, 12))  # assets/make_preference.py
PROMPT_FILES = ("grpo/train.jsonl", "grpo/test.jsonl", "ood/test.jsonl", "ood/arith.jsonl")
SPLITS = (("train", 150, 41), ("valid", 60, 42))  # problems per split (two rows each), seed
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
DELTAS = (-3, -2, -1, 1, 2, 3)


def bundled_problems() -> set[str]:
    """Every problem of the other bundled splits (`synth.problem_of`)."""
    seen: set[str] = set()
    for n, seed in SFT_SPLITS + PREF_SPLITS:
        make_split(n, seed, exclude=seen)
    for name in PROMPT_FILES:
        for line in (ASSETS / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            seen.add(problem_of(row["prompt"] if "prompt" in row else question_of(row)))
    return seen


def _parse(steps: list[str]) -> list[list]:
    out = []
    for line in steps:
        a, op, b, _, c = line.split()
        out.append([int(a), op, int(b), int(c)])
    return out


def _slip(eqs: list[list], k: int, rng: random.Random) -> list[list] | None:
    """`eqs` with step k's result off by a small delta and every later step recomputed, exactly,
    from the wrong values; None when no delta keeps the later steps exact and the answer wrong."""
    for delta in rng.sample(DELTAS, len(DELTAS)):
        out = [list(e) for e in eqs]
        if out[k][3] + delta < 0:
            continue
        changed = {out[k][3]: out[k][3] + delta}
        out[k][3] += delta
        ok = True
        for e in out[k + 1 :]:
            for j in (0, 2):  # the operand that carried the old value
                if e[j] in changed:
                    e[j] = changed[e[j]]
                    break
            a, op, b = e[0], e[1], e[2]
            if op == "/" and (b == 0 or a % b):
                ok = False
                break
            c = OPS[op](a, b)
            if c < 0:
                ok = False
                break
            if c != e[3]:
                changed[e[3]] = c
            e[3] = c
        if ok and out[-1][3] != eqs[-1][3]:
            return out
    return None


def rows_of(q: str, system: str | None, steps: list[str], answer: int, rng: random.Random) -> list[dict]:
    """The correct row and its corrupted copy (see the module doc)."""
    prompt: str | list = (
        q if system is None else [{"role": "system", "content": system}, {"role": "user", "content": q}]
    )
    eqs = _parse(steps)
    assert eqs[-1][3] == answer, (steps, answer)
    correct = [*steps, f"Answer: {answer}"]
    k = rng.randrange(len(eqs) + 1)
    wrong = _slip(eqs, k, rng) if k < len(eqs) else None
    if wrong is None:  # an error on the answer line
        k = len(eqs)
        bad = answer + rng.choice([d for d in DELTAS if answer + d >= 0])
        corrupted = [*steps, f"Answer: {bad}"]
    else:
        corrupted = [f"{a} {op} {b} = {c}" for a, op, b, c in wrong] + [f"Answer: {wrong[-1][3]}"]
    n = len(correct)
    return [
        {"prompt": prompt, "completions": correct, "labels": [True] * n, "answer": str(answer)},
        {"prompt": prompt, "completions": corrupted, "labels": [i < k for i in range(n)], "answer": str(answer)},
    ]


def make_rows(n: int, seed: int, seen: set[str]) -> list[dict]:
    """Two rows for each of `n` worked problems of seed `seed`, none in `seen` (updated)."""
    examples = [ex for ex in make_examples(3 * n, seed, exclude=set(seen)) if not ex.bare][:n]
    assert len(examples) == n
    seen.update(problem_of(ex.row) for ex in examples)
    rng = random.Random(seed)
    out = []
    for ex in examples:
        msgs = ex.row["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        reply = next(m["content"] for m in msgs if m["role"] == "assistant")
        out += rows_of(question_of(ex.row), system, ex.steps, int(extract_answer(reply)), rng)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ASSETS / "prm"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen = bundled_problems()
    for name, n, seed in SPLITS:
        rows = make_rows(n, seed, seen)
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{name}: {len(rows)} rows -> {out / name}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
