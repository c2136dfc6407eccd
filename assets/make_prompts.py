"""Write assets/grpo/{train,test}.jsonl: verifiable prompts for GRPO from the SFT generator.

Usage: python assets/make_prompts.py [--out assets/grpo]. Running it twice gives identical bytes.
`--more N --seed S --out DIR` writes DIR/train.jsonl with N further prompts (seed S), none of them
in the SFT splits or the bundled GRPO splits: fresh training prompts for longer runs.
Each row is `{"prompt": question, "answer": "n"}` (a quarter with a `system` instruction, half
asking for the steps, as in the SFT data), so SFT on assets/sft then GRPO on these prompts is a
natural pipeline. The generator's bare-number prompts are left out: the default `format` reward
wants an `Answer:` line, so it would reward ignoring "Reply with just the number." No problem
repeats across the two splits or appears in any SFT or preference split (make_preference.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import extract_answer, make_examples, make_split, problem_of, question_of  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

SFT_SPLITS = (("train", 2000, 1), ("valid", 200, 2), ("test", 200, 3))  # as in make_datasets.py
PREF_SPLITS = (("train", 1000, 11), ("valid", 100, 12))  # as in make_preference.py
SPLITS = (("train", 1000, 21), ("test", 200, 22))


def as_prompt(row: dict) -> dict:
    """The row's first question with the answer of its first reply. A row with a follow-up turn
    has the follow-up's answer in row["answer"], which is not the first question's."""
    out = {}
    system = next((m["content"] for m in row["messages"] if m["role"] == "system"), None)
    if system:
        out["system"] = system
    first_reply = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
    return {**out, "prompt": question_of(row), "answer": extract_answer(first_reply)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "grpo"))
    ap.add_argument("--more", type=int, default=0, metavar="N", help="only N further training prompts")
    ap.add_argument("--seed", type=int, default=31, help="seed of the --more prompts (21 and 22 are the bundled)")
    args = ap.parse_args(argv)
    if args.more and args.seed in (s for _, _, s in SFT_SPLITS + PREF_SPLITS + SPLITS):
        ap.error(f"--seed {args.seed} is a bundled split's seed: pick another")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # problems (`synth.problem_of`) already used
    for _, n, seed in SFT_SPLITS + PREF_SPLITS:
        make_split(n, seed, exclude=seen)  # the SFT and preference problems, so none is reused here
    for name, n, seed in SPLITS:
        rows = worked_prompts(n, seed, seen)
        if not args.more:
            write(out / f"{name}.jsonl", rows)
    if args.more:
        write(out / "train.jsonl", worked_prompts(args.more, args.seed, seen))
    return 0


def worked_prompts(n: int, seed: int, seen: set[str]) -> list[dict]:
    """`n` prompts of seed `seed` that do not ask for the bare number, none in `seen` (updated)."""
    examples = [ex for ex in make_examples(2 * n, seed, exclude=set(seen)) if not ex.bare][:n]
    assert len(examples) == n
    seen.update(problem_of(ex.row) for ex in examples)
    return [as_prompt(ex.row) for ex in examples]


def write(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path.stem}: {len(rows)} rows -> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
