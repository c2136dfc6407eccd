"""The TUI as a user drives it (Pilot): runs list, a real tiny training run started from the form,
stop / interrupted / resume, a crashing child, bad data in the form, chat with the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import FAKE_CHILD, make_runs  # noqa: E402

from app.main import create_app  # noqa: E402
from app.screens.monitor import MonitorScreen  # noqa: E402
from app.screens.new_run import NewRunScreen  # noqa: E402
from app.screens.runs import RunsScreen  # noqa: E402

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


async def wait_for(pilot, cond, timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def run_child_until(pilot, log, cond, timeout: float = 120.0) -> int:
    """Let the app's paused child run only in short slices (SIGCONT, 20 ms, SIGSTOP) until
    `cond()`, and return its pid, paused. Tiny steps take milliseconds: left alone, the child can
    finish the whole run before a loaded machine's app has read its first step."""
    end = time.monotonic() + timeout
    pid = log.pid
    assert pid is not None, log.log[-5:]
    while not cond():
        if time.monotonic() > end:
            os.kill(pid, signal.SIGCONT)
            raise AssertionError(f"timed out running the child: {log.log[-5:]}")
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
        os.kill(pid, signal.SIGSTOP)
        await pilot.pause(0.05)  # the app reads what the child wrote
    return pid


def statuses(app) -> dict[str, str]:
    screen = app.screen_stack[1] if len(app.screen_stack) > 1 else app.screen
    assert isinstance(screen, RunsScreen)
    screen.action_refresh()
    return {r.name: r.status for r in screen.runs}


async def fill(pilot, screen: NewRunScreen, **values) -> None:
    for name, value in values.items():
        screen.query_one(f"#f-{name}").value = str(value)
    await pilot.pause(0.1)  # let the Changed messages arrive (they mark the form pending)
    want = {k: str(v) for k, v in values.items()}

    def settled() -> bool:
        current = {k: str(v) for k, v in screen.values().items() if k in want}
        return current == want and not screen.pending and not screen.checking

    await wait_for(pilot, settled, what="form validation")
    # not workers.wait_for_complete(): it raises for an exclusive worker that a newer one cancelled
    await wait_for(pilot, lambda: all(w.is_finished for w in pilot.app.workers), what="the form's workers")
    await pilot.pause()


async def test_runs_list_shows_every_status(tmp_path):
    app = create_app(make_runs(tmp_path / "runs"), poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        got = statuses(app)
        assert got == {
            "20261125-120000-quick": "finished",
            "20261125-110000-grpo": "failed",
            "20261125-100000-dpo": "interrupted",
            "20261125-090000-sft": "finished",
        }


async def test_dead_running_run_is_listed_as_crashed(tmp_path):
    root = make_runs(tmp_path / "runs")
    status = root / "20261125-100000-dpo" / "status.json"
    status.write_text(json.dumps({"status": "running", "step": 12, "pid": 2**22 + 12345}))
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert statuses(app)["20261125-100000-dpo"] == "crashed"


async def test_delete_asks_first(tmp_path):
    root = make_runs(tmp_path / "runs")
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("x")  # top row: 20261125-120000-quick
        await pilot.press("n")
        assert (root / "20261125-120000-quick").exists()
        await pilot.press("x", "y")
        await pilot.pause()
        assert not (root / "20261125-120000-quick").exists()
        assert "20261125-120000-quick" not in statuses(app)


async def test_bad_data_shows_line_error_and_start_stays_disabled(tmp_path, tiny_dir):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_text(good + "\n" + '{"messages": [{"role": "user"}]}\n' + "not json\n")
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, NewRunScreen)
        await fill(pilot, screen, model=tiny_dir, data=bad)
        check = str(screen.query_one("#check").render())
        assert f"{bad}:2" in check and f"{bad}:3" in check
        assert screen.query_one("#start").disabled
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert app.screen is screen and not app.logs  # nothing started


STOP_TEST_STEPS = 12


async def test_start_stop_resume_a_real_run(tmp_path, tiny_dir, data_dir, monkeypatch):
    real_spawn, spawned = asyncio.create_subprocess_exec, []

    async def spawn_paused(*argv, **kw):  # the first child starts paused: run_child_until runs it
        proc = await real_spawn(*argv, **kw)
        if not spawned:
            os.kill(proc.pid, signal.SIGSTOP)
        spawned.append(proc.pid)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn_paused)
    runs = tmp_path / "runs"
    app = create_app(runs, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await pilot.pause()
        form = app.screen
        await fill(
            pilot, form, model=tiny_dir, data=data_dir, steps=STOP_TEST_STEPS, batch_size=1, max_seq_len=256,
            eval_every=0, eval_batches=0, save_every=1000, num_layers=-1, name="pilot",
        )  # fmt: skip
        assert "data OK" in str(form.query_one("#check").render())
        assert "memory estimate" in str(form.query_one("#memory").render())
        assert not form.query_one("#start").disabled
        await pilot.press("ctrl+g")
        monitor = app.screen
        assert isinstance(monitor, MonitorScreen)
        log = monitor.log_
        pid = await run_child_until(pilot, log, lambda: bool(log.steps))
        try:  # the child stays paused while the key is handled (its SIGINT waits for the SIGCONT)
            await pilot.press("s")
            await wait_for(pilot, lambda: any("stop requested" in line for line in log.log), what="the stop")
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(pilot, lambda: not log.live, what="the child to exit")
        assert log.status == "interrupted", log.log[-5:]
        assert log.last_step < STOP_TEST_STEPS
        await pilot.pause(1.2)  # the monitor's file poll runs: it must not add the steps twice
        assert [s["step"] for s in log.steps] == list(range(1, log.last_step + 1))
        assert "interrupted" in str(monitor.query_one("#mon-reason").render())
        assert not monitor.query_one("#resume").disabled
        await pilot.press("escape")
        (name,) = statuses(app)
        assert statuses(app)[name] == "interrupted"
        await pilot.press("r")  # resume from the list
        assert isinstance(app.screen, MonitorScreen) and app.screen.log_ is log
        await wait_for(pilot, lambda: not log.live, timeout=120, what="the resumed run to finish")
        assert log.status == "finished", log.log[-5:]
        assert [s["step"] for s in log.steps] == list(range(1, STOP_TEST_STEPS + 1))  # each once, in order
        await pilot.press("escape")
        assert statuses(app)[name] == "finished"


async def test_crashing_child_leaves_app_alive_with_reason(tmp_path):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    run_dir = tmp_path / "runs" / "20261125-130000-crash"
    app = create_app(tmp_path / "runs", poll_runs=False, train_command=[sys.executable, str(script)])
    async with app.run_test(size=SIZE) as pilot:
        log = app.start_run(["--run-dir", str(run_dir)])
        app.push_screen(MonitorScreen(log))
        await wait_for(pilot, lambda: log.exit_reason is not None, what="the crash")
        await pilot.pause(0.5)
        assert log.status == "crashed" and [s["step"] for s in log.steps] == [1, 2, 3]
        reason = str(app.screen.query_one("#mon-reason").render())
        assert "SIGABRT" in reason
        assert app.screen.query_one("#resume").disabled  # it died before its first checkpoint: nothing to resume
        await pilot.press("2")  # the app still answers keys
        await pilot.pause()
        assert "simulated native crash" in "\n".join(log.log)


async def test_flood_of_events_collapses(tmp_path):
    from app.messages import RunUpdated

    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        seen = []
        app.screen.run_updated = seen.append
        for _ in range(500):
            app.post_message(RunUpdated("k"))
        await pilot.pause()
        assert 1 <= len(seen) < 50


@pytest.mark.parametrize("strategy", ["greedy", "self-consistency", "best-of-n"])
async def test_chat_answers_with_tiny_model(tmp_path, tiny_dir, strategy):
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        await pilot.pause()
        screen = app.screen
        screen.max_tokens = 12
        screen.query_one("#pick-model").value = str(tiny_dir)
        screen.query_one("#pick-strategy").value = strategy
        screen.query_one("#pick-n").value = "3"
        screen.query_one("#chat-input").focus()
        await pilot.press(*"hello", "enter")
        await wait_for(pilot, lambda: len(screen.history) == 2, what="the answer")
        await pilot.pause()
        assert screen.history[1]["role"] == "assistant"
        stats = str(screen.query_one("#chat-stats").render())
        assert "tok/s" in stats and stats.startswith(strategy)
        if strategy == "self-consistency":
            assert "votes:" in stats and "n=3" in stats
        if strategy == "best-of-n":
            assert "scores:" in stats
        await pilot.press("ctrl+l")
        assert screen.history == []


async def test_method_switch_rebuilds_form_and_preview(tmp_path, tiny_dir):
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("n")
        await pilot.pause()
        screen = app.screen
        await fill(pilot, screen, model=tiny_dir, rank=4)
        shapes = {"dpo": "at batch 8 x", "grpo": "at 2 prompts x 8 completions of up to 128 tokens"}  # as the runner
        for method, fieldname, summary in (("dpo", "beta", "preference pairs"), ("grpo", "num_generations", "prompts")):
            screen.query_one("#method").value = method
            await wait_for(pilot, lambda m=method: (screen._last_data or ("",))[0] == m, what="the new method's check")
            await fill(pilot, screen)
            assert screen.query(f"#f-{fieldname}"), method  # the method's own section is in the form
            assert summary in str(screen.query_one("#check").render()), method
            assert shapes[method] in str(screen.query_one("#memory").render()), method
            assert screen.values()["rank"] == "4"  # what the user typed survives the switch
            assert not screen.query_one("#start").disabled


async def test_duplicate_opens_the_form_with_the_runs_settings(tmp_path, tiny_dir, data_dir):
    root = make_runs(tmp_path / "runs")
    cfg_path = root / "20261125-120000-quick" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["model"] = str(tiny_dir)
    cfg["data"]["data"] = str(data_dir)
    cfg["adapter"] = {"rank": 4}
    cfg_path.write_text(json.dumps(cfg))
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("d")  # the top row is the "quick" run
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, NewRunScreen)
        await fill(pilot, screen)
        values = screen.values()
        assert values["model"] == str(tiny_dir) and values["steps"] == "10" and values["rank"] == "4"
        assert values["runs_dir"] == str(root)
        assert not screen.query_one("#start").disabled


async def test_monitor_follows_a_run_started_from_the_cli(tmp_path):
    import os

    from mlxpt.runs.guards import RunLock

    root = make_runs(tmp_path / "runs")
    run = root / "20261125-100000-dpo"
    (run / "status.json").write_text(json.dumps({"status": "running", "step": 12, "pid": os.getpid()}))
    lock = RunLock(run).acquire()  # a live writer holds the run's lock
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("down", "down", "enter")
        monitor = app.screen
        assert isinstance(monitor, MonitorScreen) and monitor.log_.last_step == 12
        assert not monitor.query_one("#stop").disabled  # a live CLI run can be stopped from here
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "step", "step": 13, "loss": 0.5, "lr": 1e-4}) + "\n")
        await wait_for(pilot, lambda: monitor.log_.last_step == 13, timeout=5, what="the appended step")
        (run / "status.json").write_text(json.dumps({"status": "interrupted", "step": 13, "pid": os.getpid()}))
        await wait_for(pilot, lambda: monitor.log_.status == "interrupted", timeout=5, what="the new status")
    lock.release()


@pytest.mark.parametrize(
    "method,size",
    # simpo and orpo have dpo's form (the same settings, other defaults)
    [*((m, (80, 24)) for m in ("sft", "dpo", "rm", "grpo")), ("grpo", (120, 35))],
)
async def test_every_form_field_can_be_reached_and_seen(tmp_path, method, size):
    """Tabbing through the New run form scrolls it: every field of every method is on screen while
    it has focus (the form used to end at `dropout` at 80x24), only that method's settings are in
    it, no label runs into its value, and the command line under the form follows the edits."""
    from app import form as form_mod

    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=size) as pilot:
        await pilot.press("n")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#method").value = method
        await pilot.pause()
        form = screen.query_one("#form")
        fields = [w for w in screen.query("#fields Input, #fields Switch, #fields Select")]
        assert {w.id[2:] for w in fields} == {f.name for f in form_mod.form_fields(method)}
        fields = [w for w in fields if w.parent.display]  # those the fine-tune type reads (issue 24)
        assert "f-rank" in {w.id for w in fields} and "f-prefix_length" not in {w.id for w in fields}
        assert ("f-num_generations" in {w.id for w in fields}) == (method == "grpo")
        for w in fields:  # a space between every label and its value
            label = w.parent.query_one(".field-name")
            assert label.region.right < w.region.x or label.region.right == w.region.x and label.styles.padding.right
        seen, scrolled = set(), 0
        for _ in range(len(fields) + 5):
            await pilot.press("tab")
            await pilot.pause()
            focused = app.focused
            if focused in fields:
                region = focused.region
                assert form.region.contains(region.x, region.y), (focused.id, region, form.region)
                seen.add(focused.id)
                scrolled = max(scrolled, form.scroll_offset.y)
        assert seen == {w.id for w in fields}
        assert scrolled > 0  # it did scroll
        steps = screen.query_one("#f-steps")
        steps.value = "37"
        await wait_for(pilot, lambda: "--steps 37" in str(screen.query_one("#cli-line").render()), timeout=5,
                       what="the command line")  # fmt: skip
        assert str(screen.query_one("#cli-line").render()).startswith(f"$ mlxpt train {method}")
