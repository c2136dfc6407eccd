"""Fixtures of the reliability suites and the scoreboard they fill.

Every suite records what it tried and what happened through `scoreboard.record(suite, **counts)`;
counts add up across tests. With MLXPT_RELIABILITY_JSON set, the totals and the pass/fail count of
the tests are written there at the end of the session; `bench/reliability_report.py` prints them
in RELIABILITY.md's form.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tiny  # noqa: E402

from reliability.harness import Zygote  # noqa: E402


class Scoreboard:
    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.tests = {"passed": 0, "failed": 0, "skipped": 0}
        self.started = time.time()

    def record(self, suite: str, note: str | None = None, **counts: int) -> None:
        for k, v in counts.items():
            self.counts[suite][k] += int(v)
        if note:
            self.notes[suite].append(note)

    def to_dict(self) -> dict:
        return {
            "date": time.strftime("%Y-%m-%d"),
            "duration_s": round(time.time() - self.started, 1),
            "tests": self.tests,
            "suites": {s: dict(c) for s, c in self.counts.items()},
            "notes": dict(self.notes),
        }


SCOREBOARD = Scoreboard()


@pytest.fixture(scope="session")
def scoreboard() -> Scoreboard:
    return SCOREBOARD


def pytest_runtest_logreport(report):
    if "reliability" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        key = "passed" if report.passed else "skipped" if report.skipped else "failed"
        SCOREBOARD.tests[key] += 1


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MLXPT_RELIABILITY_JSON")
    if path and (SCOREBOARD.counts or SCOREBOARD.tests["failed"]):
        Path(path).write_text(json.dumps(SCOREBOARD.to_dict(), indent=2) + "\n")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("rel-tiny"))


def fixed_rows(n: int, seed: int = 1) -> list[dict]:
    """Chat rows that all tokenise to the same length: one compiled shape, so steps take ~20 ms."""
    rows = []
    for i in range(n):
        a, b = (i * 7 + seed) % 50, (i * 13 + 3 * seed) % 50
        q = {"role": "user", "content": f"What is {a:02d} plus {b:02d}?"}
        rows.append({"messages": [q, {"role": "assistant", "content": f"It is {a + b:03d}."}]})
    return rows


def write_split(folder: Path, n_train: int, n_valid: int = 0, seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = fixed_rows(n_train + n_valid, seed)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    if n_valid:
        (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """10 training rows: 5 micro-batches of 2 per epoch, so epochs end inside short runs."""
    return write_split(tmp_path_factory.mktemp("rel-data"), 10)


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> Path:
    """10 preference pairs whose chosen and rejected answers have the same length."""
    folder = tmp_path_factory.mktemp("rel-pref")
    rows = []
    for i in range(10):
        a, b = (i * 7 + 1) % 50, (i * 13 + 3) % 50
        prompt = f"What is {a:02d} plus {b:02d}?"
        rows.append({"prompt": prompt, "chosen": f"It is {a + b:03d}.", "rejected": f"It is {a + b + 1:03d}."})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session")
def grpo_prompts(tmp_path_factory) -> Path:
    """8 verifiable prompts (the bundled generator's questions) for GRPO runs."""
    return tiny.write_prompt_dir(tmp_path_factory.mktemp("rel-prompts"), train=(8, 3))


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()
