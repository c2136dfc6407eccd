"""The New run form agrees with `mlxpt train`: a switch turned off reaches the run (--no-packing),
a value starting with '-' survives argparse, what the runner refuses before reading anything is
refused beside Start, a blank field says it means the default, and a duplicated run's data does
not follow a switch of method. Also: `r` needs a checkpoint in the monitor as in the Runs list,
and the Runs keys, the Chat strategies and `? Help` at 80 columns are where users look for them."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_run, make_runs  # noqa: E402
from test_tui_runs import fill, wait_for  # noqa: E402

from app import engine, form  # noqa: E402
from app.main import create_app  # noqa: E402
from app.runlog import resume_refusal  # noqa: E402
from app.screens.monitor import MonitorScreen  # noqa: E402
from app.screens.new_run import NewRunScreen  # noqa: E402
from app.screens.runs import RunsScreen  # noqa: E402
from mlxpt.commands import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SIZE = (80, 24)
pytestmark = pytest.mark.anyio


def cli_config(argv: list[str]):
    """The config `mlxpt train` builds from the form's argv (argparse included)."""
    parser = argparse.ArgumentParser(prog="mlxpt")
    train.register(parser.add_subparsers(dest="command"))
    return train.config_from_args(parser.parse_args(argv))[1]


# ---- the argv: switches turned off, values that look like options ---------------------------------


def test_a_switch_turned_off_reaches_the_run():
    argv = form.to_argv("sft", {"packing": False, "steps": "5"})
    assert argv == ["train", "sft", "--no-packing", "--steps", "5", "--events", "json"]
    assert cli_config(argv).data.packing is False
    argv = form.to_argv("distill", {"teacher": "t", "mode": "sequence", "teacher_greedy": False})
    assert "--no-teacher-greedy" in argv and cli_config(argv).distill.teacher_greedy is False
    # Duplicate of a --no-packing run: the form's values from its config.json start it with packing off
    values = form.values_from_run_config({"method": "sft", "data": {"packing": False}, "train": {"steps": 5}})
    assert "--no-packing" in form.to_argv("sft", values)


def test_a_value_starting_with_a_dash_is_not_taken_for_an_option():
    values = {"rank": "4", "num_layers": "-1", "targets": "-q", "regression_data": "--none"}
    argv = form.to_argv("sft", values)
    assert argv[2:-2] == ["--rank", "4", "--num-layers=-1", "--targets=-q", "--regression-data=--none"]
    cfg = cli_config(argv)
    assert (cfg.adapter.targets, cfg.train.regression_data, cfg.adapter.num_layers) == ("-q", "--none", -1)


async def test_the_copied_command_runs_as_shown(tmp_path):
    app = create_app(tmp_path / "runs", poll_runs=False)
    copied: list[str] = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#f-packing").value = "false"
        await fill(pilot, screen, targets="-q", data="my data")
        await pilot.press("ctrl+y")
        assert copied == [screen.command_line()]
        words = shlex.split(copied[0])
        assert words[0] == "mlxpt" and "--no-packing" in words and "--targets=-q" in words
        assert words[words.index("--data") + 1] == "my data"  # one word for the shell
        cfg = cli_config(words[1:])
        assert (cfg.data.packing, cfg.adapter.targets, cfg.data.data) == (False, "-q", "my data")


# ---- the runner's refusals before reading, beside Start -----------------------------------------------


def test_validate_refuses_what_the_runner_refuses_before_reading():
    cfg, err = form.validate("distill", {})
    assert cfg is None and err.startswith("E740")  # no teacher: the child would die with it
    assert form.validate("distill", {"teacher": "some-model"})[1] is None
    assert form.validate("sft", {"name": "-x"})[1].startswith("E303")  # an invalid run name
    assert form.validate("rft", {"backend": "numpy"})[1].startswith("E587")  # the method's own check


async def test_distill_without_a_teacher_is_refused_in_the_form(tmp_path, tiny_dir, data_dir):
    app = create_app(tmp_path / "runs", poll_runs=False)
    started: list = []
    app.start_run = lambda argv, log=None: started.append(argv)
    async with app.run_test(size=SIZE) as pilot:
        screen = NewRunScreen("sft", {"model": str(tiny_dir), "data": str(data_dir)})
        await app.push_screen(screen)
        await pilot.pause()
        screen.query_one("#method").value = "distill"
        await wait_for(pilot, lambda: screen.query("#f-teacher"), timeout=5, what="the distill form")
        await fill(pilot, screen)
        assert str(screen.query_one("#form-error").render()).startswith("E740")
        assert screen.query_one("#start").disabled
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert app.screen is screen and not started  # the form and what was typed stay
        await fill(pilot, screen, teacher=tiny_dir)
        assert screen.error is None and str(screen.query_one("#form-error").render()) == ""


# ---- a blank field ------------------------------------------------------------------------------------


async def test_a_blank_number_field_shows_the_default_it_means(tmp_path):
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await pilot.pause()
        screen = app.screen
        steps = screen.query_one("#f-steps")
        default = next(f.default for f in form.form_fields("sft") if f.name == "steps")
        await fill(pilot, screen, steps="")
        assert steps.placeholder == f"blank: {default}"
        assert "--steps" not in str(screen.query_one("#cli-line").render())
        steps.focus()
        await pilot.pause()
        assert str(screen.query_one("#field-help").render()).startswith(f"steps (blank: {default}):")
        assert screen.query_one("#f-valid").placeholder == ""  # no default: blank means none


# ---- a duplicated run, then another method --------------------------------------------------------------


async def test_a_duplicated_runs_data_does_not_follow_a_switch_of_method(tmp_path, tiny_dir, data_dir):
    root = make_runs(tmp_path / "runs")
    cfg_path = root / "20261125-120000-quick" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["model"], cfg["data"]["data"], cfg["adapter"] = str(tiny_dir), str(data_dir), {"rank": 8}
    cfg_path.write_text(json.dumps(cfg))
    dpo = {f.name: f.default for f in form.form_fields("dpo")}
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("d")  # the top row: the sft "quick" run
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, NewRunScreen) and screen.values()["data"] == str(data_dir)
        await fill(pilot, screen, rank=4)
        screen.query_one("#method").value = "dpo"
        await wait_for(pilot, lambda: screen.query("#f-beta"), timeout=5, what="the dpo form")
        await fill(pilot, screen)
        values = screen.values()
        assert values["data"] == dpo["data"]  # DPO's pairs, not the SFT run's rows (E180)
        assert (values["model"], values["steps"], values["rank"]) == (str(tiny_dir), "10", "4")  # shared, typed
        screen.query_one("#method").value = "sft"  # back to the run's own method: its data again
        await wait_for(pilot, lambda: screen.query("#f-packing"), timeout=5, what="the sft form")
        assert screen.values()["data"] == str(data_dir)
        await fill(pilot, screen, data=data_dir / "typed")
        screen.query_one("#method").value = "orpo"
        await wait_for(pilot, lambda: screen.query("#f-beta"), timeout=5, what="the orpo form")
        assert screen.values()["data"] == str(data_dir / "typed")  # what the user typed goes along


# ---- resume needs a checkpoint, in the monitor as in the Runs list --------------------------------------


async def test_the_monitor_offers_resume_only_with_a_checkpoint(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "20261125-090000-nock", "sft", "running", 10, 0, pid=2**22 + 1)  # dead: crashed, no checkpoint
    make_run(root, "20261125-100000-ck", "sft", "running", 10, 3, pid=2**22 + 2)  # crashed at a checkpoint
    app = create_app(root, poll_runs=False)
    resumed: list[str] = []
    app.resume_run = lambda log: resumed.append(log.run_dir.name)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        runs = {r.name: r for r in app.screen.runs}
        assert runs["20261125-090000-nock"].status == runs["20261125-100000-ck"].status == "crashed"
        await pilot.press("down", "enter")  # the run without a checkpoint
        await pilot.pause()
        monitor = app.screen
        assert isinstance(monitor, MonitorScreen) and monitor.log_.run_dir.name == "20261125-090000-nock"
        assert monitor.query_one("#resume").disabled and not monitor.check_action("resume", ())
        await pilot.press("r")
        await pilot.pause()
        assert resumed == [] and "no checkpoint" in monitor.refusal
        await pilot.press("escape", "up", "enter")  # the run with one
        await pilot.pause()
        assert not app.screen.query_one("#resume").disabled and app.screen.check_action("resume", ())
        await pilot.press("r")
        assert resumed == ["20261125-100000-ck"]
    assert resume_refusal("x", "failed", False, 0) == "x has no checkpoint to resume from; duplicate it (d) instead"
    assert resume_refusal("x", "interrupted", True, 2) == "x is already running"
    assert resume_refusal("x", "crashed", False, 1) is None


# ---- keys where users look for them ------------------------------------------------------------------


def test_the_docs_list_every_runs_key_and_chat_strategy():
    docs = (ROOT / "docs" / "tui.md").read_text(encoding="utf-8")
    runs_row = next(line for line in docs.splitlines() if line.startswith("| Runs |"))
    for binding in RunsScreen.BINDINGS:
        key = binding.key_display or binding.key.split(",")[0]
        assert f"`{key}`" in runs_row, key
    chat_row = next(line for line in docs.splitlines() if line.startswith("| Chat |"))
    for name in engine.strategies():
        assert name in chat_row, name


async def test_the_runs_footer_shows_help_at_80_columns(tmp_path):
    from textual.widgets import Footer

    app = create_app(make_runs(tmp_path / "runs"), poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        keys = {item.key_display: item.region for item in app.screen.query_one(Footer).children}
        assert "?" in keys and keys["?"].right <= SIZE[0], keys
        assert {"n", "r", "d", "x", "c", "p", "e", "^q"} <= set(keys)
