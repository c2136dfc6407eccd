"""`mlxpt data check` knows every method's data: preference pairs and GRPO prompts are checked as
such (detected from the first row, or named with --method), not rejected as SFT rows."""

from __future__ import annotations

import json

import pytest

from mlxpt.cli import main
from mlxpt.config import ASSETS


@pytest.mark.parametrize(
    "folder,says", [("pref", "1000 preference pairs"), ("grpo", "1000 prompts"), ("sft", "valid rows")]
)
def test_the_bundled_data_of_every_method_passes(folder, says, capsys):
    assert main(["data", "check", str(ASSETS / folder)]) == 0
    out = capsys.readouterr().out
    assert says in out and "rejected: 0 rows" in out


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo", "rm"])
def test_method_names_the_kind(method, capsys):
    assert main(["data", "check", str(ASSETS / "pref"), "--method", method]) == 0
    assert "preference pairs" in capsys.readouterr().out


def test_bad_rows_of_each_kind_are_named_with_their_line(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"})
        + "\n"
    )
    assert main(["data", "check", str(pairs)]) == 1
    out = capsys.readouterr().out
    assert "1 preference pairs" in out and f"{pairs}:2" in out
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n" + json.dumps({"prompt": 7}) + "\n")
    assert main(["data", "check", str(prompts), "--method", "grpo"]) == 1
    out = capsys.readouterr().out
    assert "1 prompts" in out and f"{prompts}:2" in out
    # named as SFT, a preference file is checked as SFT rows (and says what is missing)
    assert main(["data", "check", str(pairs), "--method", "sft"]) == 1
    assert "E1" in capsys.readouterr().out


def test_a_leading_byte_order_mark_does_not_change_the_detected_kind(tmp_path, capsys):
    """A file saved with a UTF-8 BOM (as some editors do) is detected as what it holds, like training reads it."""
    bom = b"\xef\xbb\xbf"
    step = {"prompt": "What is 2+3?", "completions": ["2 + 3 = 5", "Answer: 5"], "labels": [True, True]}
    rows = {
        "steps.jsonl": (step, "4 stepwise rows"),
        "prompts.jsonl": ({"prompt": "What is 2+3?", "answer": "5"}, "4 prompts"),
        "pairs.jsonl": ({"prompt": "q", "chosen": "a", "rejected": "b"}, "4 preference pairs"),
    }
    for name, (row, says) in rows.items():
        path = tmp_path / name
        path.write_bytes(bom + "".join(json.dumps(row) + "\n" for _ in range(4)).encode())
        assert main(["data", "check", str(path)]) == 0, capsys.readouterr().out
        out = capsys.readouterr().out
        assert says in out and "rejected: 0 rows" in out
    out = tmp_path / "converted.jsonl"
    assert main(["data", "convert", str(tmp_path / "steps.jsonl"), "--out", str(out)]) == 0
    assert [json.loads(x)["completions"] for x in out.read_text().splitlines()] == [step["completions"]] * 4
