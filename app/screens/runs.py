"""Runs: every run folder in the runs directory, including runs started from the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.active_time import TrainingTime, duration
from app.pipelines import PipelineInfo, list_pipelines
from app.runlog import resume_refusal
from mlxpt.runs.listing import RunInfo, list_runs

REFRESH_S = 2.0
COLUMNS = ("run", "method", "status", "step", "last", "started", "time")


def short_model(model: str) -> str:
    return Path(model).name if "/" in model or "\\" in model else model


def short_name(name: str) -> str:
    """The run name without its `YYYYmmdd-HHMMSS-` stamp (the started column shows it)."""
    head, _, rest = name.partition("-")
    stamp, _, rest = rest.partition("-")
    return rest if head.isdigit() and stamp.isdigit() and rest else name


def row_of(run: RunInfo, active_s: float | None = None) -> tuple[str, ...]:
    """One list row; `active_s` is the run's training time (its steps' times, pauses not counted)."""
    step = f"{run.step}/{run.steps}" if run.steps else str(run.step)
    started = run.started.strftime("%m-%d %H:%M") if run.started else ""
    last = run.last.replace("reward ", "rew ")
    return (short_name(run.name)[:18], run.method, run.status, step, last, started, duration(active_s))


def pipeline_row(p: PipelineInfo) -> tuple[str, ...]:
    """A pipeline's list row: its stage in progress (k/n and method) in the step and last columns."""
    n = len(p.stages)
    kind = str(p.stages[p.current].get("kind", "")) if n else ""
    started = datetime.strptime(p.path.name[:15], "%Y%m%d-%H%M%S").strftime("%m-%d %H:%M") if _stamped(p.path) else ""
    return (p.name[:18], "pipeline", p.status, f"stage {p.current + 1}/{n}", kind, started, duration(p.seconds))


def _stamped(path: Path) -> bool:
    try:
        datetime.strptime(path.name[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        return False
    return True


class RunsScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Open", show=False),
        # short footer labels, so `? Help` still fits at 80 columns; `?` shows the tooltips
        Binding("n", "new", "New", tooltip="New run"),
        Binding("r", "resume", "Resume"),
        Binding("d", "duplicate", "Clone", tooltip="Duplicate as a new run"),
        Binding("x,delete", "delete", "Delete", key_display="x"),
        Binding("c", "chat", "Chat"),
        Binding("p", "compare", "Compare"),
        Binding("e", "eval", "Eval"),
        Binding("t", "continue_run", "Continue with…", show=False),  # the detail line says so
        Binding("v", "serve", "Serve the run (OpenAI API)", show=False),  # the detail line shows the URL
        Binding("g", "refresh", "Refresh", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="runs-title")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="run-detail")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — runs"
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.runs: list[RunInfo] | None = None  # None: never listed yet
        self.pipelines: list[PipelineInfo] = []
        self.keys: list[str] = []  # row keys: run and pipeline folders, newest first
        self.rows: list[tuple[str, ...]] = []
        self.times = TrainingTime()
        self.server: subprocess.Popen | None = None  # `mlxpt serve` started with v
        self.server_text = ""
        self.action_refresh()
        if self.app.poll_runs:
            self.set_interval(REFRESH_S, self.action_refresh)

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        table = self.query_one(DataTable)
        runs = list_runs(self.app.runs_dir)
        pipelines = list_pipelines(self.app.runs_dir)
        items: list[RunInfo | PipelineInfo] = sorted([*runs, *pipelines], key=lambda x: x.path.name, reverse=True)
        rows = [
            pipeline_row(x) if isinstance(x, PipelineInfo) else row_of(x, self.times.seconds(x.path)) for x in items
        ]
        keys = [str(x.path) for x in items]
        if self.runs is not None and rows == self.rows and keys == self.keys:
            return
        if self.runs is not None and keys == self.keys:
            # the same folders in the same order: change the cells in place (the cursor stays put)
            for key, old, row in zip(keys, self.rows, rows, strict=True):
                for column, a, b in zip(COLUMNS, old, row, strict=True):
                    if a != b:
                        table.update_cell(key, column, b, update_width=True)
        else:
            # folders came or went: rebuild, and put the cursor back on its row (by folder, not position)
            selected = self.selected_key()
            table.clear()
            for key, row in zip(keys, rows, strict=True):
                table.add_row(*row, key=key)
            if selected is not None and selected in keys:
                table.move_cursor(row=keys.index(selected))
        self.runs, self.pipelines, self.rows, self.keys = runs, pipelines, rows, keys
        n = len(runs)
        what = f"{n} run{'s' if n != 1 else ''}"
        if pipelines:
            what += f", {len(pipelines)} pipeline{'s' if len(pipelines) != 1 else ''}"
        self.query_one("#runs-title", Static).update(
            f"{what} in {self.app.runs_dir}  ·  n new run  ·  enter open  ·  ? keys"
            if keys
            else f"No runs in {self.app.runs_dir} yet. Press n to start one, c to chat, ? for keys."
        )
        self._show_detail()

    def selected_key(self) -> str | None:
        """The folder (row key) under the cursor: a run's or a pipeline's."""
        table = self.query_one(DataTable)
        if not table.row_count or table.cursor_row is None:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - no valid cursor cell: nothing selected
            return None

    def selected_pipeline(self) -> PipelineInfo | None:
        key = self.selected_key()
        return next((p for p in self.pipelines if str(p.path) == key), None)

    def selected(self) -> RunInfo | None:
        """The run under the cursor, found by the row's key (its folder), never by position."""
        key = self.selected_key()
        return next((r for r in self.runs or [] if str(r.path) == key), None)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def _show_detail(self) -> None:
        run = self.selected()
        text = ""
        pipe = self.selected_pipeline()
        if pipe is not None:
            done = sum(s.get("status") == "finished" for s in pipe.stages)
            text = f"{pipe.path.name} · {done}/{len(pipe.stages)} stages finished  ·  enter: its stages"
            if pipe.error:
                text += f"  ·  {pipe.error}"
        elif run is not None:
            text = f"{run.name} · {short_model(run.model)} · {run.checkpoints} checkpoint(s)"
            if run.error:
                text += f"  ·  {run.error}"
            elif run.resumable:
                text += "  ·  r resumes from the last checkpoint"
            elif run.status == "finished" and run.checkpoints:
                text += "  ·  t: continue with…"
        if self.server is not None and self.server.poll() is None:
            text += f"  ·  {self.server_text} (v stops it)"
        self.query_one("#run-detail", Static).update(text)

    def action_open(self) -> None:
        pipe = self.selected_pipeline()
        if pipe is not None:
            from app.screens.pipeline import PipelineScreen

            self.app.push_screen(PipelineScreen(pipe.path))
            return
        run = self.selected()
        if run is not None:
            from app.screens.monitor import MonitorScreen

            self.app.push_screen(MonitorScreen(self.app.log_for(run.path)))

    def action_new(self) -> None:
        from app.screens.new_run import NewRunScreen

        self.app.push_screen(NewRunScreen())

    def action_resume(self) -> None:
        run = self.selected()
        if run is None:
            return
        log = self.app.log_for(run.path)
        refusal = resume_refusal(run.name, run.status, log.live, run.checkpoints)
        if refusal is not None:
            self.notify(refusal, severity="warning")
            return
        from app.screens.monitor import MonitorScreen

        self.app.resume_run(log)
        self.app.push_screen(MonitorScreen(log))

    def action_duplicate(self) -> None:
        run = self.selected()
        if run is None:
            return
        from app.form import values_from_run_config
        from app.screens.new_run import NewRunScreen
        from mlxpt.errors import MlxptError
        from mlxpt.runs import read_config

        try:
            config = read_config(run.path)
        except MlxptError as e:
            self.notify(e.line(), severity="error")
            return
        self.app.push_screen(
            NewRunScreen(method=str(config.get("method", "sft")), values=values_from_run_config(config))
        )

    def action_delete(self) -> None:
        run = self.selected()
        if run is None:
            return
        if run.status == "running" or self.app.log_for(run.path).live:
            self.notify(f"{run.name} is running: stop it first", severity="warning")
            return
        from app.screens.confirm import ConfirmScreen

        def done(yes: bool | None) -> None:
            if yes:
                shutil.rmtree(run.path, ignore_errors=True)
                self.app.logs.pop(str(run.path), None)
                self.notify(f"deleted {run.name}")
                self.action_refresh()

        self.app.push_screen(ConfirmScreen(f"Delete run {run.name} and its checkpoints?"), done)

    def action_chat(self) -> None:
        from app.screens.chat import ChatScreen

        run = self.selected()
        self.app.push_screen(ChatScreen(adapter=str(run.path) if run and run.checkpoints else None))

    def action_compare(self) -> None:
        from app.screens.compare import CompareScreen

        run = self.selected()
        self.app.push_screen(CompareScreen(adapter=str(run.path) if run and run.checkpoints else None))

    def action_eval(self) -> None:
        from app.screens.eval import EvalScreen

        run = self.selected()
        self.app.push_screen(EvalScreen(adapter=str(run.path) if run and run.checkpoints else None))

    def action_continue_run(self) -> None:
        run = self.selected()
        if run is not None:
            self.app.continue_from(run.path)

    def action_serve(self) -> None:
        """Start `mlxpt serve` for the selected finished run as a child on a free loopback port (the
        URL goes to the detail line); pressed again, stop it. Leaving the TUI stops it too."""
        if self.server is not None and self.server.poll() is None:
            self.stop_server()
            self.notify("stopped the server")
            self._show_detail()
            return
        run = self.selected()
        if run is None or run.status != "finished":
            self.notify("select a finished run to serve its adapter", severity="warning")
            return
        import socket

        from mlxpt.fuse import base_model_of

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = (base_model_of(run.path) or {}).get("model") or "smollm2-135m"
        cmd = [sys.executable, "-m", "mlxpt.cli", "serve", "--port", str(port), "--runs-dir", str(self.app.runs_dir),
               "--model", str(base)]  # fmt: skip
        log = open(run.path / "serve.log", "ab")  # noqa: SIM115 - the child holds it; closed with our copy below
        try:
            self.server = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self.server_text = f"serving http://127.0.0.1:{port}/v1 as model {run.name!r}"
        self.notify(self.server_text + " (log: serve.log in the run)")
        self._show_detail()

    def stop_server(self) -> None:
        proc, self.server = self.server, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def on_unmount(self) -> None:
        self.stop_server()
