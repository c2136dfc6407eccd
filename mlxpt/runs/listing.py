"""Run discovery for listings (the TUI's Runs screen): one `RunInfo` per run folder.

A run that says "running" but whose writer is gone (killed, crashed, machine rebooted) is shown
as "crashed"; it can be resumed from its newest checkpoint like an interrupted one. A live writer
holds the run folder's lock (guards.RunLock), so a recycled pid cannot pass for one. Nothing here
imports mlx, and nothing raises on a damaged folder: a listing must always render.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlxpt.runs.folder import read_status
from mlxpt.runs.guards import lock_holder
from mlxpt.runs.store import list_checkpoints

SHOWN_STATUSES = ("running", "finished", "failed", "interrupted", "crashed", "unknown")


@dataclass
class RunInfo:
    path: Path
    name: str
    method: str
    model: str
    status: str  # one of SHOWN_STATUSES
    step: int
    steps: int | None
    last: str  # "loss 1.234" / "reward 0.50" / ""
    started: datetime | None
    duration_s: float | None
    error: str | None = None
    checkpoints: int = 0

    @property
    def resumable(self) -> bool:
        return self.status in ("interrupted", "crashed", "failed") and self.checkpoints > 0


def pid_alive(pid: object) -> bool:
    """True if a process with this pid exists (and is not a zombie we could see)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie child still answers kill(0); its /proc state says Z
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _tail_metrics(path: Path, max_bytes: int = 65536) -> tuple[dict | None, dict | None, float | None]:
    """(first line, last step line, time of the last line) of metrics.jsonl, reading its ends only."""
    try:
        with open(path, "rb") as f:
            head = f.readline()
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read().splitlines()
    except OSError:
        return None, None, None
    first = _parse(head)
    last_step, last_time = None, None
    for raw in reversed(tail):
        obj = _parse(raw)
        if obj is None:
            continue
        if last_time is None and isinstance(obj.get("time"), (int, float)):
            last_time = float(obj["time"])
        if obj.get("event") == "step":
            last_step = obj
            break
    return first, last_step, last_time


def _parse(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _last_value(step: dict | None) -> str:
    if not step:
        return ""
    for key, label in (("reward_mean", "reward"), ("loss", "loss")):
        v = step.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{label} {v:.3g}"
    return ""


def _started(name: str, first: dict | None) -> datetime | None:
    try:
        return datetime.strptime(name[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        pass
    if first and isinstance(first.get("time"), (int, float)):
        return datetime.fromtimestamp(first["time"])
    return None


def run_info(path: str | os.PathLike) -> RunInfo:
    """What a listing shows about one run folder; never raises."""
    path = Path(path)
    config = _read_json(path / "config.json")
    status = read_status(path) or {}
    first, last_step, last_time = _tail_metrics(path / "metrics.jsonl")
    state = status.get("status") if isinstance(status.get("status"), str) else "unknown"
    if state == "running" and (not pid_alive(status.get("pid")) or lock_holder(path) is None):
        state = "crashed"
    step = status.get("step")
    if last_step and isinstance(last_step.get("step"), int):
        step = max(last_step["step"], step if isinstance(step, int) else 0)
    steps = status.get("steps")
    if not isinstance(steps, int):
        steps = (config.get("train") or {}).get("steps") if isinstance(config.get("train"), dict) else None
    model = config.get("model", {})
    model = model.get("model", "") if isinstance(model, dict) else str(model)
    duration = None
    if first and last_time and isinstance(first.get("time"), (int, float)):
        duration = max(0.0, last_time - float(first["time"]))
    return RunInfo(
        path=path,
        name=path.name,
        method=str(config.get("method", "?")),
        model=str(model),
        status=state,
        step=step if isinstance(step, int) else 0,
        steps=steps if isinstance(steps, int) else None,
        last=_last_value(last_step),
        started=_started(path.name, first),
        duration_s=duration,
        error=status.get("error") if isinstance(status.get("error"), str) else None,
        checkpoints=len(list_checkpoints(path)),
    )


def list_runs(root: str | os.PathLike = "runs") -> list[RunInfo]:
    """Every run folder under `root` (a folder with config.json or status.json), newest first."""
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []
    runs = [
        run_info(e.path)
        for e in entries
        if os.path.exists(os.path.join(e.path, "config.json")) or os.path.exists(os.path.join(e.path, "status.json"))
    ]
    return sorted(runs, key=lambda r: r.name, reverse=True)
