"""mlxpt.launch: MLX's launcher, its rank I/O threads waiting instead of spinning."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")
SLEEP = 3.0


def _launch(
    start: list[str], tmp_path: Path, code: str, devnull: bool = False
) -> tuple[subprocess.CompletedProcess, float]:
    """Two ranks of `python -c code` through `start`: (the launcher's result, CPU seconds that
    it and its ranks used). stdin: a pipe that never has data nor ends, or /dev/null."""
    r, w = os.pipe()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        p = subprocess.run(
            [*start, "-n", "2", "--backend", "ring", "--", sys.executable, "-c", code],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL if devnull else r,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        os.close(r)
        os.close(w)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("devnull", [False, True])
def test_ranks_run_their_command_and_the_launcher_waits_instead_of_spinning(tmp_path, devnull):
    code = f"import os, time; time.sleep({SLEEP}); print('rank', os.environ['MLX_RANK'], flush=True)"
    p, cpu = _launch([sys.executable, "-m", "mlxpt.launch"], tmp_path, code, devnull)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.strip() for x in p.stdout.splitlines() if "rank" in x) == ["rank 0", "rank 1"]
    # mlx.launch itself keeps about a core busy for the whole run (its rank threads select() on
    # the always-writable stdin pipes; its main loop, on /dev/null, on a stdin always at its
    # end); through mlxpt.launch the sleeping ranks cost next to nothing
    assert cpu < 0.4 * SLEEP, cpu


def test_a_failing_rank_is_reported_as_mlx_launch_reports_it(tmp_path):
    code = "import os, sys; sys.exit(3 if os.environ['MLX_RANK'] == '1' else 0)"
    p, _ = _launch([sys.executable, "-m", "mlxpt.launch"], tmp_path, code)
    assert "Node with rank 1 exited with code 3" in p.stderr, p.stderr[-2000:]


RANK = """
import os, signal, sys, time
got = []
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
print('ready', os.getpid(), flush=True)
t = time.monotonic()
while not got and time.monotonic() - t < 20:
    time.sleep(0.02)
time.sleep(0.5)  # a second copy of the signal would come meanwhile
print('rank', os.environ['MLX_RANK'], 'got', *got, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig,to", [("SIGTERM", "pid"), ("SIGHUP", "pid"), ("SIGINT", "group")])
def test_a_stop_signal_reaches_every_rank_once_and_their_output_still_comes(tmp_path, sig, to):
    """mlx.launch dies of SIGTERM/SIGHUP and leaves its ranks running, and Ctrl-C (SIGINT to the
    process group) kills its I/O loop with a traceback. mlxpt.launch passes each on to every rank
    once (a rank in the launcher's group would get Ctrl-C twice: stop, then quit at once) and
    relays the ranks' output until they end."""
    import signal

    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxpt.launch", "-n", "2", "--backend", "ring", "--", sys.executable, "-c", RANK],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=r, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    ranks = []
    try:
        while len(ranks) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:]
            if line.startswith("ready"):
                ranks.append(int(line.split()[1]))
        signum = getattr(signal, sig)
        os.kill(proc.pid, signum) if to == "pid" else os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(r)
        os.close(w)
        proc.kill()
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert sorted(x for x in out.splitlines() if x.startswith("rank")) == [f"rank 0 got {sig}", f"rank 1 got {sig}"]
    assert not [pid for pid in ranks if _alive(pid)]
