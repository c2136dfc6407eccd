"""The mlxpt Textual app: a client of the library and of `mlxpt train --events json` children.

Training runs are child processes, so a crash or an out-of-memory abort in a run never takes the
app down; their stdout events fold into `RunLog`s the monitor draws. `create_app` is the factory
the CLI, the Pilot tests and the snapshot tests share.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from collections import deque
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding

from app.messages import RunUpdated
from app.runlog import RunLog

STDERR_TAIL = 40


class MlxptApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "mlxpt"
    ENABLE_COMMAND_PALETTE = False  # every action has a key; the footer needs the room
    BINDINGS = [
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        runs_dir: str | os.PathLike = "runs",
        train_command: list[str] | None = None,
        poll_runs: bool = True,
    ) -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        # The command a run is started with; tests swap in a scripted fake child.
        self.train_command = train_command or [sys.executable, "-m", "mlxpt.cli"]
        self.poll_runs = poll_runs
        self.logs: dict[str, RunLog] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._counter = 0

    def on_mount(self) -> None:
        from app.screens.runs import RunsScreen

        self.push_screen(RunsScreen())

    # ---- help -------------------------------------------------------------------------------

    def action_help(self) -> None:
        from app.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    # ---- runs -------------------------------------------------------------------------------
    def continue_from(self, run_dir: Path) -> None:
        """Ask for a method, then open the New run form starting from `run_dir`'s adapter: `from_run`
        and the run's base model filled in. The Runs list's and the monitor's `t`."""
        from app.form import continue_values, has_field
        from app.screens.continue_run import ContinueScreen
        from app.screens.new_run import NewRunScreen
        from mlxpt.errors import MlxptError
        from mlxpt.runs import read_config

        try:
            config = read_config(run_dir)
        except MlxptError as e:
            self.notify(e.line(), severity="error")
            return
        if not (Path(run_dir) / "adapters.safetensors").is_file():
            self.notify(f"{Path(run_dir).name} has no saved adapter to continue from", severity="warning")
            return

        def chosen(method: str | None) -> None:
            if not method:
                return
            if not has_field(method, "from_run"):
                self.notify(
                    "this mlxpt cannot start a run from another run's adapter yet (no from_run setting)",
                    severity="warning",
                )
            self.push_screen(NewRunScreen(method=method, values=continue_values(config, run_dir)))

        self.push_screen(ContinueScreen(Path(run_dir).name, str(config.get("method", "sft"))), chosen)

    def log_for(self, run_dir: Path) -> RunLog:
        """The RunLog of a run folder: the live one if this app runs it, else one read from files."""
        run_dir = Path(run_dir)
        for log in self.logs.values():
            if log.run_dir is not None and log.run_dir.resolve() == run_dir.resolve():
                return log
        from mlxpt.runs.listing import run_info

        info = run_info(run_dir)
        log = RunLog(key=str(run_dir), run_dir=run_dir, status=info.status, exit_reason=info.error)
        log.load_files()
        self.logs[log.key] = log
        return log

    def start_run(self, args: list[str], log: RunLog | None = None) -> RunLog:
        """Start `mlxpt <args>` as a child feeding `log` (a new one if None); return the log."""
        if log is None:
            self._counter += 1
            log = RunLog(key=f"new-{self._counter}")
            self.logs[log.key] = log
        log.status, log.exit_reason, log.live = "starting", None, True
        log.say("$ " + shlex.join(["mlxpt", *args]))
        self._supervise(log, [*self.train_command, *args])
        return log

    def resume_run(self, log: RunLog) -> None:
        if log.run_dir is not None and not log.live:
            self.start_run(["train", "--resume", str(log.run_dir), "--events", "json"], log)

    def stop_run(self, log: RunLog) -> bool:
        """Ask a run to stop: SIGINT once = finish or abandon the step, checkpoint, exit 130."""
        proc = self.procs.get(log.key)
        pid = proc.pid if proc is not None else log.pid
        if pid is None and log.run_dir is not None:  # a run started from the CLI
            from mlxpt.runs import read_status
            from mlxpt.runs.listing import pid_alive

            status = read_status(log.run_dir) or {}
            if status.get("status") == "running" and pid_alive(status.get("pid")):
                pid = status["pid"]
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:
            return False
        log.say("stop requested: checkpointing, then exiting")
        self.post_message(RunUpdated(log.key))
        return True

    @work(group="children")
    async def _supervise(self, log: RunLog, argv: list[str]) -> None:
        """Run one child: fold its stdout events into `log`, keep its stderr tail for the reason."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # a terminal Ctrl-C goes to the app, not to the run
                limit=1 << 22,
            )
        except OSError as e:
            log.finish(127, [f"error cannot start the run: {e}"])
            self.post_message(RunUpdated(log.key))
            return
        self.procs[log.key] = proc
        log.pid = proc.pid
        tail: deque[str] = deque(maxlen=STDERR_TAIL)

        async def read_stdout() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                log.feed_line(raw.decode("utf-8", "replace"))
                self.post_message(RunUpdated(log.key))

        async def read_stderr() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail.append(line)
                    log.say(line)
                    self.post_message(RunUpdated(log.key))

        await asyncio.gather(read_stdout(), read_stderr())
        code = await proc.wait()
        self.procs.pop(log.key, None)
        log.finish(code, list(tail))
        self.post_message(RunUpdated(log.key))

    def on_run_updated(self, message: RunUpdated) -> None:
        """Hand the (collapsed) update to the screen on top, if it cares."""
        handler = getattr(self.screen, "run_updated", None)
        if handler is not None:
            handler(message.key)

    async def action_quit(self) -> None:
        """Quit; running children get one SIGINT (checkpoint and exit) and a moment to save it."""
        for proc in list(self.procs.values()):
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        for proc in list(self.procs.values()):
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except (TimeoutError, asyncio.TimeoutError):
                proc.kill()
        self.exit()

    def on_unmount(self) -> None:
        """Leaving without ctrl+q (tests, a crash of the app itself): no child outlives us silently."""
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass


def create_app(runs_dir: str | os.PathLike = "runs", **kw) -> MlxptApp:
    return MlxptApp(runs_dir, **kw)


def run(runs_dir: str | os.PathLike = "runs") -> int:
    create_app(runs_dir).run()
    return 0
