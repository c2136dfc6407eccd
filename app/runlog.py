"""Everything the monitor draws about one run, as plain values: a client-side mirror of a run.

A `RunLog` is fed either by a child's `--events json` lines (`apply`) or by the run folder's
files (`load_files` / `poll_files`, for runs started from the CLI or opened after they ended).
No Textual here, so it is tested without an app.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.commands.train import eval_summary
from mlxpt.errors import EXIT_INTERRUPTED

MAX_LOG = 500
MAX_SAMPLES = 200


@dataclass
class RunLog:
    key: str
    run_dir: Path | None = None
    method: str = ""
    model: str = ""
    status: str = "starting"  # starting | running | finished | interrupted | failed | crashed
    world_size: int = 1  # data-parallel ranks (train/distributed.py)
    total_steps: int | None = None
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    exit_reason: str | None = None
    pid: int | None = None
    live: bool = False  # a child of this app is feeding it
    version: int = 0  # bumped on every change, so views redraw only when needed
    said: int = 0  # log lines ever written (the list keeps the last MAX_LOG)
    _offsets: dict = field(default_factory=dict, repr=False)

    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    def new_lines(self, shown: int) -> list[str]:
        """Log lines written after the first `shown` (as many as are still kept)."""
        return self.log[len(self.log) - min(len(self.log), self.said - shown) :]

    def say(self, line: str) -> None:
        self.log.append(line)
        self.said += 1
        del self.log[:-MAX_LOG]
        self.version += 1

    def apply(self, e: dict) -> None:
        """Fold one event of the `mlxpt train --events json` protocol into the log."""
        kind = e.get("event")
        if kind == "start":
            self.run_dir = Path(e["run_dir"]) if e.get("run_dir") else self.run_dir
            self.method = e.get("method", self.method)
            self.model = e.get("model", self.model)
            self.total_steps = e.get("steps", self.total_steps)
            self.status = "running"
            resumed = e.get("resumed_from_step") or 0
            self.steps = [s for s in self.steps if s["step"] <= resumed]
            self.evals = [s for s in self.evals if s["step"] <= resumed]
            verb = f"resumed at step {resumed}" if resumed else "started"
            self.world_size = int(e.get("world_size") or 1)
            ranks = f", {self.world_size} ranks" if self.world_size > 1 else ""
            self.say(f"{verb}: {self.run_dir} ({self.method}, {self.model}{ranks})")
            if "memory_estimate_mb" in e:
                per = " per rank" if self.world_size > 1 else ""
                self.say(f"memory estimate {e['memory_estimate_mb']:.0f} MB{per}, BLAS {e.get('blas', '?')}")
        elif kind == "step":
            self.steps.append(e)
            if e.get("skipped"):
                self.say(f"step {e['step']}: non-finite loss or gradient, update skipped")
        elif kind == "eval":
            self.evals.append(e)
            self.say(f"step {e['step']}: {eval_summary(e)}")
        elif kind == "samples":
            for s in e.get("samples", []):
                self.samples.append({"step": e.get("step"), **s})
            del self.samples[:-MAX_SAMPLES]
        elif kind == "checkpoint":
            self.say(f"checkpoint at step {e.get('step')}")
        elif kind == "reference" and e.get("status") == "computing":
            self.say(f"reference log-probs: {e.get('done')}/{e.get('pairs')} pairs, {e.get('elapsed_s', 0):.0f} s")
        elif kind == "reference":
            self.say(f"reference log-probs {e.get('status')} for {e.get('pairs')} pairs")
        elif kind == "warning":
            self.say(f"warning: {e.get('message')}")
        elif kind == "done":
            self.status = e.get("status", "finished")
            self.say(f"done: {self.status} at step {e.get('step')}")
        self.version += 1

    def feed_line(self, line: str) -> None:
        """One stdout line of a child: an event, or plain text for the log."""
        line = line.rstrip("\n")
        if not line.strip():
            return
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "event" in obj:
            self.apply(obj)
        else:
            self.say(line)

    def finish(self, returncode: int, stderr_tail: list[str]) -> None:
        """The child exited: record why, in words a user can act on."""
        self.live = False
        self.pid = None
        reason = exit_reason(returncode, stderr_tail)
        if returncode == 0:
            self.status = "finished" if self.status != "interrupted" else self.status
        elif returncode == EXIT_INTERRUPTED:
            self.status = "interrupted"
        elif returncode < 0:
            self.status = "crashed"
        else:
            self.status = "failed"
        self.exit_reason = reason
        self.say(f"exit: {reason}")
        self._skip_files()  # the events already brought in what the run folder's files hold

    def _skip_files(self) -> None:
        if self.run_dir is None:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            try:
                self._offsets[name] = (self.run_dir / name).stat().st_size
            except OSError:
                pass

    # ---- run folder files (CLI-started runs, finished runs) --------------------------------

    def load_files(self) -> None:
        """(Re)read metrics.jsonl, samples.jsonl and config.json from the start."""
        self._offsets.clear()
        self.steps, self.evals, self.samples = [], [], []
        if self.run_dir is not None:
            try:
                cfg = json.loads((self.run_dir / "config.json").read_text(encoding="utf-8"))
                self.method = str(cfg.get("method", self.method))
                self.model = str((cfg.get("model") or {}).get("model", self.model))
                self.total_steps = (cfg.get("train") or {}).get("steps", self.total_steps)
            except (OSError, ValueError, AttributeError):
                pass
        self.poll_files()

    def poll_files(self) -> bool:
        """Read lines appended since the last call; True if anything new arrived."""
        if self.run_dir is None:
            return False
        new = False
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.run_dir / name
            start = self._offsets.get(name, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a half-written last line waits for the next poll
            self._offsets[name] = start + end
            for raw in data[:end].splitlines():
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                new = True
                if name == "samples.jsonl":
                    self.samples.append(obj)
                elif obj.get("event") == "eval":
                    self.evals.append(obj)
                elif obj.get("event", "step") == "step":
                    self.steps.append(obj)
        del self.samples[:-MAX_SAMPLES]
        if new:
            self.version += 1
        return new


def resume_refusal(name: str, status: str, live: bool, checkpoints: int) -> str | None:
    """Why `r` cannot resume this run (None: it can). One rule for the Runs list and the monitor:
    a run that is not running or finished, with a checkpoint to start from (without one,
    `mlxpt train --resume` has nothing to continue)."""
    if live or status in ("running", "starting"):
        return f"{name} is already running"
    if status == "finished":
        return f"{name} is finished; duplicate it (d) to train again"
    if not checkpoints:
        return f"{name} has no checkpoint to resume from; duplicate it (d) instead"
    return None


def exit_reason(returncode: int, stderr_tail: list[str]) -> str:
    """`finished`, `interrupted: checkpoint saved`, `killed by SIGABRT`, or the error line."""
    if returncode == 0:
        return "finished (exit 0)"
    if returncode == EXIT_INTERRUPTED:
        return "interrupted: checkpoint saved (exit 130)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed: killed by {name}; resume continues from the last checkpoint"
    errors = [ln.strip() for ln in stderr_tail if ln.strip().startswith("error ")]
    last = errors[-1] if errors else next((ln.strip() for ln in reversed(stderr_tail) if ln.strip()), "")
    return f"failed (exit {returncode}): {last}" if last else f"failed (exit {returncode})"
