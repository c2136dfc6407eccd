"""Pipeline: the stages of one `mlxpt pipeline` folder with their method, status and run folder,
read from its pipeline.json as it changes; enter on a stage opens its run's monitor. When the
report is written, its path and the last eval stage's accuracy table show below the stages."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.active_time import duration
from app.pipelines import PipelineInfo, final_accuracy, read_pipeline, read_summary
from mlxpt.runs.listing import run_info

REFRESH_S = 2.0  # as the Runs list polls
COLUMNS = ("stage", "method", "status", "step", "run", "time")


def stage_row(info: PipelineInfo, rec: dict) -> tuple[str, ...]:
    run = rec.get("run")
    step = ""
    if run and rec.get("kind") != "eval":
        r = run_info(info.path.parent / str(run))
        step = f"{r.step}/{r.steps}" if r.steps else str(r.step)
    secs = rec.get("seconds")
    return (
        str(rec.get("stage", "?")),
        str(rec.get("kind", "?")),
        info.stage_status(rec),
        step,
        str(run or ("–" if rec.get("kind") == "eval" else "")),
        duration(secs) if isinstance(secs, (int, float)) else "",
    )


def accuracy_renderable(summary: dict) -> Table | None:
    acc = final_accuracy(summary)
    if acc is None:
        return None
    stage, header, rows = acc
    table = Table(title=f"greedy accuracy (eval stage {stage})", title_justify="left", box=None, padding=(0, 2, 0, 0))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


class PipelineScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Runs"),
        # priority: over the table's own enter, so the footer shows it
        Binding("enter", "open", "Open stage's run", priority=True),
        Binding("g", "refresh", "Refresh", show=False),
    ]

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.info: PipelineInfo | None = None
        self.rows: list[tuple[str, ...]] = []
        self._report_state: tuple = ()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="pipe-status")
        yield DataTable(id="pipe-stages", cursor_type="row", zebra_stripes=True)
        yield Static("", id="pipe-detail")
        yield Static("", id="pipe-report")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — pipeline"
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.action_refresh()
        if self.app.poll_runs:
            self.set_interval(REFRESH_S, self.action_refresh)

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        info = read_pipeline(self.folder)
        if info is None:
            self.query_one("#pipe-status", Static).update(f"{self.folder.name}: no readable pipeline.json")
            return
        self.info = info
        table = self.query_one(DataTable)
        rows = [stage_row(info, rec) for rec in info.stages]
        if len(rows) != len(self.rows):
            table.clear()
            for i, row in enumerate(rows):
                table.add_row(*row, key=str(i))
        else:
            for i, (old, row) in enumerate(zip(self.rows, rows, strict=True)):
                for column, a, b in zip(COLUMNS, old, row, strict=True):
                    if a != b:
                        table.update_cell(str(i), column, b, update_width=True)
        self.rows = rows
        n = len(info.stages)
        cur = info.stages[info.current] if n else {}
        head = [f"[b]{info.name}[/b]", f"[b]{info.status}[/b]", f"stage {info.current + 1}/{n} {cur.get('kind', '')}"]
        self.query_one("#pipe-status", Static).update("  ·  ".join(head) + f"  ·  {self.folder.name}")
        self._show_detail()
        self._show_report(info)

    def _show_report(self, info: PipelineInfo) -> None:
        report = info.report
        state = (report.is_file(), (report.parent / "summary.json").is_file(), info.error)
        if state == self._report_state:
            return
        self._report_state = state
        widget = self.query_one("#pipe-report", Static)
        parts: list = []
        if info.error:
            parts.append(f"[red]{info.error}[/red]")
        if report.is_file():
            parts.append(f"report: {report}")
            summary = read_summary(info)
            table = accuracy_renderable(summary) if summary else None
            if table is not None:
                parts.append(table)
        elif info.status != "finished":
            parts.append("the report (report/report.md) is written when every stage has finished")
        widget.update(Group(*parts))

    def selected(self) -> dict | None:
        table = self.query_one(DataTable)
        if self.info is None or not table.row_count or table.cursor_row is None:
            return None
        i = table.cursor_row
        return self.info.stages[i] if 0 <= i < len(self.info.stages) else None

    def _show_detail(self) -> None:
        rec = self.selected()
        text = ""
        if rec is not None:
            if rec.get("kind") == "eval":
                text = f"eval stage: its results go to eval-stage{rec.get('stage')}.json and the report"
            elif rec.get("run"):
                text = f"enter: monitor of {rec['run']}"
            else:
                text = "no run yet: the stage has not started"
        self.query_one("#pipe-detail", Static).update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        rec = self.selected()
        if rec is None or self.info is None:
            return
        run = rec.get("run")
        if not run or rec.get("kind") == "eval":
            self.notify(f"stage {rec.get('stage')} has no run to open", severity="warning")
            return
        path = self.info.path.parent / str(run)
        if not path.is_dir():
            self.notify(f"stage {rec.get('stage')}'s run folder {run} is gone", severity="error")
            return
        from app.screens.monitor import MonitorScreen

        self.app.push_screen(MonitorScreen(self.app.log_for(path)))

    def action_back(self) -> None:
        self.app.pop_screen()
