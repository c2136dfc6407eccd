"""A run's active training time: the sum of its steps' `step_time_s` in metrics.jsonl.

The wall clock between a run's first and last lines counts its pauses (a stop, a day, then a
resume) and misses what happened before the first line; the steps' own times count neither.
Read incrementally, so the Runs list can ask every two seconds. No Textual here.
"""

from __future__ import annotations

import json
from pathlib import Path


def duration(seconds: float | None) -> str:
    """`1m05s`, `2h03m`; blank for None."""
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class TrainingTime:
    """`seconds(run_dir)`: active training time so far, or None when no step reported one."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, int, float, int]] = {}  # file -> (inode, bytes read, seconds, steps)

    def seconds(self, run_dir: Path) -> float | None:
        path = Path(run_dir) / "metrics.jsonl"
        try:
            st = path.stat()
        except OSError:
            self._seen.pop(path, None)
            return None
        size = st.st_size
        inode, offset, total, steps = self._seen.get(path, (st.st_ino, 0, 0.0, 0))
        if inode != st.st_ino or size < offset:  # another file now (a run deleted and made again)
            offset, total, steps = 0, 0.0, 0
        if size > offset:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
            except OSError:
                return total if steps else None
            end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
            for raw in data[:end].splitlines():
                dt = _step_time(raw)
                if dt is not None:
                    total, steps = total + dt, steps + 1
            offset += end
            self._seen[path] = (st.st_ino, offset, total, steps)
        return total if steps else None


def _step_time(raw: bytes) -> float | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event", "step") != "step":
        return None
    dt = obj.get("step_time_s")
    return float(dt) if isinstance(dt, (int, float)) and not isinstance(dt, bool) and dt >= 0 else None
