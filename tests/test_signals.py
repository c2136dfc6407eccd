"""Ctrl-C / SIGTERM handling (RELIABILITY.md contract 4): once -> flag, checkpoint, exit 130;
twice -> exit 130 within 2 s, even while the main thread is stuck in native code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mlxpt.runs.signals import StopFlag, graceful_signals

ROOT = Path(__file__).resolve().parents[1]

# A fake training loop: steps until asked to stop, then "checkpoints" for `save_s` and exits 130.
# With `stuck`, the main thread then blocks signals and sleeps: a stand-in for a long native call
# that the Python-level handler cannot interrupt. With `after`, the block is left at once and the
# `save_s` is spent after it (writing the run status), as `mlxpt train` does inside
# `exit_on_signal_after_stop`.
CHILD = textwrap.dedent(
    """
    import contextlib, signal, sys, time
    from mlxpt.runs.signals import exit_on_signal_after_stop, graceful_signals

    mode, save_s = sys.argv[1], float(sys.argv[2])
    with exit_on_signal_after_stop() if mode == "after" else contextlib.nullcontext():
        with graceful_signals() as flag:
            print("ready", flush=True)
            deadline = time.monotonic() + 20
            while not flag.requested and time.monotonic() < deadline:
                time.sleep(0.005)  # one training step
            print("stop", flag.signal_name, flush=True)
            if mode == "stuck":
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            if mode != "after":
                time.sleep(save_s)  # writing the checkpoint
        time.sleep(save_s if mode == "after" else 0)
        print("checkpointed", flush=True)
    sys.exit(130)
    """
)


def start(mode: str, save_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(save_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_one_signal_sets_flag_then_loop_checkpoints_and_exits_130(sig):
    proc = start("loop", 0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert out.split("\n")[:2] == [f"stop {sig.name}", "checkpointed"]
    assert "saving a checkpoint" in err and "again to quit now" in err


@pytest.mark.parametrize(
    ("first", "second", "mode"),
    [
        (signal.SIGINT, signal.SIGINT, "loop"),
        (signal.SIGTERM, signal.SIGTERM, "loop"),
        (signal.SIGINT, signal.SIGTERM, "loop"),
        (signal.SIGINT, signal.SIGINT, "stuck"),
        (signal.SIGTERM, signal.SIGTERM, "after"),
        (signal.SIGINT, signal.SIGTERM, "after"),
    ],
    ids=[
        "int-int",
        "term-term",
        "int-term",
        "int-int-main-thread-stuck",
        "term-term-after-block",
        "int-term-after-block",
    ],
)
def test_second_signal_exits_130_within_2s(first, second, mode):
    proc = start(mode, 30.0)  # a checkpoint that would take 30 s
    proc.send_signal(first)
    assert proc.stdout.readline().strip() == f"stop {first.name}"
    time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(second)
    out, err = proc.communicate(timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert proc.returncode == 130
    assert "checkpointed" not in out
    assert "exiting now" in err


def test_handlers_restored_and_flag_set_in_process():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with graceful_signals(announce=False) as flag:
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2
        while not flag and time.monotonic() < deadline:
            time.sleep(0.001)
        assert flag.requested and flag.signal_name == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # the watchdog gave the wakeup fd back


def test_exit_on_signal_after_stop_is_scoped():
    """Only a signal-stopped block inside `exit_on_signal_after_stop` leaves exiting handlers; the
    setting itself ends with its block, so a later run in the same process restores as usual."""
    from mlxpt.runs import signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals.exit_on_signal_after_stop():
        with graceful_signals(announce=False) as flag:
            flag.request()  # a stop button, not a signal: nothing is on its way out
        assert {s: signal.getsignal(s) for s in before} == before
    assert signals._exit_after_stop is False


def test_noop_outside_main_thread():
    before = signal.getsignal(signal.SIGINT)
    seen: list[StopFlag] = []

    def worker():
        with graceful_signals() as flag:
            seen.append(flag)
            assert signal.getsignal(signal.SIGINT) is before
            flag.request()  # e.g. a TUI stop button

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen[0].requested and seen[0].signum is None
