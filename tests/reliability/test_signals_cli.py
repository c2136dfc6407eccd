"""Signals on a real training process: SIGINT or SIGTERM once -> a checkpoint, exit 130 and the
resume command, and the resume finishes; twice -> exit 130 within 2 s, completed checkpoints intact."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from mlxpt.runs import latest_checkpoint, list_checkpoints, read_status, verify_checkpoint
from reliability.harness import resume_args, step_of, train_args

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_one_signal_checkpoints_exits_130_and_resumes(sig, zygote, tiny_model, small_data, tmp_path, scoreboard):
    child = zygote.spawn(train_args(tiny_model, small_data, tmp_path, 10_000, save_every=3))
    assert child.wait_event("checkpoint"), child.stderr()
    child.kill(sig)
    t0 = time.monotonic()
    code = child.wait(60)
    took = time.monotonic() - t0
    run_dir = Path(child.start()["run_dir"])
    status = read_status(run_dir)
    newest = latest_checkpoint(run_dir)
    ok = (
        code == 130
        and f"Resume with: mlxpt train --resume {run_dir}" in child.stderr()
        and status["status"] == "interrupted"
        and step_of(newest) == status["step"]
    )
    resumed = zygote.run(resume_args(run_dir, steps=status["step"] + 2))
    ok = ok and resumed.code == 0 and resumed.start()["resumed_from_step"] == status["step"]
    scoreboard.record("signals", runs=1, as_specified=int(ok))
    assert code == 130 and took < 30, (code, child.stderr())
    assert ok, (child.stderr(), status, resumed.stderr())


@pytest.mark.parametrize(
    "first,second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)]
)
def test_second_signal_exits_within_2s(first, second, zygote, tiny_model, small_data, tmp_path, scoreboard):
    child = zygote.spawn(train_args(tiny_model, small_data, tmp_path, 10_000, save_every=1))
    assert child.wait_event("checkpoint", after=2), child.stderr()
    child.kill(first)
    time.sleep(random.Random(first + second).uniform(0.0, 0.05))  # often lands inside the final save
    child.kill(second)
    t0 = time.monotonic()
    code = child.wait(10)
    took = time.monotonic() - t0
    run_dir = Path(child.start()["run_dir"])
    intact = all(verify_checkpoint(p) for p in list_checkpoints(run_dir)) and latest_checkpoint(run_dir) is not None
    ok = code == 130 and took < 2.0 and intact
    scoreboard.record("signals", runs=1, as_specified=int(ok))
    assert ok, (code, took, intact, child.stderr())
