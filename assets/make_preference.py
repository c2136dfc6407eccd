"""Write assets/pref/{train,valid}.jsonl: arithmetic preference pairs, chosen verifiably better.

Usage: python assets/make_preference.py [--out assets/pref]. Running it twice gives identical bytes.
Problems come from `mlxpt.data.synth` with new seeds and none of the SFT problems. Chosen is the
reply the prompt asks for: the worked answer ending `Answer: n`, or the bare number `n` when the
prompt asks for the number alone. Rejected is verifiably worse. For a worked reply:
- slip: one step's result is off by a little and the error carries through to a wrong answer;
- copy: correct steps, but the `Answer:` line does not match the last step;
- format: correct steps with no `Answer:` line;
- terse: only the right number, when the prompt asked for the steps (wrong by format).
For a bare-number reply:
- wrong: another number (an intermediate result, or the answer off by a little);
- ignore: the worked answer, when the prompt asked for the number alone (wrong by format).
So either `extract_answer(rejected) != n`, or rejected does not follow the prompt's instruction.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import Example, extract_answer, make_examples, make_split  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

SFT_SPLITS = ((2000, 1), (200, 2), (200, 3))  # assets/make_datasets.py: excluded, never repeated
SPLITS = (("train", 1000, 11), ("valid", 100, 12))
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def _parse(steps: list[str]) -> list[list]:
    out = []
    for line in steps:
        a, op, b, _, c = line.split()
        out.append([int(a), op, int(b), int(c)])
    return out


def _slip(steps: list[str], rng: random.Random) -> list[str]:
    """One step's result off by 1-3; later steps use the wrong value, so the answer is wrong too."""
    eqs = _parse(steps)
    k = rng.randrange(len(eqs))
    old, new = eqs[k][3], eqs[k][3] + rng.choice([-3, -2, -1, 1, 2, 3])
    if new < 0:
        new = old + 1
    eqs[k][3] = new
    for e in eqs[k + 1 :]:
        if e[0] == old:
            e[0] = new
        elif e[2] == old:
            e[2] = new
        if e[1] == "/" and e[2] == 0:
            e[2] = 1
        old, e[3] = e[3], OPS[e[1]](e[0], e[2])
        new = e[3]
    return [f"{a} {op} {b} = {c}" for a, op, b, c in eqs]


def _deltas(answer: int) -> list[int]:
    """Small errors that keep the number non-negative."""
    return [d for d in (-3, -2, -1, 1, 2, 10) if answer + d >= 0]


def _rejected(ex: Example, answer: int, rng: random.Random) -> str:
    steps = ex.steps
    worked = "\n".join([*steps, f"Answer: {answer}"])
    no_answer_line = "\n".join([*steps, f"So the result is {answer}."])
    if ex.bare:
        if rng.random() < 0.4:
            return worked  # ignore
        others = [int(s.split()[-1]) for s in steps[:-1] if int(s.split()[-1]) != answer]
        if others and rng.random() < 0.5:
            return str(rng.choice(others))
        return str(answer + rng.choice(_deltas(answer)))
    kinds, weights = ["slip", "copy", "format"], [4, 3, 3]
    if ex.asks_steps:
        kinds, weights = kinds + ["terse"], weights + [2]
    kind = rng.choices(kinds, weights=weights)[0]
    if kind == "slip":
        wrong = _slip(steps, rng)
        rejected = "\n".join([*wrong, f"Answer: {wrong[-1].split()[-1]}"])
        return no_answer_line if extract_answer(rejected) == str(answer) else rejected  # a slip that cancelled out
    if kind == "copy":
        return "\n".join([*steps, f"Answer: {answer + rng.choice(_deltas(answer))}"])
    return str(answer) if kind == "terse" else no_answer_line


def make_pair(ex: Example, rng: random.Random) -> dict:
    """A preference pair from a synth example: its first question and the reply it asks for."""
    msgs = ex.row["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    chosen = msgs[user + 1]["content"]
    answer = int(extract_answer(chosen))
    pair = {"prompt": msgs[user]["content"], "chosen": chosen, "rejected": _rejected(ex, answer, rng)}
    if system is not None:
        pair["system"] = system
    return pair


def make_pairs(n: int, seed: int, exclude: set[str]) -> list[dict]:
    rng = random.Random(seed + 1000)
    return [make_pair(ex, rng) for ex in make_examples(n, seed, exclude=exclude)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "pref"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # problems (`synth.problem_of`) already used
    for n, seed in SFT_SPLITS:
        make_split(n, seed, exclude=seen)
    for name, n, seed in SPLITS:
        write_jsonl(out / f"{name}.jsonl", make_pairs(n, seed, seen))
        print(f"{name}: {n} pairs -> {out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
