"""`mlx.launch`, with its per-rank I/O threads waiting instead of spinning.

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
"""

from __future__ import annotations

import os
import select as _select
import sys


def _wait_on_reads(rlist, wlist, xlist, timeout=None):
    """select() without the write set: what mlx.launch's rank threads need to wait on."""
    readable, _, errors = _select.select(rlist, [], xlist, timeout)
    return readable, [], errors


def main(argv: list[str] | None = None) -> int:
    from mlx._distributed_utils import launch

    launch.select = _wait_on_reads  # the module's own name for select.select
    quiet, _keep_open = os.pipe()  # the write end stays open: no data, no end of file
    os.dup2(quiet, sys.stdin.fileno())
    sys.argv = ["mlx.launch", *(sys.argv[1:] if argv is None else argv)]
    return launch.main() or 0


if __name__ == "__main__":
    sys.exit(main())
