"""Graceful Ctrl-C / SIGTERM for training loops (RELIABILITY.md contract 4).

First SIGINT or SIGTERM: `flag.requested` becomes True; the loop finishes or abandons the step,
saves a checkpoint and exits 130. Second one: `os._exit(130)` at once. Completed checkpoints stay
intact because every write is atomic.

Python runs signal handlers only between bytecodes in the main thread, so a main thread stuck in
one long native call (a big `mx.eval`) would delay the second-signal exit. A watchdog thread woken
through `signal.set_wakeup_fd` also counts signals and exits on the second one, so "twice" stays
prompt whenever that native call releases the GIL.

A process that ends once a stopped run returns (`mlxpt train`) runs inside `exit_on_signal_after_stop()`:
the handlers left behind then still exit 130 on the next signal, so "twice" also holds in the
moments between leaving the block and the process exit (with the previous SIGTERM handler, SIG_DFL,
a second SIGTERM there killed the process by the signal instead).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from mlxpt.errors import EXIT_INTERRUPTED

# SIGHUP (a closed SSH session or terminal) is a stop like SIGTERM: checkpoint, then exit
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
_exit_after_stop = False


@contextlib.contextmanager
def exit_on_signal_after_stop() -> Iterator[None]:
    """Inside this block, a signal-stopped `graceful_signals` block leaves handlers that exit 130 at
    once on any further stop signal instead of restoring the previous ones; they stay after this
    block too. For commands that end when the stopped run returns (`mlxpt train`); an interactive
    host (a notebook) keeps the default, restore."""
    global _exit_after_stop
    before, _exit_after_stop = _exit_after_stop, True
    try:
        yield
    finally:
        _exit_after_stop = before


class StopFlag:
    """Set once a stop was requested (by a signal or by `request()`, e.g. a TUI stop button)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def request(self, signum: int | None = None) -> None:
        if not self.requested:
            self.signum = signum
            self.requested = True

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __bool__(self) -> bool:
        return self.requested

    def __repr__(self) -> str:
        return f"StopFlag(requested={self.requested}, signal={self.signal_name})"


def _say(text: str) -> None:
    # os.write, not print: print inside a handler can hit a reentrant-call error on stderr.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _exit_now(signum: int) -> None:
    _say(f"\nmlxpt: second {signal.Signals(signum).name}, exiting now; completed checkpoints are intact\n")
    os._exit(EXIT_INTERRUPTED)


def _first_message(signum: int) -> str:
    return (
        f"\nmlxpt: {signal.Signals(signum).name} received - finishing this step and saving a "
        "checkpoint (send it again to quit now)\n"
    )


@contextlib.contextmanager
def graceful_signals(announce: bool = True) -> Iterator[StopFlag]:
    """Install SIGINT/SIGTERM handlers for the `with` block and yield a StopFlag.

    Outside the main thread it changes nothing (Python allows handlers only there) and yields a
    flag that only `request()` sets. Previous handlers are restored on exit (unless a signal stopped
    the run inside `exit_on_signal_after_stop()`), so save the final checkpoint inside the
    block, then `sys.exit(130)` (EXIT_INTERRUPTED) once it is left.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    seen = 0  # signals counted by the handler; the watchdog keeps its own count

    def handler(signum: int, frame: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= 2:
            _exit_now(signum)
        flag.request(signum)
        if announce:
            _say(_first_message(signum))

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    watchdog = _Watchdog()
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        watchdog.start()
        yield flag
    finally:
        watchdog.stop()
        leave_exiting = _exit_after_stop and flag.signum is not None
        for s, h in previous.items():
            if leave_exiting:
                signal.signal(s, _exit_handler)
            else:
                signal.signal(s, h if h is not None else signal.SIG_DFL)


def _exit_handler(signum: int, frame: object) -> None:
    _exit_now(signum)


class _Watchdog:
    """Counts stop signals read from Python's wakeup fd in a thread and exits on the second.
    Skipped if someone else (an asyncio loop) already owns the wakeup fd."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.fds: tuple[int, int] | None = None

    def start(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)  # required by set_wakeup_fd
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            old = None
        if old != -1:  # failed, or not ours to take: rely on the handler alone
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self.fds = (r, w)
        self.thread = threading.Thread(target=self._run, args=(r,), daemon=True)
        self.thread.start()

    @staticmethod
    def _run(r: int) -> None:
        seen = 0
        while True:
            try:
                data = os.read(r, 64)  # the C-level handler writes one byte per signal
            except OSError:
                return
            for signum in data:
                if signum == 0:  # stop() asks us to finish
                    return
                if signum in STOP_SIGNALS:
                    seen += 1
                    if seen >= 2:
                        _exit_now(signum)
            if not data:
                return

    def stop(self) -> None:
        if self.fds is None:
            return
        r, w = self.fds
        signal.set_wakeup_fd(-1)
        try:
            os.write(w, b"\0")
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(timeout=1.0)
        os.close(w)
        os.close(r)
        self.fds = None
