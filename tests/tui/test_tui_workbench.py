"""Issue 27's TUI items as a user meets them (Pilot): the runs list's active time and a cursor that
follows its run, system prompts in Chat and Compare, an evaluation started from the Eval screen,
the monitor's key to the charts below the fold, and "continue with …" on a finished run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_run, make_runs  # noqa: E402

from app.active_time import TrainingTime  # noqa: E402
from app.main import create_app  # noqa: E402
from app.screens.continue_run import ContinueScreen  # noqa: E402
from app.screens.eval import EvalScreen  # noqa: E402
from app.screens.monitor import MonitorScreen  # noqa: E402
from app.screens.new_run import NewRunScreen  # noqa: E402
from app.screens.runs import RunsScreen  # noqa: E402

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


# ---- runs list: active time --------------------------------------------------------------------


def test_active_time_counts_steps_not_pauses(tmp_path):
    """4 min 45 s of steps around a day-long pause read 4m45s, not the wall clock; lines
    appended later are added, and a half-written last line waits."""
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    steps = [{"event": "step", "step": s, "step_time_s": 28.5, "time": 1e9 + 30 * s} for s in range(1, 6)]
    _append(metrics, [{"event": "eval", "step": 0, "val_loss": 2.0, "time": 1e9}, *steps])
    times = TrainingTime()
    assert times.seconds(run) == pytest.approx(142.5)
    later = [{"event": "step", "step": s, "step_time_s": 28.5, "time": 1e9 + 86400 + 30 * s} for s in range(6, 11)]
    _append(metrics, later)
    with open(metrics, "a") as f:
        f.write('{"event": "step", "step": 11, "step_ti')  # still being written
    assert times.seconds(run) == pytest.approx(285.0)  # 4 min 45 s; the day's pause is not there
    assert times.seconds(tmp_path / "missing") is None


async def test_runs_list_time_is_training_time(tmp_path):
    root = make_runs(tmp_path / "runs")  # steps are 2 s apart on the clock, 1.5 s of training each
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.screen.query_one("#runs-table")
        times = {row[0]: row[-1] for row in (table.get_row_at(i) for i in range(table.row_count))}
        assert times == {"quick": "0m15s", "grpo": "0m12s", "dpo": "0m18s", "sft": "0m30s"}


# ---- runs list: the cursor follows its run --------------------------------------------------------


async def test_cursor_follows_its_run_when_a_new_run_appears(tmp_path):
    root = make_runs(tmp_path / "runs")
    app = create_app(root, poll_runs=False)
    resumed = []
    app.resume_run = lambda log: resumed.append(log.run_dir.name)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("down", "down")  # the interrupted dpo run, third row
        screen = app.screen
        assert screen.selected().name == "20261125-100000-dpo"
        make_run(root, "20261125-130000-new", "sft", "running", 10, 1)  # newest: lands on top
        screen.action_refresh()
        await pilot.pause()
        assert [r.name for r in screen.runs][0] == "20261125-130000-new"
        assert screen.selected().name == "20261125-100000-dpo"
        assert screen.query_one("#runs-table").cursor_row == 3
        # a run's row changing (a step more) updates in place: the cursor stays on its run
        _append(root / "20261125-130000-new" / "metrics.jsonl", [{"event": "step", "step": 2, "step_time_s": 1.0}])
        screen.action_refresh()
        await pilot.pause()
        assert screen.selected().name == "20261125-100000-dpo"
        await pilot.press("r")
        await pilot.pause()
        assert resumed == ["20261125-100000-dpo"]


# ---- chat and compare: a system prompt --------------------------------------------------------------


@pytest.fixture
def fake_engine(monkeypatch):
    """The engine without a model: records each answer's messages and system prompt."""
    from app import engine

    calls = []

    def answer(model, tokenizer, messages, cfg, on_text=lambda s: None, cancelled=lambda: False, system=None):
        calls.append({"messages": messages, "system": system})
        on_text("ok")
        return engine.Answer("ok", cfg.strategy, 1, 0.1)

    monkeypatch.setattr(engine, "load_model", lambda model, adapter: (None, None))
    monkeypatch.setattr(engine, "answer", answer)
    return calls


async def test_chat_sends_the_system_prompt(tmp_path, fake_engine):
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        await pilot.pause()
        app.screen.query_one("#pick-system").value = "Answer in one word."
        app.screen.query_one("#chat-input").focus()
        await pilot.press(*"hi", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert fake_engine == [{"messages": [{"role": "user", "content": "hi"}], "system": "Answer in one word."}]
        app.screen.query_one("#pick-system").value = ""
        await pilot.press(*"and?", "enter")
        await app.workers.wait_for_complete()
        assert fake_engine[-1]["system"] is None  # blank: the model's own default


async def test_compare_sends_the_system_prompt_to_both_sides(tmp_path, fake_engine):
    root = make_runs(tmp_path / "runs")
    run = root / "20261125-120000-quick"
    (run / "adapters.safetensors").write_bytes(b"")
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=(120, 35)) as pilot:
        await pilot.press("p")  # compare, with the highlighted run's adapter
        await pilot.pause()
        app.screen.query_one("#pick-system").value = "Be brief."
        app.screen.query_one("#cmp-prompt").focus()
        await pilot.press(*"2+2?", "enter")
        await app.workers.wait_for_complete()
        assert [c["system"] for c in fake_engine] == ["Be brief.", "Be brief."]


# ---- eval: started from the screen --------------------------------------------------------------


@pytest.fixture
def fake_eval(monkeypatch):
    """`evaluate` without a model: every strategy right on half the prompts, progress per prompt."""
    from app import engine
    from mlxpt.decode import evaluate as ev

    loaded = []

    def evaluate(model, tokenizer, rows, cfg, progress=None, details=None):
        for i in range(len(rows)):
            progress(i + 1, len(rows))
        return [
            {"strategy": s, "n": n, "accuracy": 0.5, "generated_tokens": 10, "seconds": 0.1, "mean_samples": n}
            for s in cfg.strategies
            for n in ((1,) if s == "greedy" else cfg.ns)
        ]

    monkeypatch.setattr(engine, "load_model", lambda model, adapter: loaded.append(adapter) or (None, None))
    monkeypatch.setattr(ev, "evaluate", evaluate)
    return loaded


async def test_eval_screen_runs_an_evaluation(tmp_path, fake_eval):
    root = make_runs(tmp_path / "runs")
    run = root / "20261125-120000-quick"
    (run / "adapters.safetensors").write_bytes(b"")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(6)))
    out = tmp_path / "res.json"
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")  # with the highlighted run's adapter chosen
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EvalScreen)
        screen.query_one("#eval-data").value = str(data)
        screen.query_one("#eval-limit").value = "4"
        screen.query_one("#eval-n").value = "1,4"
        screen.query_one("#eval-path").value = str(out)
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert fake_eval == [None, str(run)]  # the base model, then the adapter
        note = str(screen.query_one("#eval-note").render())
        assert "4 prompts" in note and "saved" in note, note
        table = str(screen.query_one("#eval-table").render())
        assert "self-consistency" in table and "adapter" in table and "base" in table
        saved = json.loads(out.read_text())
        assert {r["label"] for r in saved["results"]} == {"base", "adapter"} and saved["prompts"] == 4
        assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / "res-tokens.png").read_bytes().startswith(b"\x89PNG")
        # the file it wrote loads back as `mlxpt eval`'s do
        screen.load(str(out))
        assert "strategies from" in str(screen.query_one("#eval-note").render())


async def test_eval_screen_refuses_bad_settings_before_loading(tmp_path, fake_eval):
    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")
        await pilot.pause()
        app.screen.query_one("#eval-strategies").value = "greedy,telepathy"
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert "E620" in str(app.screen.query_one("#eval-note").render())
        app.screen.query_one("#eval-strategies").value = "greedy"
        app.screen.query_one("#eval-data").value = str(tmp_path / "none.jsonl")
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "E623" in str(app.screen.query_one("#eval-note").render())
        assert fake_eval == []  # no model was loaded for either


@pytest.mark.parametrize(
    "name,code",
    [
        ("mine.json", "E611"),  # mine.png exists: the user's picture
        ("other.json", "E611"),  # other-tokens.png exists
        ("plot.png", "E657"),  # the chart would be the results file
        ("runs/20261125-120000-quick/res.json", "E617"),  # inside the adapter's run
    ],
)
async def test_eval_screen_never_overwrites_a_file(tmp_path, fake_eval, monkeypatch, name, code):
    """Saving writes NAME, NAME.png and NAME-tokens.png: a name is refused, before any model
    loads, when one of them exists, when two are one file, or when one lies in an input."""
    monkeypatch.chdir(tmp_path)
    root = make_runs(tmp_path / "runs")
    (root / "20261125-120000-quick" / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "mine.png").write_text("MY IMAGE")
    (tmp_path / "other-tokens.png").write_text("MY OTHER IMAGE")
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")  # with the top run's adapter chosen
        await pilot.pause()
        screen = app.screen
        screen.query_one("#eval-data").value = str(data)
        screen.query_one("#eval-path").value = name
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        note = screen.query_one("#eval-note")
        assert str(note.render()).startswith(code) and note.has_class("-bad"), str(note.render())
        assert fake_eval == [] and not screen.running  # refused before anything was evaluated
        screen.query_one("#eval-path").value = ""  # cleared: evaluated, nothing saved
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "1 prompts" in str(note.render()) and "saved" not in str(note.render())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ---- monitor: charts below the fold ------------------------------------------------------------


async def test_monitor_says_how_to_reach_the_charts_below(tmp_path):
    app = create_app(make_runs(tmp_path / "runs"), poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("down", "enter")  # the grpo run: nine charts, two on screen at 80x24
        await pilot.pause(0.5)
        screen = app.screen
        assert isinstance(screen, MonitorScreen)
        hint = screen.query_one("#charts-more")
        assert hint.display and "7 more charts below: PgDn" in str(hint.render())
        assert screen.check_action("scroll_charts", (1,))  # the footer shows `PgDn More`
        scroll = screen.query_one("#charts-scroll")
        await pilot.press("pagedown")
        await pilot.pause(0.2)
        assert scroll.scroll_y > 0 and "5 more charts below" in str(hint.render())
        for _ in range(4):
            await pilot.press("j")
        await pilot.pause(0.2)
        assert scroll.scroll_y == scroll.max_scroll_y and "back up" in str(hint.render())


# ---- continue with … ------------------------------------------------------------------------------


def _finished_run_with_adapter(root: Path, tiny_dir) -> Path:
    run = root / "20261125-120000-quick"
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["model"] = str(tiny_dir)
    cfg["adapter"] = {"rank": 4}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "adapters.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize("where", ["runs", "monitor"])
async def test_continue_opens_the_form_from_the_runs_adapter(tmp_path, tiny_dir, where):
    root = make_runs(tmp_path / "runs")
    run = _finished_run_with_adapter(root, tiny_dir)
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        if where == "monitor":
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen.check_action("continue_run", ())  # the footer shows `t Continue`
        await pilot.press("t")
        await pilot.pause()
        assert isinstance(app.screen, ContinueScreen)
        await pilot.press("enter")  # the suggestion after SFT: dpo
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, NewRunScreen) and screen.method == "dpo"
        values = screen.values()
        assert values["model"] == str(tiny_dir)
        if "from_run" in values:  # the setting arrived with chaining (mlxpt train --from)
            assert values["from_run"] == str(run)


async def test_continue_needs_a_saved_adapter(tmp_path):
    app = create_app(make_runs(tmp_path / "runs"), poll_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("t")  # the top run has a checkpoint but no adapters.safetensors
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)
