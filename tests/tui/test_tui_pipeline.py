"""Pipeline folders in the TUI (Pilot): the Runs list's pipeline row, the Pipeline screen's stages,
a stage opening its run's monitor, and the screen following pipeline.json to the report."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_pipeline, make_runs, write_pipeline  # noqa: E402

from app.main import create_app  # noqa: E402
from app.screens.monitor import MonitorScreen  # noqa: E402
from app.screens.pipeline import PipelineScreen  # noqa: E402
from app.screens.runs import RunsScreen  # noqa: E402
from mlxpt.runs.guards import RunLock  # noqa: E402

SIZE = (80, 24)
pytestmark = pytest.mark.anyio

SFT = "20261125-130100-demo-1-sft"
DPO = "20261125-130500-demo-2-dpo"


async def wait_for(pilot, cond, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def cells(screen, table_id: str) -> list[list[str]]:
    table = screen.query_one(table_id)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def shown(widget) -> str:
    """The text a Static shows, its Rich renderables (a table) drawn at the screen's width."""
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(widget.content)
    return console.file.getvalue()


def select_row(screen, key: str) -> None:
    table = screen.query_one("#runs-table")
    table.move_cursor(row=screen.keys.index(key))


async def test_pipeline_row_opens_stages_and_a_stage_opens_its_monitor(tmp_path):
    runs = make_runs(tmp_path / "runs")
    folder = make_pipeline(runs, status="interrupted")
    app = create_app(runs, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        row = cells(screen, "#runs-table")[screen.keys.index(str(folder))]
        assert row[:5] == ["demo", "pipeline", "interrupted", "stage 2/3", "dpo"]
        assert "1 pipeline" in shown(screen.query_one("#runs-title"))
        select_row(screen, str(folder))
        await pilot.pause()
        assert "1/3 stages finished" in shown(screen.query_one("#run-detail"))

        await pilot.press("enter")
        await pilot.pause()
        pipe = app.screen
        assert isinstance(pipe, PipelineScreen)
        stages = cells(pipe, "#pipe-stages")
        assert [r[:3] for r in stages] == [
            ["1", "sft", "finished"],
            ["2", "dpo", "interrupted"],
            ["3", "eval", "pending"],
        ]
        assert stages[0][3:5] == ["20/20", SFT] and stages[1][3:5] == ["12/30", DPO]
        assert "stage 2/3 dpo" in shown(pipe.query_one("#pipe-status"))

        await pilot.press("down", "enter")  # stage 2: its run's monitor
        await pilot.pause()
        assert isinstance(app.screen, MonitorScreen)
        assert app.screen.log_.run_dir.name == DPO
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is pipe

        await pilot.press("down", "enter")  # the eval stage has no run: a warning, no screen
        await pilot.pause()
        assert app.screen is pipe
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)


async def test_pipeline_screen_follows_pipeline_json_to_the_report(tmp_path):
    runs = tmp_path / "runs"
    folder = make_pipeline(runs, status="running")
    lock = RunLock(folder).acquire()  # a live `mlxpt pipeline` holds its folder's lock
    try:
        app = create_app(runs, poll_runs=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            app.push_screen(PipelineScreen(folder))
            await pilot.pause()
            pipe = app.screen
            assert cells(pipe, "#pipe-stages")[1][2] == "running"
            assert "report.md) is written when every stage has finished" in shown(pipe.query_one("#pipe-report"))

            write_pipeline(folder, "finished", [("sft", "finished", SFT), ("dpo", "finished", DPO),
                                                ("eval", "finished", None)], report=True)  # fmt: skip
            await wait_for(pilot, lambda: cells(pipe, "#pipe-stages")[1][2] == "finished", what="the refresh")
            await pilot.pause()
            text = shown(pipe.query_one("#pipe-report"))
            assert str(folder / "report" / "report.md") in text.replace("\n", "")
            assert "eval stage 3" in text and "gsm/test" in text and "45.0 % (9/20)" in text
            assert "finished" in shown(pipe.query_one("#pipe-status"))
    finally:
        lock.release()


async def test_a_running_pipeline_without_its_process_reads_crashed(tmp_path):
    runs = tmp_path / "runs"
    folder = make_pipeline(runs, status="running")  # nobody holds the lock: the process is gone
    app = create_app(runs, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        row = cells(app.screen, "#runs-table")[app.screen.keys.index(str(folder))]
        assert row[2] == "crashed"
