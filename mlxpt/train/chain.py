"""The runner's side of chaining (`--from RUN`, models/chaining.py): which adapter a run starts
from, new or resumed, and what its run folder records of it.

A new run checks its source and takes the source adapter's shape before any data or weights are
read; once its folder exists it keeps a copy of the adapter bytes (START_FILE) and writes the
source's `lineage` into config.json. A resumed run starts from that copy (the source may have
moved on or gone), checked against the lineage's sha256. `--from` cannot change on resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxpt.config import validate
from mlxpt.errors import ConfigError, ModelError
from mlxpt.models.adapters import ADAPTER_FILE
from mlxpt.models.chaining import START_FILE, adopt_settings, resolve_start
from mlxpt.runs import atomic_write_bytes, read_config


@dataclass
class Chain:
    """The adapter a run starts from: its bytes and the lineage config.json records."""

    data: bytes
    lineage: dict
    where: str
    warnings: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)


def prepare(cfg, resume_dir: str | Path | None) -> Chain | None:
    """The run's start adapter (None without --from). A new run: the source, checked, its shape
    adopted into `cfg.adapter` and `from_run` made absolute. A resume: the run folder's copy."""
    from_run = cfg.adapter.from_run
    if not from_run:
        return None
    if resume_dir is not None:
        return _resumed(Path(resume_dir), from_run)
    start = resolve_start(from_run, runs_dir=cfg.train.runs_dir)
    adopted = adopt_settings(cfg.adapter, start.adapter_config, from_run)
    validate(cfg, from_run)  # the adopted values too (a hand-edited adapter_config.json)
    cfg.adapter.from_run = str(start.folder)
    return Chain(start.data, start.lineage, str(start.folder), list(start.warnings), adopted)


def _resumed(run_dir: Path, from_run: str) -> Chain:
    run_dir = run_dir.resolve()
    source = Path(from_run).expanduser().resolve()
    if source == run_dir or run_dir in source.parents:
        raise ConfigError(
            "E576", "--from is this run's own folder: a run cannot start from its own output", str(run_dir)
        )
    lineage = read_config(run_dir).get("lineage") or {}
    copy = run_dir / START_FILE
    if copy.is_file():
        data, where = copy.read_bytes(), str(copy)
    else:  # a run stopped between its folder and its copy: the source, if it is unchanged
        data, where = resolve_start(from_run, run_dir=run_dir).data, from_run
    if hashlib.sha256(data).hexdigest() != lineage.get("sha256"):
        raise ConfigError(
            "E578", "the adapter this run started from is missing or changed (its sha256 differs from config.json's lineage)",
            where, "start a new run with --from; resuming would train against another starting point",
        )  # fmt: skip
    return Chain(data, lineage, where)


def start_arrays(chain: Chain) -> dict[str, np.ndarray]:
    """The start adapter's weights (read from its bytes, never unpickled); E224/E225 if damaged."""
    import json
    import struct

    from mlxpt.backends.numpy_weights import parse_safetensors

    try:
        arrays = parse_safetensors(chain.data, chain.where)
    except (ValueError, KeyError, IndexError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(
            "E224", f"{ADAPTER_FILE} is damaged or not safetensors ({str(e)[:80]})", chain.where,
            "use another checkpoint of the run, or re-save the adapter",
        ) from None  # fmt: skip
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ModelError(
                "E225", f"the --from adapter has non-finite weights ({name})", chain.where,
                "start from an earlier checkpoint of that run; this one was saved from a diverged state",
            )  # fmt: skip
    return arrays


def keep_copy(chain: Chain, run_dir: Path) -> None:
    """The new run's own copy of the bytes it started from (what a resume reads)."""
    atomic_write_bytes(Path(run_dir) / START_FILE, chain.data)


def model_warning(chain: Chain, model_path: str) -> list[str]:
    """A source trained on another model folder: the shapes may fit and the result be nonsense."""
    theirs = chain.lineage.get("model_path")
    if theirs and Path(theirs).resolve() != Path(model_path).resolve():
        return [f"the --from run was trained on {theirs}, this run loads {model_path}: check it is the same model"]
    return []
