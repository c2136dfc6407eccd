"""Eval: the accuracy-vs-samples chart of an `mlxpt eval` result file, one line per strategy."""

from __future__ import annotations

import json
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from app.widgets.metric_chart import MetricChart


def read_results(path: str) -> tuple[list[tuple[str, list[float], list[float]]], list[str], str | None]:
    """(series per strategy: n -> accuracy, table lines, error line) from an eval result file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        results = obj["results"]
        if not isinstance(results, list):
            raise TypeError("results is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return (
            [],
            [],
            f"E521: cannot read eval results ({type(e).__name__}: {e}) ({path}) - pick a file written by `mlxpt eval`",
        )
    by: dict[str, list[tuple[float, float]]] = {}
    labels = {str(r.get("label", "")) for r in results if isinstance(r, dict)}
    lines = [f"{'model':<9}{'strategy':<18}{'n':>5}{'accuracy':>10}{'tokens':>10}{'seconds':>9}"]
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("accuracy"), (int, float)):
            continue
        n = r.get("n", 1) if isinstance(r.get("n"), (int, float)) else 1
        key = str(r.get("strategy", "?")) + (f" ({r.get('label')})" if len(labels) > 1 else "")
        by.setdefault(key, []).append((float(n), float(r["accuracy"])))
        lines.append(
            f"{str(r.get('label', ''))[:8]:<9}{str(r.get('strategy', '?')):<18}{n:>5}{r['accuracy']:>10.3f}"
            f"{r.get('generated_tokens', 0):>10}{float(r.get('seconds', 0.0)):>9.1f}"
        )
    series = [(s, [n for n, _ in sorted(pts)], [a for _, a in sorted(pts)]) for s, pts in by.items()]
    return series, lines, None


class EvalScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Runs")]

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.path = path

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(self.path, placeholder="eval result file (JSON from `mlxpt eval`); enter loads", id="eval-path")
        yield Static("", id="eval-note")
        yield MetricChart("accuracy vs samples (n)", show_last=False, id="eval-chart")
        with VerticalScroll(id="eval-scroll"):
            yield Static("", id="eval-table")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — eval"
        self.query_one("#eval-path", Input).focus()
        if self.path:
            self.load(self.path)
        else:
            self.query_one("#eval-note", Static).update("Give the path of a result file written by `mlxpt eval`.")

    @on(Input.Submitted, "#eval-path")
    def _submitted(self, event: Input.Submitted) -> None:
        self.load(event.value.strip())

    def load(self, path: str) -> None:
        series, lines, error = read_results(path)
        self.query_one("#eval-note", Static).update(error or f"{len(series)} strategies")
        chart = self.query_one("#eval-chart", MetricChart)
        chart.show(series)
        chart.plt.ylim(0, 1)  # accuracy: a fixed axis keeps files comparable
        self.query_one("#eval-table", Static).update("\n".join(lines))

    def action_back(self) -> None:
        self.app.pop_screen()
