"""The New run form shows only the settings the chosen fine-tune type reads (issue 24): switching
the type hides and shows them, keeps what was typed in them, and the run started from the form
gets the shown values (a hidden one is left out of its command, even when it is not valid)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_tui_runs import fill, wait_for  # noqa: E402

from app import form  # noqa: E402
from app.main import create_app  # noqa: E402
from app.screens.monitor import MonitorScreen  # noqa: E402
from app.screens.new_run import NewRunScreen  # noqa: E402
from mlxpt.commands import train  # noqa: E402
from mlxpt.config import adapter_settings  # noqa: E402

pytestmark = pytest.mark.anyio
ADAPTER = ("fine_tune_type", "rank", "alpha", "dropout", "num_layers", "targets", "prefix_length")
ADAPTER += ("prefix_projection", "adapter_size", "from_run")


def shown(screen) -> set[str]:
    """The adapter settings whose rows are on the form."""
    return {n for n in ADAPTER if screen.query_one(f"#f-{n}").parent.display}


def cli_line(screen) -> str:
    return str(screen.query_one("#cli-line").render())


def test_hidden_fields_follow_the_type_and_stay_out_of_the_command():
    lora = ("rank", "alpha", "dropout", "targets")
    assert form.hidden_fields("sft", {}) == ("prefix_length", "prefix_projection", "adapter_size")  # lora
    assert form.hidden_fields("dpo", {"fine_tune_type": "prefix"}) == (*lora, "adapter_size")
    assert form.hidden_fields("grpo", {"fine_tune_type": "full"}) == (
        *lora,
        "prefix_length",
        "prefix_projection",
        "adapter_size",
    )
    values = {"fine_tune_type": "prefix", "rank": "16", "prefix_length": "8", "steps": "7"}
    argv = " ".join(form.to_argv("sft", values))
    assert argv == "train sft --fine-tune-type prefix --prefix-length 8 --steps 7 --events json"
    cfg, err = form.validate("sft", {**values, "rank": "zero"})  # a bad value in a hidden field does not block
    assert err is None and (cfg.adapter.rank, cfg.adapter.prefix_length) == (8, 8)
    cfg, err = form.validate("sft", {**values, "fine_tune_type": "lora", "rank": "zero"})  # shown: it does
    assert cfg is None and err.startswith("E502") and "rank" in err
    # continue with …: the form opens on the source adapter's type, so it shows that type's settings
    run = {"model": {"model": "m"}, "adapter": {"fine_tune_type": "prefix", "prefix_length": 4}}
    assert form.continue_values(run, "runs/x") == {"model": "m", "fine_tune_type": "prefix", "from_run": "runs/x"}
    assert "fine_tune_type" not in form.continue_values({"model": {"model": "m"}, "adapter": None}, "runs/x")


def test_rft_step_search_settings_show_only_under_a_search_strategy():
    from mlxpt.config.rft import SEARCH_SETTINGS

    lora = form.hidden_fields("sft", {})
    # strategy sample: nothing to search with; the hint only when rationalizing
    assert form.hidden_fields("rft", {}) == (*lora, *SEARCH_SETTINGS, "hint")
    assert form.hidden_fields("rft", {"rationalize": True}) == (*lora, *SEARCH_SETTINGS)
    assert form.hidden_fields("rft", {"strategy": "step-beam"}) == (*lora, "rationalize", "hint")
    # 30 steps: 3 rounds of 10, each closed by a checkpoint (`mlxpt train rft` refuses 6: E586/E588)
    values = {"strategy": "step-beam", "scorer": "logprob", "rationalize": True, "hint": "A: {answer}", "steps": "30"}
    assert form.validate("rft", values)[1] is None  # hidden: neither refused (E592) nor sent
    assert "--rationalize" not in form.to_argv("rft", values)
    argv = form.to_argv("rft", {**values, "strategy": "sample"})
    assert argv[argv.index("--rationalize") :][:3] == ["--rationalize", "--hint", "A: {answer}"]
    values = {"strategy": "sample", "expand": "0", "steps": "30"}  # a bad hidden value neither blocks nor travels
    assert " ".join(form.to_argv("rft", values)) == "train rft --steps 30 --events json"
    assert form.validate("rft", values)[1] is None
    cfg, err = form.validate("rft", {**values, "strategy": "tree", "scorer": "logprob", "expand": "2"})
    assert err is None and (cfg.rft.strategy, cfg.rft.expand) == ("tree", 2)
    argv = " ".join(form.to_argv("rft", {**values, "strategy": "tree", "scorer": "logprob", "expand": "2"}))
    assert argv == "train rft --strategy tree --expand 2 --steps 30 --scorer logprob --events json"


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_switching_the_type_shows_its_fields_and_keeps_what_was_typed(tmp_path, tiny_dir, data_dir, size):
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=size) as pilot:
        screen = NewRunScreen("sft", {"model": str(tiny_dir), "data": str(data_dir)})  # no default model loaded
        await app.push_screen(screen)
        await pilot.pause()
        assert shown(screen) == set(adapter_settings("lora")) and "rank" in shown(screen)
        await fill(pilot, screen, rank=16, alpha=32)
        kind = screen.query_one("#f-fine_tune_type")
        for t in ("prefix", "adapter", "full", "dora", "prefix"):
            kind.value = t
            await pilot.pause()
            assert shown(screen) == set(adapter_settings(t)), t
            hidden = {f"f-{n}" for n in ADAPTER if n not in shown(screen)}
            assert hidden and not hidden & {w.id for w in screen.focus_chain}, t  # tab skips them
        await fill(pilot, screen, prefix_length=8)
        line = cli_line(screen)
        assert "--fine-tune-type prefix --prefix-length 8" in line and "--rank" not in line, line
        assert (screen.cfg.adapter.prefix_length, screen.cfg.adapter.rank, screen.cfg.adapter.alpha) == (8, 8, 16.0)
        screen.query_one("#method").value = "dpo"  # the form rebuilt for another method keeps type and values
        await wait_for(pilot, lambda: screen.query("#f-beta"), timeout=5, what="the dpo form")
        await fill(pilot, screen)
        assert shown(screen) == set(adapter_settings("prefix")) and "--prefix-length 8" in cli_line(screen)
        kind = screen.query_one("#f-fine_tune_type")
        kind.value = "lora"
        await wait_for(pilot, lambda: "--prefix-length" not in cli_line(screen), timeout=5, what="the lora command")
        await fill(pilot, screen)
        assert "prefix_length" not in shown(screen) and {"rank", "alpha"} <= shown(screen)
        values = screen.values()
        assert (values["rank"], values["alpha"], values["prefix_length"]) == ("16", "32", "8")  # all kept
        assert "--rank 16 --alpha 32" in cli_line(screen) and screen.cfg.adapter.rank == 16


async def test_a_run_started_from_the_form_gets_the_shown_values(tmp_path, tiny_dir, data_dir, monkeypatch):
    """Start, then the child's own command line parsed as `mlxpt train` parses it: the prefix run's
    settings, the rank typed under lora (hidden, not valid) left out, nothing for the CLI to warn about."""
    app = create_app(tmp_path / "runs", poll_runs=False)
    started: list[list[str]] = []
    monkeypatch.setattr(app, "_supervise", lambda log, argv: started.append(argv))  # no child process
    async with app.run_test(size=(80, 24)) as pilot:
        screen = NewRunScreen("sft", {"model": str(tiny_dir), "data": str(data_dir)})
        await app.push_screen(screen)
        await pilot.pause()
        await fill(pilot, screen, rank="zero")
        assert screen.error.startswith("E502") and screen.query_one("#start").disabled
        screen.query_one("#f-fine_tune_type").value = "prefix"
        await fill(pilot, screen, prefix_length=4, prefix_projection=32, max_seq_len=64)
        await wait_for(pilot, lambda: not screen.query_one("#start").disabled, timeout=30, what="Start")
        assert screen.error is None
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert isinstance(app.screen, MonitorScreen) and len(started) == 1
    parser = argparse.ArgumentParser(prog="mlxpt")
    train.register(parser.add_subparsers(dest="command"))
    method, cfg = train.config_from_args(parser.parse_args(started[0][len(app.train_command) :]))
    a = cfg.adapter
    assert method == "sft" and (a.fine_tune_type, a.prefix_length, a.prefix_projection, a.rank) == ("prefix", 4, 32, 8)
    assert cfg.data.max_seq_len == 64 and train.ignored_settings_line(cfg) is None
