"""`mlxpt` command line: dispatches subcommands, each imported lazily (no mlx for --help).

Each command module in `mlxpt/commands/` has `register(subparsers)` and `run(args) -> int`.
User errors (MlxptError) print one line and exit with their code; --debug shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mlxpt import __version__

COMMANDS = {
    "train": "train a model (sft, dpo, simpo, orpo, rm, grpo); no arguments: SFT of the bundled default",
    "generate": "generate text from a prompt, optionally with an adapter",
    "chat": "chat with a model in the terminal",
    "eval": "accuracy of decoding strategies vs samples (greedy, best-of-n, self-consistency), base vs adapter",
    "pipeline": "run a recipe of stages (sft -> dpo/grpo -> eval) as one resumable unit, ending in a report",
    "fuse": "merge a run's adapter into the base weights",
    "serve": "OpenAI-compatible server for the base model and the runs' adapters (loopback)",
    "data": "check a dataset, or write a model's own answers to replay (self-answers)",
    "doctor": "show versions, the BLAS in use and a matmul speed test",
    "tui": "open the terminal UI (also: `mlxpt` with no arguments on a terminal)",
}


def _version() -> str:
    from mlxpt import _blas

    return f"mlxpt {__version__} (BLAS: {_blas.describe()})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mlxpt", description="Local LLM post-training workbench on MLX.")
    parser.add_argument("--version", action="store_true", help="print the version and the BLAS in use")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        if name == wanted:
            importlib.import_module(f"mlxpt.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.version:
        print(_version())
        return 0
    if args.command is None:
        if not argv and sys.stdin.isatty() and sys.stdout.isatty():
            return main(["tui"])  # `mlxpt` alone on a terminal opens the TUI
        parser.print_help()
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_command(args)


class _QuietWhenClosed:
    """stdout that survives its reader going away (`mlxpt train ... | head`): the first write to a
    closed pipe sends the rest to /dev/null, so training goes on and `generate | head` ends quietly."""

    def __init__(self, stream):
        self._stream, self._closed = stream, False

    def write(self, text):
        if not self._closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self):
        if not self._closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def _close(self):
        import os

        self._closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the interpreter's final flush must not fail either
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _bug_line(e: BaseException) -> str:
    """One line for an exception mlxpt did not expect, with the traceback saved to a file."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(e))
    try:
        fd, path = tempfile.mkstemp(prefix="mlxpt-traceback-", suffix=".txt")
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        where = f"traceback in {path}"
    except OSError:
        where = "rerun with --debug for the traceback"
    what = f"{type(e).__name__}: {e}".splitlines()[0][:200] if str(e) else type(e).__name__
    return f"error E001: unexpected {what} - this is a bug in mlxpt; {where}"


_TEMP_VARS = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")  # what std::filesystem::temp_directory_path reads, in order


def temp_dir_error(cause: BaseException | None = None):
    """E306 when the temporary folder the environment names does not exist. MLX's CPU backend
    compiles kernels there, and a missing one fails at the first computation with a bare C++
    `temp_directory_path` error (Python's tempfile falls back silently, so nothing else notices).
    Without `cause`: the preflight, on CPU backends (not macOS, whose GPU needs no such folder);
    with it: that C++ error, translated, on any platform. None when neither applies."""
    import os

    if cause is not None and "temp_directory_path" not in str(cause):
        return None
    if cause is None and sys.platform == "darwin":
        return None
    from mlxpt.errors import ConfigError

    for var in _TEMP_VARS:
        value = os.environ.get(var)
        if value is not None:  # set, even to "": the C++ library takes it (an empty one fails too)
            if os.path.isdir(value) and cause is None:
                return None
            return ConfigError(
                "E306", f"the temporary folder {var}={value!r} is not an existing folder", "environment",
                f"MLX compiles its kernels there: unset {var} or point it at a folder (export {var}=/tmp)",
            )  # fmt: skip
    if cause is not None:
        return ConfigError("E306", "no temporary folder for MLX's kernels", "environment",
                           "set TMPDIR to an existing, writable folder")  # fmt: skip
    return None


def resource_error(e: BaseException):
    """E301 (exit 3) for a full disk or a file-size limit met where no writer of ours caught it:
    MLX's own writes (`mx.save_safetensors` raises RuntimeError "[write] Unable to write"), its
    kernel compiler ("File too large" from the linker), a plain OSError. None for anything else."""
    import errno

    from mlxpt.errors import ResourceError

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        from mlxpt.runs.atomic import disk_full_error

        return disk_full_error(e.filename or "a file", e)
    text = str(e)
    if isinstance(e, RuntimeError) and any(
        s in text for s in ("[write] Unable to write", "File too large", "No space left on device")
    ):
        limit = (
            "file size limit (ulimit -f) reached" if "File too large" in text else "disk full (or a file size limit)"
        )
        return ResourceError(
            "E301", f"{limit} while MLX wrote or compiled ({text.splitlines()[0][:100]})", "disk",
            "free space or raise the limit (TMPDIR holds MLX's compiled kernels), then run the command again",
        )  # fmt: skip
    return None


def _computes(args) -> bool:
    """Whether the command runs the model (so needs MLX's temporary folder on a CPU backend)."""
    if args.command in ("doctor", "tui"):
        return False
    return args.command != "data" or getattr(args, "data_command", None) not in ("check", "convert")


def run_command(args) -> int:
    from mlxpt.errors import MlxptError

    if args.command != "tui" and not isinstance(sys.stdout, _QuietWhenClosed):  # the TUI owns its terminal
        sys.stdout = _QuietWhenClosed(sys.stdout)
    try:
        if _computes(args) and (bad := temp_dir_error()) is not None:
            raise bad  # before any output or run folder
        return int(args.func(args) or 0)
    except MlxptError as e:
        if getattr(args, "debug", False):
            raise
        errors = getattr(e, "errors", [e])
        for err in errors[:20]:
            print(f"error {err.line()}", file=sys.stderr)
        if len(errors) > 20:
            print(f"... and {len(errors) - 20} more errors", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if getattr(args, "debug", False):
            raise
        known = (temp_dir_error(e) if isinstance(e, RuntimeError) else None) or resource_error(e)
        print(f"error {known.line()}" if known else _bug_line(e), file=sys.stderr)
        return known.exit_code if known else 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
