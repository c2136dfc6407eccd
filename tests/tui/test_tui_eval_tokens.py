"""The Eval screen's accuracy-vs-generated-tokens chart (Pilot): every strategy, `auto` included,
at its mean generated tokens per prompt; `auto` stays off the accuracy-vs-samples chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_runs  # noqa: E402

from app.main import create_app  # noqa: E402
from app.screens.eval import EvalScreen, tokens_view  # noqa: E402

pytestmark = pytest.mark.anyio


def _row(strategy, n, accuracy, tokens, total=10, **kw):
    return {"label": "base", "strategy": strategy, "n": n, "accuracy": accuracy, "generated_tokens": tokens,
            "total": total, "seconds": 1.0, **kw}  # fmt: skip


RESULTS = [
    _row("greedy", 1, 0.3, 400),
    _row("self-consistency", 2, 0.35, 900),
    _row("self-consistency", 8, 0.5, 3600),
    _row("auto", 1600, 0.48, 1500, mean_tokens=150.0),
]


def test_tokens_view_uses_mean_tokens_per_prompt():
    assert tokens_view(RESULTS) == [
        ("greedy", [40.0], [0.3]),
        ("self-consistency", [90.0, 360.0], [0.35, 0.5]),
        ("auto", [150.0], [0.48]),
    ]
    assert tokens_view([{"strategy": "greedy", "n": 1, "accuracy": 0.2, "generated_tokens": 5}]) == []  # no total
    assert tokens_view([{"strategy": "x", "accuracy": "bad"}, "junk"]) == []


async def test_eval_screen_draws_accuracy_vs_generated_tokens(tmp_path):
    root = make_runs(tmp_path / "runs")
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"results": RESULTS}))
    app = create_app(root, poll_runs=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("e")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EvalScreen)
        screen.load(str(path))
        await pilot.pause()
        tokens = screen.query_one("#eval-tokens-chart")
        assert [s[0] for s in tokens.series] == ["greedy", "self-consistency", "auto"]
        assert tokens.series[2][1] == [150.0]
        samples = screen.query_one("#eval-chart")
        assert [s[0] for s in samples.series] == ["greedy", "self-consistency"]  # auto's n is a budget
        table = str(screen.query_one("#eval-table").render())
        assert "tok/prompt" in table and "150.0" in table and "auto" in table
        # a broken file empties both charts and says why
        path.write_text("[]")
        screen.load(str(path))
        await pilot.pause()
        assert tokens.series == [] and samples.series == []
        assert "E521" in str(screen.query_one("#eval-note").render())
