"""Write assets/sft/{train,valid,test}.jsonl: deterministic arithmetic word problems of 1-4 steps.

Usage: python assets/make_datasets.py [--out assets/sft]. Running it twice gives identical bytes.
test.jsonl rows are full chats (so they validate as SFT data) plus an "answer" field; eval drops
the last assistant turn and checks the model's answer (an `Answer:` line or a bare number) against
it. No problem appears in two splits. assets/make_ood.py writes the out-of-distribution test set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import make_split  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

SPLITS = (("train", 2000, 1), ("valid", 200, 2), ("test", 200, 3))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "sft"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # shared, so no problem (`synth.problem_of`) appears in two splits
    for name, n, seed in SPLITS:
        rows = make_split(n, seed, exclude=seen)
        if name != "test":
            rows = [{"messages": r["messages"]} for r in rows]
        write_jsonl(out / f"{name}.jsonl", rows)
        print(f"{name}: {n} rows -> {out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
