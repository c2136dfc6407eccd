"""`mlxpt data self-answers --temperature T --top-p P --seed S` (issue 22): sampled answers for
replay; greedy stays the default (tiny random model)."""

from __future__ import annotations

import json

import pytest

from mlxpt.cli import main

PROMPTS = [{"prompt": f"Name a colour, number {i}."} for i in range(4)]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


def answers(tiny_dir, prompts, out, *extra) -> list[str]:
    argv = ["data", "self-answers", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_dir)]
    assert main([*argv, "--max-tokens", "12", *extra]) == 0
    return [json.loads(x)["messages"][-1]["content"] for x in out.read_text().splitlines()]


def test_sampled_answers_follow_the_seed_and_greedy_stays_the_default(tiny_dir, prompts, tmp_path):
    greedy = answers(tiny_dir, prompts, tmp_path / "g1.jsonl")
    assert answers(tiny_dir, prompts, tmp_path / "g2.jsonl", "--seed", "5") == greedy  # no temperature: greedy
    a = answers(tiny_dir, prompts, tmp_path / "a.jsonl", "--temperature", "1.0", "--seed", "1")
    b = answers(tiny_dir, prompts, tmp_path / "b.jsonl", "--temperature", "1.0", "--seed", "1")
    c = answers(tiny_dir, prompts, tmp_path / "c.jsonl", "--temperature", "1.0", "--seed", "2", "--top-p", "0.95")
    assert a == b and a != c and a != greedy


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--seed", "-3"]])
def test_bad_sampling_flags_exit_1_and_write_nothing(tiny_dir, prompts, tmp_path, capsys, bad):
    out = tmp_path / "out.jsonl"
    argv = ["data", "self-answers", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_dir), *bad]
    assert main(argv) == 1
    assert "E601" in capsys.readouterr().err and not out.exists()
