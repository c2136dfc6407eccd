"""Rewards: every kind of faulty reward function, under each failure policy, is handled as the
policy says (abstain: dropped from the sum, zero: 0.0, stop: one E549 line), logged with its
completion, and never crashes the caller; functions that edit their inputs change nothing for the
next one. Then real GRPO runs on the tiny model with a faulty user reward file: abstain and zero
finish, stop exits 1 with the last step saved and resumes once the file is fixed."""

from __future__ import annotations

import json
import math
import sys
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tiny

from mlxpt.config import GRPOConfig
from mlxpt.rewards import FLOAT32_MAX, RewardGuard, RewardStop
from mlxpt.runs import latest_checkpoint, load_checkpoint, read_status

pytestmark = pytest.mark.reliability


def _raise(exc: BaseException):
    def f(prompt, completion, **row):
        raise exc

    return f


def _returns(value):
    return lambda prompt, completion, **row: value


def _recurse(prompt, completion, **row):
    return _recurse(prompt, completion, **row)


def _hang(prompt, completion, **row):
    time.sleep(30)
    return 1.0


def _exit(prompt, completion, **row):
    sys.exit(3)


class _BrokenFloat(float):
    def __float__(self):
        raise RuntimeError("no float for you")


# name -> a function that fails: each is caught, counted and logged, whatever the policy
FAULTS = {
    "raises ValueError": _raise(ValueError("bad completion")),
    "raises ZeroDivisionError": lambda p, c, **r: 1 / 0,
    "raises KeyError": lambda p, c, **r: r["no such field"],
    "raises MemoryError": _raise(MemoryError()),
    "raises KeyboardInterrupt": _raise(KeyboardInterrupt()),
    "calls sys.exit": _exit,
    "recurses without end": _recurse,
    "hangs": _hang,
    "wrong signature": lambda: 1.0,
    "returns NaN": _returns(math.nan),
    "returns +inf": _returns(math.inf),
    "returns -inf": _returns(-math.inf),
    "returns NumPy NaN": _returns(np.float32("nan")),
    "returns 1e300": _returns(1e300),
    "returns a 400-digit int": _returns(10**400),
    "returns a string": _returns("1.0"),
    "returns bytes": _returns(b"1"),
    "returns a list": _returns([1.0]),
    "returns a dict": _returns({"reward": 1.0}),
    "returns a complex": _returns(1 + 1j),
    "returns an array": _returns(np.ones(2)),
    "returns a Decimal": _returns(Decimal("0.5")),
    "returns an object": _returns(object()),
    "returns a float whose __float__ raises": _returns(_BrokenFloat(0.5)),
}

# real scalars the guard must take as they are
GOOD = [
    (np.float32(0.25), 0.25),
    (np.int64(2), 2.0),
    (Fraction(1, 4), 0.25),
    (True, 1.0),
    (-0.0, 0.0),
    (FLOAT32_MAX, FLOAT32_MAX),
    (7, 7.0),
]


def _good(prompt, completion, answer=None, **row):
    return 1.0 if answer == "4" else 0.0


@pytest.mark.parametrize("policy", ["abstain", "zero", "stop"])
def test_every_faulty_reward_is_handled_per_policy(policy, tmp_path, scoreboard):
    handled = crashes = logged = 0
    for i, (name, fn) in enumerate(FAULTS.items()):
        log = tmp_path / f"failures-{i}.jsonl"
        guard = RewardGuard([("faulty", fn, 1.0), ("good", _good, 2.0)], policy=policy, timeout_s=0.2, log_path=log)
        row = {"answer": "4", "extra": [1, 2]}
        try:
            scores = guard.score("What is 2+2?", f"completion for {name}", row)
        except RewardStop as e:
            ok = policy == "stop" and e.code == "E549" and "\n" not in e.line()
        except BaseException as e:  # noqa: BLE001 - the point: nothing else may escape
            crashes += 1
            pytest.fail(f"{name} under {policy}: {type(e).__name__}: {e}")
        else:
            want = None if policy == "abstain" else 0.0
            ok = policy != "stop" and scores == {"faulty": want, "good": 1.0} and guard.total(scores) == 2.0
        assert ok, f"{name} under {policy}"
        assert guard.failure_counts()["faulty"] == 1 and guard.failure_counts()["good"] == 0, name
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert len(lines) == 1 and lines[0]["completion"] == f"completion for {name}", name
        assert lines[0]["reward"] == "faulty" and lines[0]["reason"], name
        handled += 1
        logged += len(lines)
    scoreboard.record("rewards", policies=1, faulty=len(FAULTS), handled=handled, crashes=crashes, logged=logged)


def test_real_scalars_are_taken_and_inputs_cannot_be_edited(scoreboard):
    for value, want in GOOD:
        guard = RewardGuard([("f", _returns(value), 1.0)])
        assert guard.score("q", "c", {}) == {"f": want}, value
        assert guard.failure_counts() == {"f": 0}

    def editor(prompt, completion, **row):
        prompt.append({"role": "user", "content": "injected"})
        row["answer"] = "5"
        row["nested"]["k"] = "changed"
        return 0.0

    seen = []

    def reader(prompt, completion, answer=None, nested=None):
        seen.append((len(prompt), answer, dict(nested)))
        return 1.0

    guard = RewardGuard([("editor", editor, 1.0), ("reader", reader, 1.0)])
    prompt, row = [{"role": "user", "content": "2+2?"}], {"answer": "4", "nested": {"k": "v"}}
    for _ in range(2):
        guard.score(prompt, "c", row)
    assert seen == [(1, "4", {"k": "v"})] * 2
    assert prompt == [{"role": "user", "content": "2+2?"}] and row == {"answer": "4", "nested": {"k": "v"}}
    scoreboard.record("rewards", edits_contained=1)


FAULTY_FILE = """\
import math

CALLS = [0]


def flaky(prompt, completion, answer=None, **row):
    CALLS[0] += 1
    k = CALLS[0] % 6
    if k == 1:
        raise ValueError("cannot score " + completion[:10])
    if k == 2:
        return math.nan
    if k == 3:
        return "0.5"
    return float(len(completion) % 5) / 5
"""

BREAKS_AFTER_STEP_1 = """\
CALLS = [0]


def flaky(prompt, completion, answer=None, **row):
    CALLS[0] += 1
    if CALLS[0] > 2 * 4:  # step 1 scores 2 prompts x 4 completions
        raise ValueError("broken after step 1")
    return float(len(completion) % 5) / 5
"""

FIXED_FILE = """\
def flaky(prompt, completion, answer=None, **row):
    return float(len(completion) % 5) / 5
"""


def _cfg(tiny_model, grpo_prompts, tmp_path, reward: Path, **kw) -> GRPOConfig:
    base = {
        "steps": 3, "batch_size": 2, "num_generations": 4, "max_completion_length": 8, "beta": 0.0,
        "rewards": f"{reward}:flaky,accuracy", "save_every": 1, "max_reward_failure_rate": 0.9,
        "max_seq_len": 512,  # byte-level tokens: every bundled prompt fits, so each step scores 2 x 4
    }  # fmt: skip
    return tiny.run_config(GRPOConfig, tiny_model, grpo_prompts, tmp_path, **{**base, **kw})


@pytest.mark.parametrize("policy", ["abstain", "zero"])
def test_a_grpo_run_with_a_faulty_reward_finishes_and_logs_each_failure(
    policy, tiny_model, grpo_prompts, tmp_path, scoreboard
):
    from mlxpt.train.grpo import FAILURES_FILE, run_grpo

    reward = tmp_path / "faulty.py"
    reward.write_text(FAULTY_FILE)
    events: list[dict] = []
    run_dir, outcome = run_grpo(
        _cfg(tiny_model, grpo_prompts, tmp_path, reward, reward_on_error=policy), emit=events.append
    )
    assert outcome == "finished"
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 3 and all(math.isfinite(e["reward_mean"]) for e in steps)
    failed = steps[-1]["reward_failures"]["flaky"]
    assert failed == 3 * 2 * 4 // 2  # calls 1, 2 and 3 of every 6 fail
    lines = [json.loads(x) for x in (run_dir / FAILURES_FILE).read_text().splitlines()]
    assert len(lines) == failed and all(x["completion"] is not None and x["reason"] for x in lines)
    assert {x["reason"].split(":")[0].split(" ")[0] for x in lines} == {"ValueError", "returned"}
    scoreboard.record("rewards", runs=1, runs_ok=1, failed_calls=failed, failed_calls_logged=len(lines))


def test_stop_policy_saves_the_last_step_and_resumes_once_fixed(tiny_model, grpo_prompts, tmp_path, capsys, scoreboard):
    from mlxpt.cli import main

    reward = tmp_path / "faulty.py"
    reward.write_text(BREAKS_AFTER_STEP_1)
    runs = tmp_path / "runs"
    args = ["train", "grpo", "--model", str(tiny_model), "--data", str(grpo_prompts), "--runs-dir", str(runs),
            "--steps", "3", "--batch-size", "2", "--num-generations", "4", "--max-completion-length", "8",
            "--beta", "0", "--eval-every", "0", "--save-every", "100", "--rewards", f"{reward}:flaky",
            "--reward-on-error", "stop", "--regression-data", "none"]  # fmt: skip

    rc = main(args)
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("warning")]
    (run_dir,) = runs.iterdir()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error E549"), err
    assert "broken after step 1" in err[0] and f"mlxpt train --resume {run_dir}" in err[0], err
    ck = latest_checkpoint(run_dir)
    assert ck is not None and load_checkpoint(ck)[1]["loop"]["step"] == 1
    assert read_status(run_dir)["status"] == "failed"
    reward.write_text(FIXED_FILE)
    rc = main(["train", "--resume", str(run_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and "resuming at step 1" in out, out
    assert load_checkpoint(latest_checkpoint(run_dir))[1]["loop"]["step"] == 3
    scoreboard.record("rewards", runs=1, runs_ok=1, stopped_and_resumed=1)


def test_a_failure_rate_above_the_limit_stops_with_one_line(tiny_model, grpo_prompts, tmp_path, scoreboard):
    from mlxpt.errors import ConfigError
    from mlxpt.train.grpo import run_grpo

    reward = tmp_path / "faulty.py"
    reward.write_text(FAULTY_FILE)
    cfg = _cfg(tiny_model, grpo_prompts, tmp_path, reward, steps=6, max_reward_failure_rate=0.3)
    with pytest.raises(ConfigError) as e:
        run_grpo(cfg)
    assert e.value.code == "E549" and "calls" in e.value.line() and "30%" in e.value.line()
    scoreboard.record("rewards", runs=1, runs_ok=1)
