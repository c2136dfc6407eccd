"""Eval: score decoding strategies on a data set here (the library's evaluation, in a thread
worker with progress), or load an `mlxpt eval` result file; two charts, accuracy vs samples and
accuracy vs generated tokens per prompt (the CLI's two PNGs), have one line per strategy (and
model); `auto` (compute-optimal, one point per budget) is on the tokens chart only."""

from __future__ import annotations

import json
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from app.evaluation import (
    TUI_LIMIT,
    Cancelled,
    EvalChoice,
    check_outputs,
    default_data,
    eval_config,
    run_eval,
    save,
)
from app.messages import EvalProgress
from app.screens.chat import NO_ADAPTER, adapter_runs
from app.widgets.metric_chart import MetricChart
from mlxpt.errors import MlxptError

Series = list[tuple[str, list[float], list[float]]]


def _read(path: str) -> tuple[list, str | None]:
    """(the result list, error line) of an eval result file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        results = obj["results"]
        if not isinstance(results, list):
            raise TypeError("results is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [], (
            f"E521: cannot read eval results ({type(e).__name__}: {e}) ({path}) - pick a file written by `mlxpt eval`"
        )
    return results, None


def read_results(path: str) -> tuple[Series, list[str], str | None]:
    """(series per strategy: n -> accuracy, table lines, error line) from an eval result file."""
    results, error = _read(path)
    return *results_view(results), error


def _mean_tokens(r: dict) -> float | None:
    """Mean generated tokens per prompt (files before it have the total and the prompt count)."""
    if isinstance(r.get("mean_tokens"), (int, float)):
        return float(r["mean_tokens"])
    total, tokens = r.get("total"), r.get("generated_tokens")
    ok = isinstance(total, int) and total > 0 and isinstance(tokens, (int, float))
    return tokens / total if ok else None


def _rows(results: list) -> list[dict]:
    return [r for r in results if isinstance(r, dict) and isinstance(r.get("accuracy"), (int, float))]


def _key(r: dict, labels: set) -> str:
    return str(r.get("strategy", "?")) + (f" ({r.get('label')})" if len(labels) > 1 else "")


def _series(by: dict) -> Series:
    return [(s, [x for x, _ in sorted(pts)], [a for _, a in sorted(pts)]) for s, pts in by.items()]


def results_view(results: list) -> tuple[Series, list[str]]:
    """(series per strategy: n -> accuracy, table lines) of a result list (file or worker)."""
    by: dict[str, list[tuple[float, float]]] = {}
    rows = _rows(results)
    labels = {str(r.get("label", "")) for r in rows}
    lines = [f"{'model':<9}{'strategy':<18}{'n':>6}{'accuracy':>10}{'tokens':>10}{'tok/prompt':>11}{'seconds':>9}"]
    for r in rows:
        n = r.get("n", 1) if isinstance(r.get("n"), (int, float)) else 1
        if r.get("strategy") != "auto":  # auto's n is its token budget: on the tokens chart only
            by.setdefault(_key(r, labels), []).append((float(n), float(r["accuracy"])))
        mean = _mean_tokens(r)
        lines.append(
            f"{str(r.get('label', ''))[:8]:<9}{str(r.get('strategy', '?')):<18}{n:>6}{r['accuracy']:>10.3f}"
            f"{r.get('generated_tokens', 0):>10}{'-' if mean is None else f'{mean:.1f}':>11}"
            f"{float(r.get('seconds', 0.0)):>9.1f}"
        )
    return _series(by), lines


def tokens_view(results: list) -> Series:
    """Series per strategy: mean generated tokens per prompt -> accuracy (every strategy, auto too)."""
    by: dict[str, list[tuple[float, float]]] = {}
    rows = _rows(results)
    labels = {str(r.get("label", "")) for r in rows}
    for r in rows:
        mean = _mean_tokens(r)
        if mean is not None:
            by.setdefault(_key(r, labels), []).append((mean, float(r["accuracy"])))
    return _series(by)


class EvalScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Runs"),
        Binding("ctrl+r", "run_eval", "Run eval"),
    ]

    def __init__(self, path: str = "", adapter: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.adapter = adapter
        self.running = False
        self.saving = ""  # the results file the running evaluation saves to ("": none)

    def compose(self) -> ComposeResult:
        runs = adapter_runs(self.app.runs_dir)
        paths = [p for _, p in runs]
        yield Header()
        with Vertical(id="eval-form"):
            with Horizontal(classes="eval-row"):
                yield Label("data", classes="eval-name")
                yield Input(
                    "", placeholder="blank: the bundled test set", id="eval-data", compact=True,
                    tooltip="JSONL with `answer` and `prompt` or `messages`",
                )  # fmt: skip
                yield Label(" limit", classes="eval-short")
                yield Input(str(TUI_LIMIT), id="eval-limit", compact=True, restrict=r"[0-9]*")
            with Horizontal(classes="eval-row"):
                yield Label("strategies", classes="eval-name")
                yield Input(EvalChoice("").strategies, id="eval-strategies", compact=True)
                yield Label(" n", classes="eval-short")
                yield Input(EvalChoice("").ns, id="eval-n", compact=True, restrict=r"[0-9,]*")
            with Horizontal(classes="eval-row"):
                yield Label("adapter", classes="eval-name")
                yield Select(
                    [(NO_ADAPTER, NO_ADAPTER), *runs],
                    value=self.adapter if self.adapter in paths else NO_ADAPTER,
                    allow_blank=False,
                    id="eval-adapter",
                    compact=True,
                )
                yield Select(
                    [("base and adapter", "both"), ("adapter only", "adapter")],
                    value="both",
                    allow_blank=False,
                    id="eval-models",
                    compact=True,
                )
            with Horizontal(classes="eval-row"):
                yield Label("results file", classes="eval-name")
                yield Input(
                    self.path, placeholder="JSON of `mlxpt eval`: enter loads it; a new name saves a run here", id="eval-path",
                    compact=True,
                )  # fmt: skip
            with Horizontal(id="eval-buttons"):
                yield Button("Evaluate (ctrl+r)", id="eval-run", variant="success", compact=True)
                yield Static("", id="eval-note")
        with Horizontal(id="eval-charts"):
            yield MetricChart("accuracy vs samples (n)", show_last=False, id="eval-chart")
            yield MetricChart("accuracy vs generated tokens/prompt", show_last=False, id="eval-tokens-chart")
        with VerticalScroll(id="eval-scroll"):
            yield Static("", id="eval-table")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — eval"
        if self.path:
            self.query_one("#eval-path", Input).focus()
            self.load(self.path)
        else:
            self.query_one("#eval-data", Input).focus()
            self._note("ctrl+r runs it; enter in results file loads one")

    def _note(self, text: str, bad: bool = False) -> None:
        note = self.query_one("#eval-note", Static)
        note.update(Text(text))
        note.set_class(bad, "-bad")

    @on(Input.Submitted, "#eval-path")
    def _submitted(self, event: Input.Submitted) -> None:
        self.load(event.value.strip())

    @on(Input.Submitted, "#eval-data, #eval-limit, #eval-strategies, #eval-n")
    def _submitted_form(self, event: Input.Submitted) -> None:
        self.action_run_eval()

    def load(self, path: str) -> None:
        results, error = _read(path)
        series, lines = results_view(results)
        self._note(error or f"{len(series)} strategies from {path}", bad=bool(error))
        self.show(series, lines, tokens_view(results))

    def show(self, series: list, lines: list[str], tokens: list | None = None) -> None:
        for wid, data in (("#eval-chart", series), ("#eval-tokens-chart", tokens or [])):
            chart = self.query_one(wid, MetricChart)
            chart.show(data)
            chart.plt.ylim(0, 1)  # accuracy: a fixed axis keeps files comparable
        self.query_one("#eval-table", Static).update("\n".join(lines))

    # ---- running an evaluation ------------------------------------------------------------

    def choice(self) -> EvalChoice:
        value = lambda wid: self.query_one(wid, Input).value.strip()  # noqa: E731
        adapter = self.query_one("#eval-adapter", Select).value
        return EvalChoice(
            data=value("#eval-data") or default_data(), strategies=value("#eval-strategies"), ns=value("#eval-n"),
            limit=value("#eval-limit"), adapter=None if adapter == NO_ADAPTER else str(adapter),
            with_base=self.query_one("#eval-models", Select).value == "both",
        )  # fmt: skip

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "eval-run":
            self.action_run_eval()

    def action_run_eval(self) -> None:
        if self.running:
            self.notify("an evaluation is running; escape stops it", severity="warning")
            return
        choice = self.choice()
        out = self.query_one("#eval-path", Input).value.strip()
        try:
            eval_config(choice)  # refuse bad settings now, before a thread or a model
            if out:
                check_outputs(choice, out)  # and a results name that would overwrite a file
        except MlxptError as e:
            self._note(e.line(), bad=True)
            return
        self.running = True
        self.query_one("#eval-run", Button).disabled = True
        self._note("reading the data...")
        self.saving = out
        self._evaluate(choice)

    @work(thread=True, exclusive=True, group="eval")
    def _evaluate(self, choice: EvalChoice) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        try:
            result = run_eval(
                choice,
                lambda label, done, total: self.post_message(EvalProgress(label, done, total)),
                lambda: worker.is_cancelled,
            )
        except Cancelled:
            return
        except Exception as e:  # noqa: BLE001 - a bad file or a failed load is shown, the app lives on
            line = getattr(e, "line", None)
            self.app.call_from_thread(self._failed, line() if callable(line) else f"{type(e).__name__}: {e}")
            return
        self.app.call_from_thread(self._finished, result, choice)

    def on_eval_progress(self, message: EvalProgress) -> None:
        if not self.running:
            return
        if message.done == 0:
            self._note(f"[{message.label}] loading the model...")
        else:
            self._note(f"[{message.label}] {message.done}/{message.total} prompts")

    def _failed(self, line: str) -> None:
        self.running = False
        self.query_one("#eval-run", Button).disabled = False
        self._note(line, bad=True)

    def _finished(self, result: dict, choice: EvalChoice) -> None:
        self.running = False
        self.query_one("#eval-run", Button).disabled = False
        series, lines = results_view(result["results"])
        self.show(series, lines, tokens_view(result["results"]))
        note = f"{result['prompts']} prompts in {result['wall_seconds']:.0f} s"
        out = self.saving  # the name checked before the evaluation started
        if out:
            try:
                check_outputs(choice, out)  # again: a file may have appeared meanwhile
                save(result, out)
                note += f"; saved to {out} (chart: {Path(out).with_suffix('.png').name})"
            except (OSError, MlxptError) as e:
                self._note(f"{note}; not saved: {e}", bad=True)
                return
        self._note(note)

    def action_back(self) -> None:
        self.workers.cancel_group(self, "eval")  # the worker stops before its next prompt
        self.app.pop_screen()
