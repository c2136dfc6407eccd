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
