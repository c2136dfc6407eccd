"""Snapshots of every screen at 80x24 and 120x40 (pytest-textual-snapshot). Fixed data only:
run folders with a fixed clock, relative paths, a fixed "available memory"."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_pipeline, make_runs, write_pipeline  # noqa: E402

from app.main import create_app  # noqa: E402

SIZES = [(80, 24), (120, 40)]
EVAL = {
    "results": [
        {
            "label": "base",
            "strategy": s,
            "n": n,
            "accuracy": a,
            "generated_tokens": 100 * n,
            "seconds": 1.5 * n,
            "total": 10,
        }
        for s, pts in (
            ("best-of-n", [(1, 0.2), (4, 0.3), (8, 0.34)]),
            ("self-consistency", [(1, 0.2), (4, 0.38), (8, 0.45)]),
        )
        for n, a in pts
    ]
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_dir, data_dir):
    """A folder with runs/, a tiny model, data and an eval file, as the cwd (paths stay relative)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mlxpt.models.memory.available_bytes", lambda: 16 * 10**9)
    make_runs(tmp_path / "runs")
    shutil.copytree(tiny_dir, tmp_path / "tiny")
    shutil.copytree(data_dir, tmp_path / "data")
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    return tmp_path


def snap(snap_compare, size, keys=(), before=None):
    async def run_before(pilot):
        await pilot.pause()
        for k in keys:
            await pilot.press(k)
            await pilot.pause()
        if before is not None:
            await before(pilot)
        await pilot.app.workers.wait_for_complete()
        for field in pilot.app.screen.query("Input"):
            field.cursor_blink = False  # a blinking cursor would make the picture depend on timing
        await pilot.pause(0.3)

    return snap_compare(create_app("runs", poll_runs=False), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_runs_screen(snap_compare, workdir, size):
    assert snap(snap_compare, size)


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare, workdir, size):
    assert snap(snap_compare, size, keys=["question_mark"])


@pytest.mark.parametrize("size", SIZES)
def test_monitor_screen_grpo(snap_compare, workdir, size):
    assert snap(snap_compare, size, keys=["down", "enter"])


@pytest.mark.parametrize("size", SIZES)
def test_monitor_screen_dpo(snap_compare, workdir, size):
    assert snap(snap_compare, size, keys=["down", "down", "enter"])


@pytest.mark.parametrize("size", SIZES)
def test_pipeline_screen(snap_compare, workdir, size):
    """A finished pipeline: its stages, the report's path and the final accuracy table."""
    folder = make_pipeline(Path("runs"), status="finished")
    stages = [("sft", "finished", "20261125-130100-demo-1-sft"), ("dpo", "finished", "20261125-130500-demo-2-dpo")]
    write_pipeline(folder, "finished", [*stages, ("eval", "finished", None)], report=True)
    assert snap(snap_compare, size, keys=["down", "down", "enter"])


@pytest.mark.parametrize("size", SIZES)
def test_new_run_screen(snap_compare, workdir, size):
    async def fill(pilot):
        screen = pilot.app.screen
        screen.query_one("#f-model").value = "tiny"
        screen.query_one("#f-data").value = "data"
        screen.query_one("#f-max_seq_len").value = "256"
        for _ in range(100):
            await pilot.pause(0.05)
            if (
                not screen.pending
                and not screen.checking
                and "estimating" not in str(screen.query_one("#memory").render())
            ):
                await pilot.app.workers.wait_for_complete()
                if "estimating" not in str(screen.query_one("#memory").render()):
                    break

    assert snap(snap_compare, size, keys=["n"], before=fill)


@pytest.mark.parametrize("size", SIZES)
def test_chat_screen(snap_compare, workdir, size):
    assert snap(snap_compare, size, keys=["c"])


@pytest.mark.parametrize("size", SIZES)
def test_compare_screen(snap_compare, workdir, size):
    assert snap(snap_compare, size, keys=["p"])


@pytest.mark.parametrize("size", SIZES)
def test_eval_screen(snap_compare, workdir, size):
    async def load(pilot):
        pilot.app.screen.query_one("#eval-path").focus()  # the results file field; enter loads it
        await pilot.press(*"eval.json", "enter")

    assert snap(snap_compare, size, keys=["e"], before=load)
