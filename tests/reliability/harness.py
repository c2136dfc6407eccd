"""Helpers shared by the reliability suites: the zygote client, tiny runs, checkpoint checks."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class Child:
    """One forked `mlxpt` process: its pid, its stdout/stderr files and (once ended) its exit code."""

    def __init__(self, zygote: Zygote, pid: int, out: Path, err: Path):
        self.zygote, self.pid, self.out, self.err = zygote, pid, out, err
        self.code: int | None = None

    def events(self) -> list[dict]:
        rows = []
        if not self.out.exists():  # the child has not opened it yet
            return rows
        for line in self.out.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def start(self) -> dict | None:
        return next((e for e in self.events() if e.get("event") == "start"), None)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def poll(self, timeout: float = 0.0) -> int | None:
        if self.code is None:
            self.code = self.zygote.wait_for(lambda: self.zygote.exits.pop(self.pid, None), timeout)
        return self.code

    def wait(self, timeout: float = 120.0) -> int:
        if self.poll(timeout) is None:
            self.kill()
            self.poll(30)
            raise TimeoutError(f"child {self.pid} ran over {timeout}s: {self.stderr()[-2000:]}")
        return self.code

    def wait_event(self, kind: str, timeout: float = 60.0, after: int = 0) -> dict | None:
        """The first event of `kind` (with step > `after`), or None if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == kind and e.get("step", after + 1) > after:
                    return e
            if self.poll(0.01) is not None:
                return next((e for e in self.events() if e.get("event") == kind), None)
        raise TimeoutError(f"no {kind} event from {self.pid} in {timeout}s: {self.stderr()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class Zygote:
    """Client of tests/reliability/zygote.py: forks real `mlxpt` processes from a warm interpreter."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.n = 0
        # the zygote's replies, kept until asked for: a reply that comes late (a starved machine)
        # is then still matched to its own child instead of to the next one
        self.acks: list[int] = []  # pids of forked children, in order
        self.exits: dict[int, int] = {}  # pid -> exit code
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
            bufsize=1,
        )
        assert self.read(120) == {"ready": True}

    def read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote process died")
        return json.loads(line)

    def wait_for(self, check, timeout: float):
        """`check()` once it is not None, reading replies into `acks`/`exits` meanwhile; None
        if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while (found := check()) is None:
            msg = self.read(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return None
            if "code" in msg:
                self.exits[msg["pid"]] = msg["code"]
            elif "pid" in msg:
                self.acks.append(msg["pid"])
        return found

    def spawn(self, argv: list[str], faults: dict | None = None, env: dict | None = None) -> Child:
        self.n += 1
        out, err = self.workdir / f"child-{self.n}.out", self.workdir / f"child-{self.n}.err"
        req = {"argv": [str(a) for a in argv], "stdout": str(out), "stderr": str(err)}
        req.update(faults=faults, env=env)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid = self.wait_for(lambda: self.acks.pop(0) if self.acks else None, 60)
        assert pid is not None, "the zygote did not fork in 60 s"
        return Child(self, pid, out, err)

    def run(self, argv: list[str], timeout: float = 120.0, **kw) -> Child:
        child = self.spawn(argv, **kw)
        child.wait(timeout)
        return child

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def train_args(model: Path, data: Path, runs: Path, steps: int, method: str = "sft", **flags) -> list[str]:
    """`train` argv for a short, deterministic tiny-model run with one checkpoint per step."""
    base = {
        "steps": steps,
        "batch_size": 2,
        "eval_every": 0,
        "eval_batches": 1,
        "save_every": 1,
        "keep": 2,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "num_layers": -1,
        "rank": 4,
        "dropout": 0.1,
        "regression_data": "none",  # the forgetting monitor decodes 24 probes twice: not under test here
    }
    base.update(flags)
    argv = ["train", method, "--model", model, "--data", data, "--runs-dir", runs, "--events", "json"]
    for k, v in base.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def resume_args(run_dir: Path, **flags) -> list[str]:
    argv = ["train", "--resume", run_dir, "--events", "json"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def temp_files(run_dir: Path) -> list[str]:
    return [
        p.name
        for d in (run_dir, run_dir / "checkpoints")
        if d.is_dir()
        for p in d.iterdir()
        if p.name.startswith(".tmp-")
    ]


def checkpoint_arrays(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    from mlxpt.runs import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))[0]


def assert_arrays_close(a: dict, b: dict, atol: float = 1e-6, groups=("adapters", "optimizer", "rng")) -> None:
    for group in groups:
        assert a[group].keys() == b[group].keys(), group
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=atol, err_msg=f"{group}/{k}")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error ")]


def mlxpt_subprocess(*args, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """A plain `python -m mlxpt.cli` process (for what the zygote cannot stand in for)."""
    return subprocess.run(
        [sys.executable, "-m", "mlxpt.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        **kw,
    )
