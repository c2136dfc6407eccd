"""Write assets/grpo/{train,test}.jsonl: verifiable prompts for GRPO from the SFT generator.

Usage: python assets/make_prompts.py [--out assets/grpo]. Running it twice gives identical bytes.
`--more N --seed S --out DIR` writes DIR/train.jsonl with N further prompts (seed S), none of them
in the SFT splits or the bundled GRPO splits: fresh training prompts for longer runs.
Each row is `{"prompt": question, "answer": "n"}` (a quarter with a `system` instruction, as in
the SFT data), so SFT on assets/sft then GRPO on these prompts is a natural pipeline. No
question repeats across the two splits or appears in any SFT split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import extract_answer, make_split, question_of  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

SFT_SPLITS = (("train", 2000, 1), ("valid", 200, 2), ("test", 200, 3))  # as in make_datasets.py
SPLITS = (("train", 1000, 11), ("test", 200, 12))


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
    ap.add_argument("--seed", type=int, default=13, help="seed of the --more prompts (11 and 12 are the bundled)")
    args = ap.parse_args(argv)
    if args.more and args.seed in (s for _, _, s in SFT_SPLITS + SPLITS):
        ap.error(f"--seed {args.seed} is a bundled split's seed: pick another")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for _, n, seed in SFT_SPLITS:
        make_split(n, seed, exclude=seen)  # the SFT questions, so none is reused here
    for name, n, seed in SPLITS:
        rows = [as_prompt(r) for r in make_split(n, seed, exclude=seen)]
        if not args.more:
            write(out / f"{name}.jsonl", rows)
    if args.more:
        write(out / "train.jsonl", [as_prompt(r) for r in make_split(args.more, args.seed, exclude=seen)])
    return 0


def write(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path.stem}: {len(rows)} rows -> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
