"""`mlx.launch`, with its per-rank I/O threads waiting instead of spinning, and stop signals
passed on to the ranks once.

mlx.launch (mlx 0.32) gives each rank a thread that forwards the launcher's stdin to the rank and
the rank's output back. On every pass that thread puts the rank's stdin pipe in its `select()`
write set, whether or not there is anything to write; a pipe is almost always writable, so the
call returns at once and the thread spins. Measured on this 2-core machine (bench/distributed.py):
the launcher took 1.5 cores beside 2 training ranks, and 2 ranks trained at 0.7x one rank.

Its main loop has the same trouble with its own stdin when that is /dev/null or a closed pipe
(always readable, at end of file): it wakes every time and reads nothing.

mlxpt's ranks read no stdin, so this runs MLX's own launcher (its arguments, backends, hostfiles
and messages) with a `select` that waits on the reads alone, and with a stdin that never has data
nor ends. `python -m mlxpt.launch` takes mlx.launch's arguments; `mlxpt train --ranks N` starts
the ranks through it.

Signals: mlx.launch dies of SIGTERM or SIGHUP and leaves its ranks running, and Ctrl-C kills its
I/O loop (a traceback; the ranks' last lines are lost). Here SIGINT, SIGTERM and SIGHUP are each
passed on to every rank, and the launcher keeps relaying their output until they exit (a rank
stops at a checkpoint on the first and exits at once on the second). Local ranks run in a session
of their own, so a signal to the terminal's process group (Ctrl-C, a closed terminal) reaches them
once, through here, not twice. Remote ranks (their ssh) stay in this group: ssh needs the
terminal for its prompts, and its first signal already ends the remote command.
"""

from __future__ import annotations

import os
import select as _select
import signal
import subprocess
import sys
import threading

_STOPS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
EXIT_INTERRUPTED = 130  # mlxpt.errors' code (this module sits below it)
_ranks: list[subprocess.Popen] = []
_lock = threading.Lock()  # a rank is started and listed in one go, never between a signal's reads
_signals: list[int] = []  # the stop signals received, in order


def _wait_on_reads(rlist, wlist, xlist, timeout=None):
    """select() without the write set: what mlx.launch's rank threads need to wait on. With
    nothing left to read (the rank closed its output as it ended), only the rank's exit is
    awaited: a short wait, not the thread's whole second, so the launcher ends as its ranks do."""
    if not rlist and not xlist and timeout is not None:
        timeout = min(timeout, 0.05)
    readable, _, errors = _select.select(rlist, [], xlist, timeout)
    return readable, [], errors


def _start_rank(cmd, **kwargs) -> subprocess.Popen:
    """mlx.launch's Popen of one rank (a bash line that execs the rank, or `ssh ... line`): a
    local rank in a session of its own, and every rank listed for `_pass_on`."""
    local = not (isinstance(cmd, str) and cmd.startswith("ssh "))
    with _lock:
        proc = subprocess.Popen(cmd, start_new_session=local, **kwargs)
        _ranks.append(proc)
        for signum in _signals:  # a stop that came while it was starting
            _send(proc, signum)
    return proc


def _send(proc: subprocess.Popen, signum: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signum)
        except OSError:  # it ended meanwhile
            pass


def _pass_on(signum: int, frame: object) -> None:
    """A stop signal: to every rank once. Before any rank started there is nothing to stop."""
    with _lock:
        _signals.append(signum)
        if not _ranks:
            os.write(2, f"mlxpt.launch: {signal.Signals(signum).name} before any rank started\n".encode())
            os._exit(EXIT_INTERRUPTED)
        for proc in _ranks:
            _send(proc, signum)


def main(argv: list[str] | None = None) -> int:
    for s in _STOPS:  # first of all: a stop during the import of mlx below is not lost
        signal.signal(s, _pass_on)
    from mlx._distributed_utils import launch

    launch.select = _wait_on_reads  # the module's own name for select.select
    launch.Popen = _start_rank  # the module's own name for subprocess.Popen (its ranks)
    quiet, _keep_open = os.pipe()  # the write end stays open: no data, no end of file
    os.dup2(quiet, sys.stdin.fileno())
    sys.argv = ["mlx.launch", *(sys.argv[1:] if argv is None else argv)]
    return launch.main() or 0


if __name__ == "__main__":
    sys.exit(main())
