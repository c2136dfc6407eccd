"""Two guards every writer goes through: an output never is, contains or lies inside an input,
and one process at a time writes a run folder.

- `check_output`: resolved paths (symlinks followed) are compared before any work; an existing
  folder is replaced only under `--force` and only if mlxpt wrote it as that kind of output (it
  holds a marker file), never a run folder or a folder of runs.
- `RunLock`: an OS lock (`fcntl.flock`) on the run folder itself, released by the kernel when the
  process dies, so a crashed writer never blocks a resume; the refusal names the pid that holds
  it. No file is created or changed by taking it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxpt.errors import ConfigError

MARKER = ".mlxpt-output"


def is_run_dir(path: Path) -> bool:
    """A run folder as mlxpt writes it (config and status, or checkpoints)."""
    return (path / "config.json").is_file() and ((path / "status.json").is_file() or (path / "checkpoints").is_dir())


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_output(
    out: str | Path, inputs: dict[str, str | Path], kind: str, force: bool = False, existing: bool = True
) -> Path:
    """Refuse an output that is, contains or lies inside one of `inputs` ({what: path}), a run
    folder or a folder of runs; an existing non-empty folder needs `force` and a marker saying
    mlxpt wrote it as `kind` (`existing=False` checks only against the inputs, for a first pass
    before every input is known). Returns the resolved output path. Nothing is touched."""
    given, o = Path(out), Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        rel = _relation(o, Path(path).resolve())
        if rel is not None:
            raise ConfigError(
                "E617", f"the output {rel} the {what} ({path}): writing there would destroy it", str(given),
                "choose a new folder outside every input",
            )  # fmt: skip
    if not existing:
        return o
    if o.exists() and not o.is_dir():
        raise ConfigError("E611", "the output path exists and is not a folder", str(given), "choose another --out")
    if not o.is_dir() or not any(o.iterdir()):
        return o
    runs = is_run_dir(o) or any(c.is_dir() and is_run_dir(c) for c in o.iterdir())
    if runs:
        raise ConfigError(
            "E617", "the output folder is a run folder or holds run folders", str(given), "choose a new folder"
        )
    if not force:
        raise ConfigError(
            "E611", "the output folder exists and is not empty", str(given), "choose another --out or pass --force"
        )
    if read_marker(o) != kind:
        raise ConfigError(
            "E618",
            f"--force replaces only a {kind} folder mlxpt wrote (it has no {MARKER} file)",
            str(given),
            "choose another --out, or move the folder away yourself",
        )
    return o


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as an output mlxpt wrote (so a later --force may replace it)."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def read_marker(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _holder_pid(path: Path) -> str:
    """Who holds the flock on `path`: /proc/locks on Linux, else the run's status.json pid."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    return parts[4]
    except (OSError, ValueError):
        pass
    try:
        status = json.loads((path / "status.json").read_text(encoding="utf-8"))
        if status.get("status") == "running" and status.get("pid"):
            return str(status["pid"])
    except (OSError, ValueError, AttributeError):
        pass
    return "another process"


class RunLock:
    """Hold an exclusive flock on the run folder itself for as long as this process writes it (a
    context manager). Locking the directory creates and changes no file in it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        if not self.path.is_dir():
            raise ConfigError("E523", "run folder not found", str(self.path), "pass runs/<id> of an existing run")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                "E521",
                f"run {self.path.name} is being trained by pid {_holder_pid(self.path)}",
                str(self.path),
                "wait for it to finish or stop it first (one writer per run)",
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> int | None:
    """The pid writing the run now (-1 if it cannot be told), or None when no process is."""
    import fcntl

    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pid = _holder_pid(Path(run_dir))
        return int(pid) if pid.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_writable(path: str | Path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output location that cannot be written: a file where a folder
    is needed (or the reverse), a parent that is a file, or a place without write permission."""
    p = Path(path)
    try:
        _check_writable(p, flag, folder)
    except OSError as exc:  # a name too long, a loop of links: the path itself cannot be used
        raise ConfigError(
            "E619",
            f"{flag} cannot be used ({exc.strerror or type(exc).__name__})",
            str(p)[:200],
            "choose a shorter, plain path",
        ) from None


def _check_writable(p: Path, flag: str, folder: bool) -> None:
    import stat

    want = "a folder" if folder else "a file"
    if p.exists():
        mode = os.stat(p).st_mode
        # a device, FIFO or socket is not an output: the atomic rename would replace it by a file
        if not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
            raise ConfigError("E619", f"{flag} must be {want}, and this path is not", str(p), f"give {want} path")
    anc = p if (folder and p.exists()) else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(
            "E619", f"{anc} is a file, so {flag} cannot be created under it", str(p), "choose another path"
        )
    if not os.access(anc, os.W_OK | os.X_OK):
        from mlxpt.errors import ResourceError

        raise ResourceError("E312", f"no permission to write in {anc}", str(p), f"choose a writable {flag}")
