"""Checkpoints of a run directory (the folder itself, its config and status: folder.py).

Layout::

    runs/<YYYYmmdd-HHMMSS>-<name>/
        config.json  status.json  metrics.jsonl
        checkpoints/step-00000100/  adapters.safetensors  optimizer.safetensors
                                    state.json  manifest.json (sha256 + size of each, written last)

A checkpoint is built under `checkpoints/.tmp-step-…` and renamed into place only when complete,
so a `step-*` directory with a matching manifest is the only thing ever read back. The directory
scan is the source of truth (there is no `latest` pointer to go stale). One writer per run dir.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load

from mlxpt.errors import MlxptError, NumericsError
from mlxpt.runs.atomic import (
    TMP_PREFIX,
    check_finite,
    disk_full_error,
    fsync_dir,
    is_disk_full,
    safetensors_bytes,
    sha256_bytes,
    sha256_file,
    to_json,
    write_fsync,
)
from mlxpt.runs.folder import CHECKPOINTS, now_iso

FORMAT = "mlxpt-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"

# Used with fullmatch: `$` alone also matches before a trailing newline ("x\n" passed as a name).
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    arrays: dict[str, dict[str, np.ndarray]],
    state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write `checkpoints/step-{step:08d}` atomically and rotate to the newest `keep` ones.

    `arrays` maps a group name to tensors (`{"adapters": {...}, "optimizer": {...}}`), one
    safetensors file per group; `state` is the JSON resume state. Non-finite tensors raise
    NumericsError E401 and disk full ResourceError E301; either way nothing becomes visible.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not isinstance(state, dict):
        raise TypeError("state must be a dict")
    run_dir = Path(run_dir)
    name = f"step-{step:08d}"
    for group, tensors in arrays.items():
        if not _GROUP_RE.fullmatch(group):
            raise ValueError(f"array group name {group!r} must be letters, digits, '_' or '-'")
        check_finite(tensors, f"{run_dir / CHECKPOINTS / name} ({group})")

    # Serialise everything first: an error here (bad dtype, unserialisable state) writes nothing.
    files = {
        f"{group}.safetensors": safetensors_bytes(tensors, {"group": group, "step": str(step)})
        for group, tensors in arrays.items()
    }
    files[STATE] = (to_json(state) + "\n").encode("utf-8")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "created": now_iso(),
        "files": {n: {"sha256": sha256_bytes(d), "size": len(d)} for n, d in files.items()},
    }

    ckdir = run_dir / CHECKPOINTS
    final = ckdir / name
    tmp = ckdir / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    try:
        if not ckdir.is_dir():
            ckdir.mkdir(exist_ok=True)  # never the run folder itself: a deleted run stays deleted (E305)
            fsync_dir(run_dir)
        os.mkdir(tmp)
        for fname, data in files.items():
            write_fsync(tmp / fname, data)
        write_fsync(tmp / MANIFEST, (to_json(manifest) + "\n").encode("utf-8"))  # last
        fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(final, exc) from exc
        raise
    fsync_dir(ckdir)
    _rotate(run_dir, final, keep)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir to its final name. Re-saving an existing step (a rerun after
    falling back past a broken checkpoint) moves the old one aside first, then deletes it."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    aside = final.with_name(f"{TMP_PREFIX}replaced-{final.name}-{secrets.token_hex(4)}")
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rotate(run_dir: Path, new: Path, keep: int) -> None:
    """Delete checkpoints older than the newest `keep` that verify (the new one always counts).
    Broken ones inside that window are left alone; deletion hides the dir first (rename)."""
    kept = 0
    for ck in reversed(list_checkpoints(run_dir)):
        if ck == new:
            kept += 1
        elif kept < keep:
            kept += verify_checkpoint(ck)
        else:
            try:
                aside = ck.with_name(f"{TMP_PREFIX}deleted-{ck.name}-{secrets.token_hex(4)}")
                os.rename(ck, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass  # rotation is housekeeping; the new checkpoint is already safe


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoints (`step-*` dirs with a manifest), oldest first. Never raises."""
    found = []
    try:
        entries = list(os.scandir(Path(run_dir) / CHECKPOINTS))
    except OSError:
        return []
    for entry in entries:
        try:
            step = _step_of(Path(entry.name))
            if (
                step is not None
                and entry.is_dir(follow_symlinks=False)
                and os.path.isfile(os.path.join(entry.path, MANIFEST))
            ):
                found.append((step, Path(entry.path)))
        except OSError:
            continue
    return [p for _, p in sorted(found)]


class _Corrupt(Exception):
    pass


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Validate `manifest.json` and return its file table; raise _Corrupt with the reason."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Corrupt(f"no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise _Corrupt(f"unreadable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Corrupt(f"{MANIFEST} is not an mlxpt checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _Corrupt(f"unsupported checkpoint format version {version!r}")
    step = _step_of(path)
    if step is not None and manifest.get("step") != step:
        raise _Corrupt(f"{MANIFEST} says step {manifest.get('step')!r}, directory says {step}")
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE not in files:
        raise _Corrupt(f"{MANIFEST} lists no {STATE}")
    for fname, entry in files.items():
        # Names are plain file names: a manifest cannot point outside its directory.
        ok = (
            isinstance(fname, str)
            and _FILE_RE.fullmatch(fname)
            and fname != MANIFEST
            and isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA_RE.fullmatch(entry["sha256"])
            and isinstance(entry.get("size"), int)
        )
        if not ok:
            raise _Corrupt(f"{MANIFEST} has a malformed entry {fname!r}")
    return files


def _check_file(path: Path, fname: str, entry: dict[str, Any]) -> None:
    try:
        st = os.lstat(path / fname)
    except OSError:
        raise _Corrupt(f"{fname} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Corrupt(f"{fname} is not a regular file")
    if st.st_size != entry["size"]:
        raise _Corrupt(f"{fname} has {st.st_size} bytes, manifest says {entry['size']}")


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """True if the manifest is valid and every listed file matches its size and sha256."""
    return checkpoint_problems(path) is None


def checkpoint_problems(path: str | os.PathLike) -> str | None:
    """Why a checkpoint does not verify (one short phrase), or None when it does."""
    path = Path(path)
    try:
        for fname, entry in _read_manifest(path).items():
            _check_file(path, fname, entry)
            if sha256_file(path / fname) != entry["sha256"]:
                return f"{fname} does not match its sha256"
        return None
    except _Corrupt as e:
        return str(e) or "unreadable manifest"
    except Exception as e:  # noqa: BLE001 - garbage on disk must never crash a scan
        return f"{type(e).__name__}: {e}"[:120]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies, skipping broken ones; None if there is none."""
    for ck in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(ck):
            return ck
    return None


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Verify and load a checkpoint: `({group: {key: array}}, state)`. Corrupt -> MlxptError E302."""
    path = Path(path)
    try:
        files = _read_manifest(path)
        arrays: dict[str, dict[str, np.ndarray]] = {}
        state = None
        for fname, entry in files.items():
            _check_file(path, fname, entry)
            data = (path / fname).read_bytes()  # hash the very bytes we parse
            if sha256_bytes(data) != entry["sha256"]:
                raise _Corrupt(f"{fname} fails its sha256 check")
            if fname == STATE:
                state = json.loads(data.decode("utf-8"))
            elif fname.endswith(".safetensors"):
                arrays[fname[: -len(".safetensors")]] = _st_load(data)
        if not isinstance(state, dict):
            raise _Corrupt(f"{STATE} does not hold a JSON object")
    except _Corrupt as exc:
        raise _corrupt_error(path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a file that hashes right but won't parse
        raise _corrupt_error(path, f"{type(exc).__name__}: {exc}") from None
    # We never write NaN/Inf (save_checkpoint refuses), so one here came from elsewhere; resuming
    # from it would only skip steps until the numerics stop.
    for group, tensors in arrays.items():
        for key, arr in tensors.items():
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise NumericsError(
                    "E403",
                    f"checkpoint holds a non-finite tensor {group}/{key}",
                    where=str(path),
                    hint="mlxpt never writes NaN/Inf: delete this checkpoint folder to resume from the one before",
                )
    return arrays, state


def _corrupt_error(path: Path, reason: str) -> MlxptError:
    return MlxptError(
        "E302",
        f"checkpoint is corrupt or incomplete: {reason}",
        where=str(path),
        hint="resume from an earlier checkpoint (latest_checkpoint skips broken ones) or delete it",
    )
