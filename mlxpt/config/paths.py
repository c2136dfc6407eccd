"""Which settings name files or folders, and how config.json saves them: a relative path that
exists made absolute, so a run resumes, generates and fuses from any working directory
(runs/folder.py saves and reads them; build.py anchors the ones a run fingerprints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxpt.config.sections import MODEL_ALIASES

# (section, key) of the settings that name files or folders
PATH_SETTINGS = (
    ("model", "model"),
    ("data", "data"),
    ("data", "valid"),
    ("train", "runs_dir"),
    ("train", "regression_data"),
    ("reg", "replay"),
    ("grpo", "rewards"),
    ("rft", "rewards"),
    ("rft", "scorer"),
    ("distill", "teacher"),
)
SCORER_RUNS = ("rm", "prm", "prm+verifier")  # `--scorer KIND:RUN` (decode/scorers.py) that name a run folder


def _anchored(key: str, value: Any, base: Path, model_path: Any = None) -> Any:
    """`value` with a relative path that exists under `base` made absolute; anything else as it is
    (aliases, hub ids, `general`, `none`, built-in reward names, scorers that name no file)."""
    if not isinstance(value, str) or not value:
        return value
    if key == "rewards":  # `accuracy,path/f.py:fn`: only the file part of each item
        return ",".join(_file_function(item, base) for item in value.split(","))
    if key == "scorer":  # `prm:RUN`, `rm:RUN`, `reward:f.py:fn`: only the path after the kind
        kind, sep, rest = value.partition(":")
        if kind in SCORER_RUNS and rest:
            return f"{kind}{sep}{_anchored('file', rest, base)}"
        return f"{kind}{sep}{_file_function(rest, base)}" if kind in ("reward", "verifier") and rest else value
    if key == "teacher" and value in MODEL_ALIASES:  # an alias wins over a folder of that name
        return value
    try:
        p = Path(value).expanduser()
        if p.is_absolute() or not (base / p).exists():
            return value
    except (OSError, RuntimeError, ValueError):  # a name too long, no home folder, a NUL byte
        return value
    # a model reference is a path only where it resolved to itself (not an alias or hub id)
    if key == "model" and isinstance(model_path, str) and Path(model_path) != p and p.suffix.lower() != ".gguf":
        return value
    return str((base / p).resolve())


def anchor_setting(key: str, value: Any, base: Path) -> Any:
    """One setting's value as config.json saves it: a relative path that exists under `base`
    made absolute (see _anchored; `key` names the setting: rewards, scorer, teacher, data, ...)."""
    return _anchored(key, value, base)


def _file_function(item: str, base: Path) -> str:
    """`path/f.py:fn` with its file anchored; anything else (a built-in name) as it is."""
    path, sep, fn = item.strip().rpartition(":")
    return f"{_anchored('file', path, base)}{sep}{fn}" if sep and path.endswith(".py") else item
