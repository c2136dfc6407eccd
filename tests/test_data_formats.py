"""Format detection, normalisation, splits, and the synthetic arithmetic dataset."""

import json
import re
import subprocess
import sys
from pathlib import Path

from mlxpt.data.formats import load_splits, read_jsonl
from mlxpt.data.synth import extract_answer, make_split, question_of

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "assets" / "sft"


def write(p: Path, rows) -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_kinds_and_normalised_data(tmp_path):
    chat = write(
        tmp_path / "c.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ]
            }
        ],
    )
    comp = write(tmp_path / "p.jsonl", [{"prompt": "p", "completion": "c", "meta": 1}])
    text = write(tmp_path / "t.jsonl", [{"text": "x"}])
    (r,) = read_jsonl(chat)
    assert r.kind == "chat" and r.data == {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]
    }
    (r,) = read_jsonl(comp)
    assert r.kind == "completions" and r.data == {"prompt": "p", "completion": "c"}
    assert r.extra == {"meta": 1}
    (r,) = read_jsonl(text)
    assert (r.kind, r.data, r.where) == ("text", {"text": "x"}, f"{text}:1")


def test_load_splits_folder_file_and_explicit_valid(tmp_path):
    write(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    assert [len(x) for x in load_splits(tmp_path)] == [2, 0]
    write(tmp_path / "valid.jsonl", [{"text": "v"}])
    assert [len(x) for x in load_splits(tmp_path)] == [2, 1]
    other = write(tmp_path / "other.jsonl", [{"text": "o"}] * 3)
    assert [len(x) for x in load_splits(tmp_path, str(other))] == [2, 3]
    assert [len(x) for x in load_splits(tmp_path / "train.jsonl")] == [2, 0]


# --- synthetic dataset ---------------------------------------------------------------------


def test_make_split_deterministic_and_distinct():
    a, b = make_split(300, 7), make_split(300, 7)
    assert a == b and a != make_split(300, 8)
    assert len({question_of(r) for r in a}) == 300


def test_answers_are_correct():
    """Every `a op b = c` line is true, steps chain, and Answer equals the last result."""
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for row in make_split(2000, 1):
        for m in row["messages"]:
            if m["role"] != "assistant":
                continue
            *steps, last = m["content"].split("\n")
            result = None
            for s in steps:
                a, op, b, eq, c = s.split()
                a, b, c = int(a), int(b), int(c)
                assert eq == "=" and ops[op](a, b) == c and c >= 0, s
                if op == "/":
                    assert a % b == 0, s
                result = c
            assert last == f"Answer: {result}"
            assert extract_answer(m["content"]) == str(result)
        assert row["answer"] == extract_answer(row["messages"][-1]["content"])


def test_mix_of_system_and_multiturn():
    rows = make_split(1000, 1)
    n_sys = sum(r["messages"][0]["role"] == "system" for r in rows)
    n_two = sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)
    assert 150 < n_sys < 350 and 60 < n_two < 200


def test_extract_answer_edge_cases():
    assert extract_answer("3 + 4 = 7\nAnswer: 7") == "7"
    assert extract_answer("Answer:7") == "7"
    assert extract_answer("answer :   12.") == "12"
    assert extract_answer("**Answer:** 1,234") == "1234"
    assert extract_answer("Answer: 5\nwait\nAnswer: 6") == "6"
    assert extract_answer("Answer: -3") == "-3"
    assert extract_answer("Answer: 4.0") == "4"
    assert extract_answer("Answer: 2.5") == "2.5"
    assert extract_answer("The answer is seven") is None
    assert extract_answer("Answer: ") is None
    assert extract_answer("") is None and extract_answer(None) is None


def test_dataset_files_valid_disjoint_and_reproducible(tmp_path):
    splits = {s: read_jsonl(SFT / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert [len(v) for v in splits.values()] == [2000, 200, 200]
    qs = {s: {question_of(r.data) for r in rows} for s, rows in splits.items()}
    assert len(qs["train"]) == 2000
    assert not qs["train"] & qs["valid"] and not qs["train"] & qs["test"]
    assert not qs["valid"] & qs["test"]
    for r in splits["test"]:
        assert r.extra["answer"] == extract_answer(r.data["messages"][-1]["content"])
    for run in ("a", "b"):
        subprocess.run(
            [sys.executable, str(ROOT / "assets" / "make_datasets.py"), "--out", str(tmp_path / run)],
            check=True, capture_output=True,
        )  # fmt: skip
    for s in splits:
        new = (tmp_path / "a" / f"{s}.jsonl").read_bytes()
        assert new == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
        assert new == (SFT / f"{s}.jsonl").read_bytes(), "assets/sft is stale: rerun the script"


# The seven question templates of mlxpt/data/synth.py, solved from the question text alone.
_SOLVERS = [
    (r"has (\d+) \w+\. \w+ gets (\d+) more and then gives (\d+) to", lambda a, b, c: a + b - c),
    (r"buys (\d+) \w+ of \w+ with (\d+) \w+ in each \w+\. \w+ already had (\d+)", lambda a, b, c: a * b + c),
    (r"A \w+ holds (\d+) \w+\. \w+ fills (\d+) \w+ and then uses (\d+)", lambda b, a, c: a * b - c),
    (r"shares (\d+) \w+ equally among (\d+) friends\. Then each friend finds (\d+)", lambda a, b, c: a // b + c),
    (r"has (\d+) \w+\. \w+ buys (\d+) \w+ with (\d+) \w+ in each and then gives away (\d+)", lambda a, b, c, d: a + b * c - d),
    (r"(\d+) friends each collect (\d+) \w+\. \w+ adds (\d+) more .* among (\d+) \w+\.", lambda n, a, b, m: (n * a + b) // m),
    (r"had (\d+) \w+ and gave away (\d+)\. \w+ has (\d+) times as many", lambda a, b, k: (a - b) * k),
]  # fmt: skip


def _solve(question: str) -> int:
    found = [(p, f) for p, f in _SOLVERS if re.search(p, question)]
    assert len(found) == 1, question
    pattern, fn = found[0]
    return fn(*map(int, re.search(pattern, question).groups()))


def test_grpo_prompt_files_answer_their_question_and_are_reproducible(tmp_path):
    """Each bundled GRPO prompt's answer is the answer to that question, solved independently.
    (A generator row with a follow-up turn carries the follow-up's answer: 12 % of the prompts
    once had it.) Regenerating gives the same bytes."""
    for split, n in (("train", 1000), ("test", 200)):
        rows = [json.loads(line) for line in (ROOT / "assets" / "grpo" / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        for r in rows:
            assert r["answer"] == str(_solve(r["prompt"])), r
    subprocess.run(
        [sys.executable, str(ROOT / "assets" / "make_prompts.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / "assets" / "grpo" / f"{split}.jsonl").read_bytes()
