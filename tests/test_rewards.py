"""Reward functions, answer extraction and the reward guard: hand-made inputs, faulty functions."""

from __future__ import annotations

import json
import math
import time

import pytest

from mlxpt.errors import ConfigError
from mlxpt.rewards import REWARDS, RewardGuard, RewardStop, load_reward, parse_rewards
from mlxpt.rewards.extract import extract, normalize, same_answer


@pytest.mark.parametrize(
    ("text", "how", "want"),
    [
        ("3 + 4 = 7\nAnswer: 7", "auto", "7"),
        ("**Answer:** $1,250", "auto", "1250"),
        ("so the answer is 12.50.", "auto", "12.5"),
        ("#### 72", "auto", "72"),
        ("x \\boxed{\\frac{3}{4}} y", "auto", "0.75"),
        ("\\boxed{{1}+{2}}", "boxed", "{1}+{2}"),
        ("<answer> 42 </answer> and 43 later", "auto", "42"),  # the tag wins over the last number
        ("<answer>Paris</answer>", "tag", "paris"),
        ("I think 5, no, 6.", "last_number", "6"),
        ("Answer: -3", "answer", "-3"),
        ("no digits at all", "auto", None),
        ("", "auto", None),
        ("Answer: 7", "hash", None),  # the named method only
        ("val=9; val=10", "re:val=(\\d+)", "10"),
    ],
)
def test_extract(text, how, want):
    assert extract(text, how) == want


def test_normalize_and_compare():
    assert normalize("1,200.50") == "1200.5" and normalize("7.0") == "7" and normalize(" $5. ") == "5"
    assert same_answer("7.0", 7) and same_answer("1/2", "0.5") and same_answer("Paris", "paris")
    assert not same_answer(None, "1") and not same_answer("1", None) and not same_answer("8", "7")
    with pytest.raises(ConfigError) as e:
        extract("x", "nearest")
    assert e.value.code == "E607"
    with pytest.raises(ConfigError) as e:
        extract("x", "re:(")
    assert e.value.code == "E606"


def test_builtin_rewards():
    acc, fmt, length = REWARDS["accuracy"], REWARDS["format"], REWARDS["length"]
    assert acc("q", "2 + 2 = 4\nAnswer: 4", answer="4") == 1.0
    assert acc("q", "Answer: 5", answer=4) == 0.0
    assert acc("q", "Answer: 4") is None  # no answer on the row: abstain
    assert fmt("q", "1 + 1 = 2\nAnswer: 2") == 1.0 and fmt("q", "Answer: 2 because") == 0.0
    assert fmt("q", "DONE", format_regex="DONE") == 1.0
    assert REWARDS["tags"]("q", "<think>a</think><answer>1</answer>") == 1.0
    assert REWARDS["tags"]("q", "<answer>1</answer>") == 0.0
    # soft over-length: 0 up to 96 of 128 tokens, -0.5 halfway through the last quarter, -1 at the limit
    assert length("q", "", completion_tokens=96, max_completion_length=128) == 0.0
    assert length("q", "", completion_tokens=112, max_completion_length=128) == pytest.approx(-0.5)
    assert length("q", "", completion_tokens=128, max_completion_length=128) == -1.0


@pytest.mark.parametrize(
    ("completion", "want"),
    [  # steps: equations with an operator, false bare equalities, the final answer vs the last result
        ("6 * 5 = 30\n13 + 30 = 43\n43 - 20 = 23\nAnswer: 23", 1.0),
        ("13 * 5 = 60\n60 - 60 = 0\nAnswer: 0", 2 / 3),  # the first equation is false
        ("35/7 = 4\n4 + 4 = 8\n8 x 2 = 17", 2 / 4),  # the last number (17) is the answer
        ("24 + 14 = 38\n38 = 51\nAnswer: 51", 2 / 3),  # a bare false equality is a false step
        ("24 + 14 = 38\nAnswer: 51", 1 / 2),  # the answer is not what was worked out
        ("5 = 5\nAnswer: 5", 0.0),  # a true bare equality is no step: nothing worked out
        ("(2 + 3) × 4 = 20 and 20 ÷ 8 = 2.5, -3 - -2 = -1", 1.0),  # precedence, unary minus
        ("2 * 7 = 14 + 1 = 15", 1.0),  # a chain: 2 * 7 = 14, then 14 + 1 = 15
        ("2 * 7 = 14 = 15", 2 / 3),  # 14 = 15 is false; the answer 15 is what it claims
        ("10 / 3 = 3.33\nAnswer: 3.33", 1.0),  # matches to the decimals shown
        ("10 / 3 = 3\nAnswer: 3", 1 / 2),  # but an integer must be exact
        ("So 3 * 4 = 12.", 1.0),  # a full stop ends the number
        ("12\n5 + 3 = 8", 1.0),  # a number on the line above is not part of the equation
        ("5 / 0 = 0\nAnswer: 0", 1 / 2),  # division by zero: a false equation
        ("total = 5\nAnswer: 5", 0.0),  # a name is not a number: no equation
        ("x = 4 * (", 0.0),
        ("1" * 400 + " + 1 = 2", 0.0),  # not worked arithmetic: skipped, no overflow
        ("3 + 4 = " + "7" * 30, 0.0),
        ("", 0.0),
    ],
)
def test_arithmetic_reward(completion, want):
    assert REWARDS["arithmetic"]("q", completion) == pytest.approx(want)


def _slow(prompt, completion, **row):
    time.sleep(2)
    return 1.0


def test_guard_handles_every_kind_of_faulty_function(tmp_path):
    def raises(prompt, completion, **row):
        raise RuntimeError("boom")

    funcs = [
        ("raises", raises, 1.0),
        ("none", lambda p, c, **r: None, 1.0),
        ("nan", lambda p, c, **r: math.nan, 1.0),
        ("text", lambda p, c, **r: "1.0", 1.0),
        ("slow", _slow, 1.0),
        ("good", lambda p, c, answer=None: 0.5, 2.0),  # fixed signature: only `answer` is passed
        ("flag", lambda p, c, **r: True, 1.0),  # bools count as 1/0
    ]
    log = tmp_path / "fail.jsonl"
    guard = RewardGuard(funcs, policy="abstain", timeout_s=0.2, log_path=log, max_failure_rate=1.0)
    t0 = time.perf_counter()
    scores = guard.score("q", "the completion", {"answer": "3", "extra": 1})
    assert time.perf_counter() - t0 < 1.5  # the slow call was abandoned at its timeout
    assert scores == {"raises": None, "none": None, "nan": None, "text": None, "slow": None, "good": 0.5, "flag": 1.0}
    assert guard.total(scores) == pytest.approx(2.0)
    assert guard.failure_counts() == {"raises": 1, "none": 0, "nan": 1, "text": 1, "slow": 1, "good": 0, "flag": 0}
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {x["reward"] for x in logged} == {"raises", "nan", "text", "slow"}
    assert all(x["completion"] == "the completion" for x in logged)
    assert "RuntimeError: boom" in next(x["reason"] for x in logged if x["reward"] == "raises")

    zero = RewardGuard([("raises", raises, 1.0)], policy="zero", max_failure_rate=1.0)
    assert zero.score("q", "c", {}) == {"raises": 0.0}
    stop = RewardGuard([("raises", raises, 1.0)], policy="stop")
    with pytest.raises(RewardStop) as e:
        stop.score("q", "c", {})
    assert e.value.code == "E549" and "boom" in e.value.line()


def test_guard_stops_above_the_failure_rate():
    flaky = iter([1.0, None, "x", "y"] * 10)
    guard = RewardGuard([("flaky", lambda p, c, **r: next(flaky), 1.0)], max_failure_rate=0.4, min_calls=8)
    with pytest.raises(RewardStop) as e:
        for _ in range(20):
            guard.score("q", "c", {})
    assert "of 8 calls" in e.value.line() and e.value.code == "E549"


def test_user_reward_files_and_bad_specs(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(
        "def short(prompt, completion, **row):\n    return -len(completion) / 100\n\ndef bad(x):\n    return 1\n"
    )
    name, fn = load_reward(f"{f}:short")
    assert name == "short" and fn("q", "abcd") == -0.04
    cases = {
        "nosuch": "E540",
        f"{tmp_path}/missing.py:f": "E541",
        f"{f}:absent": "E543",
        f"{f}:bad": "E544",
    }
    for spec, code in cases.items():
        with pytest.raises(ConfigError) as e:
            load_reward(spec)
        assert e.value.code == code, spec
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError) as e:
        load_reward(f"{broken}:f")
    assert e.value.code == "E542" and "not_a_module_anywhere" in e.value.line()
    assert [w for _, _, w in parse_rewards("accuracy,format", "1,0.5")] == [1.0, 0.5]
    for names, weights, code in (
        ("accuracy", "1,2", "E546"),
        ("accuracy", "x", "E546"),
        ("", None, "E545"),
        ("format,format", None, "E547"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_rewards(names, weights)
        assert e.value.code == code
