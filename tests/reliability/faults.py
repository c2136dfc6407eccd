"""Fault hooks installed inside a forked training process (see zygote.py).

A spec names an operation (`write`, `create`, `fsync`, `replace`, `rename`, `mkdir`, `rmtree`,
`apply`), an optional substring its target path must contain, which matching call (`nth`) fires
and what happens then: `kill` (SIGKILL before the call), `kill-after`, `kill-half` (a write that
stops half way, then SIGKILL), `enospc` / `efbig` (the call raises that OSError), or nothing
(`count`: every call under `root` is counted by signature and written to `count_file` at exit).
Only calls on paths under `root` are seen, so the interpreter's own files never match.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from collections import Counter

_ORIG: dict = {}
_STATE: dict = {"spec": None, "seen": 0, "fired": False, "counts": Counter(), "order": []}


def signature(op: str, path: str) -> str:
    """`op:parent/name` with run-specific parts (step numbers, random suffixes, run names) removed."""
    parts = str(path).rstrip("/").split("/")
    name, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    norm = [re.sub(r"-[0-9a-f]{8}$", "", re.sub(r"step-\d{8}", "step-N", p)) for p in (parent, name)]
    keep = norm[0] if norm[0].startswith((".tmp-", "step-", "checkpoints")) else "<run>"
    return f"{op}:{keep}/{norm[1]}"


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hit(op: str, path) -> str | None:
    """Record a call; return the action to take now, if this call is the one the spec names."""
    spec = _STATE["spec"]
    path = os.fsdecode(path) if not isinstance(path, str) else path
    root = spec.get("root")
    if root and not os.path.abspath(path).startswith(root):
        return None
    sig = signature(op, path)
    _STATE["counts"][sig] += 1
    _STATE["order"].append(sig)
    if _STATE["fired"] or spec.get("action") == "count":
        return None
    if spec.get("op") not in (op, "any") or spec.get("match", "") not in sig:
        return None
    _STATE["seen"] += 1
    if _STATE["seen"] < spec.get("nth", 1):
        return None
    _STATE["fired"] = True
    return spec["action"]


def _raise_or_kill(action: str | None, path) -> None:
    if action in ("kill", "kill-half"):
        _kill()
    if action in ("enospc", "efbig"):
        code = errno.ENOSPC if action == "enospc" else errno.EFBIG
        raise OSError(code, os.strerror(code), os.fsdecode(path))


def _path_op(op: str, name: str, path_arg: int = 0):
    orig = _ORIG[name]

    def wrapper(*args, **kwargs):
        path = args[path_arg] if len(args) > path_arg else kwargs.get("dst" if path_arg else "src")
        action = _hit(op, path)
        _raise_or_kill(action, path)
        out = orig(*args, **kwargs)
        if action == "kill-after":
            _kill()
        return out

    return wrapper


def _write(fd, data):
    action = _hit("write", _fd_path(fd))
    if action == "kill-half":
        view = memoryview(data)
        _ORIG["write"](fd, view[: max(1, len(view) // 2)])
        _kill()
    _raise_or_kill(action, _fd_path(fd))
    out = _ORIG["write"](fd, data)
    if action == "kill-after":
        _kill()
    return out


def _fsync(fd):
    path = _fd_path(fd)
    action = _hit("fsyncdir" if os.path.isdir(path) else "fsync", path)
    _raise_or_kill(action, path)
    out = _ORIG["fsync"](fd)
    if action == "kill-after":
        _kill()
    return out


def _open(path, flags, *args, **kwargs):
    action = _hit("create", path) if flags & os.O_CREAT else None
    _raise_or_kill(action, path)
    out = _ORIG["open"](path, flags, *args, **kwargs)
    if action == "kill-after":
        _kill()
    return out


def _rmtree(path, *args, **kwargs):
    action = _hit("rmtree", path)
    if action == "kill-half":  # delete one file of the tree, then die
        for dirpath, _, files in os.walk(path):
            if files:
                os.unlink(os.path.join(dirpath, files[0]))
                break
        _kill()
    _raise_or_kill(action, path)
    return _ORIG["rmtree"](path, *args, **kwargs)


def install(spec: dict | None) -> None:
    """Wrap the os/shutil calls (and the backend's update) according to `spec`."""
    if not spec:
        return
    if spec.get("root"):
        spec["root"] = os.path.abspath(spec["root"])
    _STATE["spec"] = spec
    for name in ("write", "fsync", "replace", "rename", "mkdir", "open"):
        _ORIG[name] = getattr(os, name)
    _ORIG["rmtree"] = shutil.rmtree
    os.write, os.fsync, os.open = _write, _fsync, _open
    os.replace = _path_op("replace", "replace", 1)
    os.rename = _path_op("rename", "rename", 1)
    os.mkdir = _path_op("mkdir", "mkdir", 0)
    shutil.rmtree = _rmtree
    if spec.get("op") == "apply":  # "mid-step": the update itself
        from mlxpt.backends.mlx_backend import MLXBackend

        orig_apply = MLXBackend.apply

        def apply(self, lr, clip):
            _STATE["seen"] += 1
            if _STATE["seen"] == spec.get("nth", 1):
                _kill()
            return orig_apply(self, lr, clip)

        MLXBackend.apply = apply
    if spec.get("numeric"):
        from reliability import numeric

        numeric.inject(spec["numeric"])


def finish() -> None:
    """Write the call counts (spec `count_file`) before the process exits."""
    spec = _STATE["spec"]
    if spec and spec.get("count_file"):
        with open(spec["count_file"], "w") as f:
            json.dump({"counts": _STATE["counts"], "order": _STATE["order"], "fired": _STATE["fired"]}, f)
