"""Open the terminal UI: list your runs, start, watch, stop and resume training, chat with a
tuned model, compare it with the base model and evaluate it. Also opened by `mlxpt` with no
arguments. Keys are listed on every screen with `?`; `ctrl+q` quits (a run it started saves a
checkpoint first)."""

# Imported lazily by the CLI, so `mlxpt --help` loads neither textual nor mlx.

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("tui", help="open the terminal UI (also: `mlxpt` with no arguments)", description=__doc__)
    p.add_argument("--runs-dir", default="runs", help="folder of run directories to list and create runs in")
    p.set_defaults(func=run)


def run(args) -> int:
    from mlxpt.errors import ConfigError

    try:
        from app.main import run as run_app
    except ImportError as e:
        raise ConfigError(
            "E520", f"the TUI cannot start: {e}", "app", "reinstall mlxpt (`pip install -e .`) to get textual"
        ) from None
    return run_app(args.runs_dir)
