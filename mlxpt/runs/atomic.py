"""Atomic file writes: temp file in the same directory, fsync, `os.replace`, fsync the directory.

A reader (or a crash) sees either the old file or the new one, never a torn one. Temp names
start with `.tmp-` so `folder.clean_temp` can sweep what a killed process left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as _st_save

from mlxpt.errors import NumericsError, ResourceError

TMP_PREFIX = ".tmp-"
# EFBIG: a file-size limit (`ulimit -f`); Python ignores SIGXFSZ, so the write fails with it.
_DISK_FULL = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def disk_full_error(path: str | os.PathLike, exc: BaseException | None = None) -> ResourceError:
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        what, fix = "file size limit (ulimit -f) reached", "raise the limit"
    else:
        what, fix = "disk full", "free space"
    return ResourceError(
        "E301",
        f"{what} while writing {path}",
        hint=f"{fix}; what was there before (a run's previous checkpoint) is intact",
    )


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside `path` durable. Best effort where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_fsync(path: Path, data: bytes) -> None:
    """Create `path` (must not exist), write all of `data`, fsync. No rename: for files inside a
    directory that is itself still hidden under a `.tmp-` name."""
    # 0o666 & ~umask, unlike mkstemp's 0o600, so artefacts get the user's usual permissions.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically. Disk full raises ResourceError E301."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        write_fsync(tmp, data)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if is_disk_full(exc):
            raise disk_full_error(path, exc) from exc
        if isinstance(exc, IsADirectoryError):  # an edited folder: a file's name taken by a folder
            from mlxpt.errors import ConfigError

            raise ConfigError(
                "E630", f"{path.name} is a folder, so it cannot be written as a file", str(path),
                "move that folder away; mlxpt writes a file there",
            ) from None  # fmt: skip
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    # NumPy scalars and arrays show up in states (RNG keys, counters); store them as plain JSON.
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text as written by this layer. Floats round-trip exactly (repr); non-finite floats are
    written as Python's `NaN`/`Infinity` so a state like `best_loss = inf` still resumes exactly."""
    return json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def check_finite(tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise NumericsError E401 if any floating tensor holds NaN or Inf."""
    for key, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise NumericsError(
                "E401",
                f"refusing to write non-finite tensor {key!r} ({bad} of {arr.size} values NaN/Inf)",
                where=where,
                hint="nothing was written; the previous checkpoint is intact",
            )


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise to safetensors bytes, keeping each dtype. Non-contiguous arrays are copied."""
    flat = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # keeps 0-d shapes
    return _st_save(flat, metadata=metadata)


def save_safetensors_atomic(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically; non-finite floating tensors are refused (E401)."""
    check_finite(tensors, str(path))
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def append_jsonl(path: str | os.PathLike, obj: Any, fsync: bool = False) -> None:
    """Append one JSON line (metrics, events); `fsync=True` for rare, important events.

    A line torn by a crash is closed with a newline before the next append, and a failed write is
    truncated away, so at most one unreadable line per crash; `read_jsonl` skips it."""
    line = (to_json(obj, indent=None) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, exc) from exc
        raise
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            if is_disk_full(exc):
                raise disk_full_error(path, exc) from exc
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read a JSON-lines file; blank lines and lines torn by a crash are skipped. Missing -> []."""
    rows: list[Any] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
