"""Format detection, normalisation, splits, and the synthetic arithmetic dataset."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlxpt.data.formats import load_splits, read_jsonl
from mlxpt.data.synth import extract_answer, make_split, problem_of

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
    assert len({problem_of(r) for r in a}) == 300


def test_answers_are_correct():
    """Every `a op b = c` line is true, steps chain, and Answer equals the last result; a reply to a
    prompt that asks for the number alone is that number."""
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    n_bare = 0
    for row in make_split(2000, 1):
        for m in row["messages"]:
            if m["role"] != "assistant":
                continue
            if re.fullmatch(r"\d+", m["content"]):
                n_bare += 1
                continue
            *steps, last = m["content"].split("\n")
            assert steps, m["content"]
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
    assert 400 < n_bare < 900


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
    # a reply that is only a number (the bare-number rows)
    assert extract_answer("42") == "42" and extract_answer(" 1,200 ") == "1200"
    assert extract_answer("7.\n") == "7" and extract_answer("-3") == "-3" and extract_answer("2.5") == "2.5"
    assert extract_answer("42 apples") is None and extract_answer("1 2") is None


def test_dataset_files_valid_and_disjoint():
    splits = {s: read_jsonl(SFT / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert [len(v) for v in splits.values()] == [2000, 200, 200]
    qs = {s: {problem_of(r.data) for r in rows} for s, rows in splits.items()}
    assert [len(v) for v in qs.values()] == [2000, 200, 200]
    assert not qs["train"] & qs["valid"] and not qs["train"] & qs["test"]
    assert not qs["valid"] & qs["test"]
    for r in splits["test"]:
        assert r.extra["answer"] == extract_answer(r.data["messages"][-1]["content"])
    ood = read_jsonl(ROOT / "assets" / "ood" / "test.jsonl")
    assert len(ood) == 200 and all(r.kind == "chat" for r in ood)
    for r in ood:
        assert r.extra["answer"] == extract_answer(r.data["messages"][-1]["content"])
    arith = read_jsonl(ROOT / "assets" / "ood" / "arith.jsonl")
    assert len(arith) == 100 and len({r.data["messages"][0]["content"] for r in arith}) == 100
    for r in arith:  # the reply's one line is right: a op b = c with c the answer
        a, op, b, _, c = r.data["messages"][-1]["content"].splitlines()[0].split()
        assert (
            r.extra["answer"]
            == c
            == str({"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}[op](int(a), int(b)))
        )


# Each bundled data folder and the script that writes it (tests/test_synth_data.py checks the content).
SCRIPTS = {
    "sft": ("make_datasets.py", ("train", "valid", "test")),
    "pref": ("make_preference.py", ("train", "valid")),
    "grpo": ("make_prompts.py", ("train", "test")),
    "ood": ("make_ood.py", ("test", "arith")),
}


@pytest.mark.parametrize("folder", SCRIPTS)
def test_bundled_data_is_reproducible_and_fresh(folder, tmp_path):
    """Regenerating gives the same bytes twice, and the bytes in assets/: a changed generator
    without rerun scripts fails here."""
    script, splits = SCRIPTS[folder]
    for run in ("a", "b"):
        subprocess.run(
            [sys.executable, str(ROOT / "assets" / script), "--out", str(tmp_path / run)],
            check=True, capture_output=True,
        )  # fmt: skip
    for s in splits:
        new = (tmp_path / "a" / f"{s}.jsonl").read_bytes()
        assert new == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
        assert new == (ROOT / "assets" / folder / f"{s}.jsonl").read_bytes(), (
            f"assets/{folder} is stale: rerun {script}"
        )
