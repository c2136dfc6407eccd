"""A run directory: its name, creation, `config.json`, `status.json`, and the temp files a
crash leaves behind. Checkpoints inside it are store.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlxpt.errors import ConfigError
from mlxpt.runs.atomic import TMP_PREFIX, atomic_write_json, disk_full_error, fsync_dir, is_disk_full

CHECKPOINTS = "checkpoints"
STATUSES = ("running", "finished", "failed", "interrupted")
# Used with fullmatch: `$` alone also matches before a trailing newline ("x\n" passed as a name).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- run directory -------------------------------------------------------------------------


def check_run_name(name: str) -> None:
    """Refuse names that could escape the runs folder or confuse a shell (E303)."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            "E303",
            f"invalid run name {name!r}",
            hint="use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )


def new_run_dir(root: str | os.PathLike = "runs", name: str | None = None) -> Path:
    """Create `root/<YYYYmmdd-HHMMSS>-<name or 'sft'>`, adding `-2`, `-3`… if it already exists."""
    name = name or "sft"
    check_run_name(name)
    root = Path(root)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = root / (base if i == 1 else f"{base}-{i}")
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            fsync_dir(root)
            return path
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(root, exc) from exc
        raise
    raise FileExistsError(f"could not find a free run directory name for {root / base}")


def write_config(run_dir: str | os.PathLike, cfg: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / "config.json", cfg)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            "E304",
            "no config.json in run directory",
            str(run_dir),
            "is this an mlxpt run?",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("E304", f"config.json is not valid JSON: {exc}", str(path)) from None
    if not isinstance(cfg, dict):
        raise ConfigError("E304", "config.json must hold a JSON object", str(path))
    return cfg


def write_status(run_dir: str | os.PathLike, status: str, **extra: Any) -> None:
    """Write `status.json`: status (running/finished/failed/interrupted), pid, updated time, extra."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    obj = {"status": status, **extra, "pid": os.getpid(), "updated": now_iso()}
    atomic_write_json(Path(run_dir) / "status.json", obj)


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        obj = json.loads((Path(run_dir) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def clean_temp(run_dir: str | os.PathLike) -> list[Path]:
    """Remove `.tmp-*` files and directories a killed writer left in the run and checkpoint dirs."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


# ---- checkpoints ---------------------------------------------------------------------------
