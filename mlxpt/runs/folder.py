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

from mlxpt.config.paths import PATH_SETTINGS, _anchored
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


def anchor_paths(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a saved config whose relative paths are made absolute against `base` (the folder
    they were relative to), so a run resumes, generates and fuses from any working directory."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    model_path = out.get("model_path")
    for section, key in PATH_SETTINGS:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = _anchored(key, out[section][key], base, model_path)
    if isinstance(model_path, str):
        out["model_path"] = _anchored("model_path", model_path, base)
    return out


def _origin(run_dir: Path, cfg: dict[str, Any]) -> Path | None:
    """The working directory a run with relative paths was started from: its runs folder was
    `runs_dir` relative to it, so strip that from the run folder's parent (None if it was moved)."""
    runs_dir = (cfg.get("train") or {}).get("runs_dir") if isinstance(cfg.get("train"), dict) else None
    if not isinstance(runs_dir, str) or Path(runs_dir).is_absolute():
        return None
    parent = run_dir.resolve().parent
    parts = [x for x in Path(runs_dir).parts if x != "."]
    if ".." in parts:
        return None
    if parts and list(parent.parts[-len(parts) :]) != parts:
        return None
    return Path(*parent.parts[: len(parent.parts) - len(parts)]) if parts else parent


def write_config(run_dir: str | os.PathLike, cfg: dict[str, Any]) -> None:
    """Write `config.json`, its relative paths made absolute (they are relative to this process's
    working directory, which a later command need not share)."""
    atomic_write_json(Path(run_dir) / "config.json", anchor_paths(cfg, Path.cwd()))


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's saved config; relative paths an older version saved are anchored where the run was
    started (found from its runs folder), so it loads from any working directory."""
    cfg = _read_config(run_dir)
    origin = _origin(Path(run_dir), cfg)
    return anchor_paths(cfg, origin) if origin is not None else cfg


def _read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
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
    except OSError as exc:  # unreadable (permissions), or the run path is a file
        raise ConfigError(
            "E304",
            f"config.json cannot be read ({exc.strerror or type(exc).__name__})",
            str(path),
            "check the run folder's permissions",
        ) from None
    if not isinstance(cfg, dict):
        raise ConfigError("E304", "config.json must hold a JSON object", str(path))
    if "method" in cfg:  # written by `mlxpt train`: a section edited away would resume on defaults
        from mlxpt.config.build import METHODS

        missing = [s for s in ("model", "data", "adapter", "train") if not isinstance(cfg.get(s), dict)]
        if not missing and not isinstance(cfg["model"].get("model"), str):
            missing = ["model.model"]
        what = f"has no {missing[0]!r} section" if missing else f"names an unknown method {cfg['method']!r}"
        if missing or cfg["method"] not in METHODS:
            raise ConfigError(
                "E304", f"config.json {what}", str(path), "restore the run's config.json (it was edited or damaged)"
            )
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
