"""Write assets/pref/{train,valid}.jsonl: arithmetic preference pairs, chosen verifiably better.

Usage: python assets/make_preference.py [--out assets/pref]. Running it twice gives identical bytes.
Questions come from `mlxpt.data.synth` with new seeds and none of the SFT questions. Chosen is the
worked answer ending `Answer: n`; rejected is verifiably worse (`extract_answer` != n):
- slip: one step's result is off by a little and the error carries through to a wrong answer;
- copy: correct steps, but the `Answer:` line does not match the last step;
- format: correct steps with no `Answer:` line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import extract_answer, make_split  # noqa: E402
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


def make_pair(row: dict, rng: random.Random) -> dict:
    """A preference pair from a synth chat row: its first question and worked answer."""
    msgs = row["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    chosen = msgs[user + 1]["content"]
    *steps, answer_line = chosen.splitlines()
    answer = int(answer_line.split(":")[1])
    kind = rng.choices(["slip", "copy", "format"], weights=[4, 3, 3])[0]
    if kind == "slip":
        wrong = _slip(steps, rng)
        rejected = "\n".join([*wrong, f"Answer: {wrong[-1].split()[-1]}"])
    elif kind == "copy":
        rejected = "\n".join([*steps, f"Answer: {answer + rng.choice([-2, -1, 1, 2, 10])}"])
    else:
        rejected = "\n".join([*steps, f"So the result is {answer}."])
    if extract_answer(rejected) == str(answer):  # a slip that cancelled out: fall back to format
        rejected = "\n".join([*steps, f"So the result is {answer}."])
    pair = {"prompt": msgs[user]["content"], "chosen": chosen, "rejected": rejected}
    if system is not None:
        pair["system"] = system
    return pair


def make_pairs(n: int, seed: int, exclude: set[str]) -> list[dict]:
    rng = random.Random(seed + 1000)
    return [make_pair(row, rng) for row in make_split(n, seed, exclude=exclude)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "pref"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for n, seed in SFT_SPLITS:
        make_split(n, seed, exclude=seen)
    sft_questions = set(seen)
    for name, n, seed in SPLITS:
        pairs = make_pairs(n, seed, seen)
        assert not {p["prompt"] for p in pairs} & sft_questions
        write_jsonl(out / f"{name}.jsonl", pairs)
        print(f"{name}: {n} pairs -> {out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
