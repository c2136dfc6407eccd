"""Write assets/grpo/{train,test}.jsonl: verifiable prompts for GRPO from the SFT generator.

Usage: python assets/make_prompts.py [--out assets/grpo]. Running it twice gives identical bytes.
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

from mlxpt.data.synth import make_split, question_of  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

SFT_SPLITS = (("train", 2000, 1), ("valid", 200, 2), ("test", 200, 3))  # as in make_datasets.py
SPLITS = (("train", 1000, 11), ("test", 200, 12))


def as_prompt(row: dict) -> dict:
    out = {}
    system = next((m["content"] for m in row["messages"] if m["role"] == "system"), None)
    if system:
        out["system"] = system
    return {**out, "prompt": question_of(row), "answer": row["answer"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "grpo"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for _, n, seed in SFT_SPLITS:
        make_split(n, seed, exclude=seen)  # the SFT questions, so none is reused here
    for name, n, seed in SPLITS:
        rows = [as_prompt(r) for r in make_split(n, seed, exclude=seen)]
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{name}: {n} rows -> {out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
