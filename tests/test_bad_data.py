"""Every bad dataset fixture is refused with its code, a one-line message and file:line."""

import json
import random
from pathlib import Path

import pytest

from mlxpt.data.check import check_report
from mlxpt.data.formats import load_splits, read_jsonl, scan_jsonl
from mlxpt.errors import DataError

HERE = Path(__file__).parent / "fixtures" / "bad_data"
CASES = json.loads((HERE / "cases.json").read_text())


def test_enough_distinct_cases():
    assert len(CASES) >= 25
    assert len({c["code"] for c in CASES.values()}) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_fixture_refused(name):
    case = CASES[name]
    path = HERE / name
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    err = info.value
    assert len(err.errors) == 1, [e.line() for e in err.errors]
    assert err.code == case["code"], err.line()
    assert case["fragment"] in err.what, err.line()
    where = f"{path}:{case['line']}" if case["line"] else str(path)
    assert err.where == where
    assert err.hint
    line = err.line()
    assert "\n" not in line and line.startswith(case["code"] + ": ")


def test_missing_file():
    with pytest.raises(DataError) as info:
        read_jsonl(HERE / "nope.jsonl")
    assert info.value.code == "E101" and "nope.jsonl" in info.value.where


def test_all_problems_collected_and_summarised(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "ok"}\n{"text": ""}\nnot json\n{"text": 3}\n{"text": "ok too"}\n')
    with pytest.raises(DataError) as info:
        read_jsonl(p)
    err = info.value
    assert [e.code for e in err.errors] == ["E151", "E105", "E150"]
    assert [e.where for e in err.errors] == [f"{p}:{i}" for i in (2, 3, 4)]
    assert err.what.startswith("3 invalid rows in train.jsonl; first: ")
    assert "\n" not in err.line()


def test_load_splits_collects_both_files(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "valid.jsonl").write_text("[1]\n")
    with pytest.raises(DataError) as info:
        load_splits(tmp_path)
    assert [e.code for e in info.value.errors] == ["E151", "E107"]


def test_load_splits_folder_without_train(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError) as info:
        load_splits(tmp_path)
    assert info.value.code == "E160" and "data.jsonl" in info.value.hint


@pytest.mark.parametrize(
    "raw",
    [
        b'\xef\xbb\xbf{"text": "bom"}\n{"text": "b"}\n',
        b'{"text": "crlf"}\r\n{"text": "b"}\r\n',
        b'\n\n{"text": "blank lines"}\n\n   \n{"text": "b"}',
        b'{"text": "no final newline"}\n{"text": "b"}',
    ],
)
def test_good_files_accepted(tmp_path, raw):
    p = tmp_path / "train.jsonl"
    p.write_bytes(raw)
    rows = read_jsonl(p)
    assert len(rows) == 2 and all(r.kind == "text" for r in rows)
    assert not rows[0].data["text"].startswith("\ufeff")
    assert rows[1].data["text"] == "b"


def test_good_chat_variants_accepted(tmp_path):
    call = {"type": "function", "function": {"name": "w", "arguments": "{}"}}
    rows = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": ""},
                {"role": "assistant", "content": "sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "w"}}],
            "id": 7,
        },
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = read_jsonl(p)
    assert out[1].data["tools"] and out[1].extra == {"id": 7}
    assert "tools" not in out[0].data
    assert out[0].where == f"{p}:1"


def test_fuzzed_files_never_crash(tmp_path):
    """Random byte damage gives rows or DataErrors, never another exception."""
    good = (HERE.parent.parent.parent / "assets" / "sft" / "valid.jsonl").read_bytes()[:4000]
    rng = random.Random(0)
    p = tmp_path / "f.jsonl"
    for _ in range(200):
        b = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] = rng.choice([rng.randrange(256), ord('"'), ord("{"), ord("\n"), 0xFF])
        p.write_bytes(bytes(b))
        rows, errors = scan_jsonl(p)
        assert all(isinstance(e, DataError) for e in errors)
        assert rows or errors


def test_check_report_lists_rejects_without_raising(tmp_path):
    lines = ['{"text": "ok"}'] + ['{"text": ""}'] * 25
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    text, n = check_report(str(tmp_path))
    assert n == 25
    assert "rejected: 25 rows" in text and "... and 5 more" in text
    assert text.count("E151") == 20


def test_check_report_does_not_count_a_row_the_template_rejects_as_valid_too(tmp_path):
    """A tool-call row the chat template cannot render was once counted both valid and rejected."""
    from tiny import make_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))  # its template needs `content`
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "1"},
                {"role": "assistant", "content": "ok"},
            ]
        },  # fmt: skip
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, n = check_report(str(tmp_path / "train.jsonl"), tokenizer=tok)
    assert n == 1 and "train: 1 valid rows (chat 1)" in text and "E204" in text, text
