"""Run monitor: live charts chosen from the run's event keys, the log, sampled completions,
Stop (checkpoint then exit) and Resume. A crashed child shows its exit reason; the app lives on."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, RichLog, Static, TabbedContent, TabPane

from app.charts import charts_for
from app.runlog import RunLog, resume_refusal
from app.widgets.metric_chart import MetricChart
from mlxpt.runs.store import list_checkpoints

REDRAW_S = 0.3
POLL_S = 1.0


def status_line(log: RunLog) -> str:
    name = log.run_dir.name if log.run_dir else "(starting)"
    step = f"step {log.last_step}/{log.total_steps}" if log.total_steps else f"step {log.last_step}"
    parts = [f"[b]{name}[/b]", log.method or "?", f"[b]{log.status}[/b]", step]
    last = log.steps[-1] if log.steps else {}
    for key, label in (("loss", "loss"), ("reward_mean", "reward"), ("tokens_per_s", "tok/s")):
        v = last.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {v:.4g}" if key != "tokens_per_s" else f"{v:.0f} {label}")
    if log.evals and isinstance(log.evals[-1].get("val_loss"), (int, float)):
        parts.append(f"val {log.evals[-1]['val_loss']:.4g}")
    return "  ·  ".join(parts)


def sample_lines(samples: list[dict], limit: int = 20) -> list[str]:
    out = []
    for s in samples[-limit:]:
        rewards = s.get("rewards") or {}
        per = ", ".join(f"{k} {v:.3g}" for k, v in rewards.items() if isinstance(v, (int, float)))
        r = s.get("reward")
        head = f"step {s.get('step')}  reward {r:.3g}" if isinstance(r, (int, float)) else f"step {s.get('step')}"
        out.append(f"[b]{head}[/b]" + (f"  ({per})" if per else ""))
        out.append(f"  prompt: {str(s.get('prompt', ''))[:200]}")
        out.append(f"  completion: {str(s.get('completion', ''))[:400]}")
    return out


class MonitorScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Runs"),
        Binding("s", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
        Binding("1", "tab('charts')", "Charts"),
        Binding("2", "tab('log')", "Log"),
        Binding("3", "tab('samples')", "Samples"),
        Binding("pagedown,j", "scroll_charts(1)", "More", key_display="PgDn"),
        Binding("pageup,k", "scroll_charts(-1)", "Charts up", show=False),
        Binding("t", "continue_run", "Continue"),
    ]

    def __init__(self, log: RunLog) -> None:
        super().__init__()
        self.log_ = log
        self._drawn = -1
        self._drawn_at = 0.0
        self._shown_lines = 0
        self._charts: dict[str, MetricChart] = {}
        self._state: tuple = ()
        self._below = 0  # charts below the fold (the hint and `PgDn` show while there are some)
        self.refusal: str | None = None  # why `r` cannot resume the run (None: it can)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="mon-status")
        yield Static("", id="mon-reason")
        with TabbedContent(id="mon-tabs", initial="charts"):
            with TabPane("Charts 1", id="charts"):
                with VerticalScroll(id="charts-scroll"):
                    yield Static("waiting for the first step...", id="charts-empty")
                    yield Grid(id="charts-grid")
                yield Static("", id="charts-more")
            with TabPane("Log 2", id="log"):
                yield RichLog(id="mon-log", wrap=True, markup=False, max_lines=2000)
            with TabPane("Samples 3", id="samples"):
                with VerticalScroll():
                    yield Static("no sampled completions (GRPO runs write them)", id="mon-samples")
        with Horizontal(id="mon-buttons"):
            yield Button("Stop (s)", id="stop", variant="error", compact=True)
            yield Button("Resume (r)", id="resume", variant="success", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — run monitor"
        scroll = self.query_one("#charts-scroll", VerticalScroll)
        self.watch(scroll, "scroll_y", self._charts_hint, init=False)
        self.watch(scroll, "virtual_size", self._charts_hint, init=False)  # charts added
        self.redraw()
        self.set_interval(REDRAW_S, self.redraw)
        self.set_interval(POLL_S, self._poll)

    def run_updated(self, key: str) -> None:
        """Called by the app for every (collapsed) RunUpdated: redraw now unless we just did
        (the timer picks up the rest), so a flood of steps costs a few redraws a second."""
        if key == self.log_.key and time.monotonic() - self._drawn_at >= REDRAW_S:
            self.redraw()

    def _poll(self) -> None:
        """A run this app does not own (started from the CLI): follow its files."""
        log = self.log_
        if log.live or log.run_dir is None:
            return
        from mlxpt.runs.listing import run_info

        info = run_info(log.run_dir)
        changed = log.poll_files()
        if info.status != "unknown" and info.status != log.status:
            log.status, changed = info.status, True
        if info.error and not log.exit_reason:
            log.exit_reason = info.error
        if changed:
            log.version += 1

    def redraw(self) -> None:
        log = self.log_
        if log.version == self._drawn:
            return
        self._drawn = log.version
        self._drawn_at = time.monotonic()
        self.query_one("#mon-status", Static).update(status_line(log))
        reason = self.query_one("#mon-reason", Static)
        reason.update(f"exit: {log.exit_reason}" if log.exit_reason else "")
        reason.display = bool(log.exit_reason)
        reason.set_class(log.status in ("crashed", "failed"), "-bad")
        running = log.live or log.status == "running"
        self.query_one("#stop", Button).disabled = not running
        self.refusal = self._resume_refusal(running)
        self.query_one("#resume", Button).disabled = self.refusal is not None
        state = (log.status, running)
        if self._state != state:
            self._state = state
            self.refresh_bindings()  # Stop, Resume, Continue: shown only where they apply
        self._draw_charts()
        rich_log = self.query_one("#mon-log", RichLog)
        for line in log.new_lines(self._shown_lines):
            rich_log.write(line)
        self._shown_lines = log.said
        if log.samples:
            self.query_one("#mon-samples", Static).update("\n".join(sample_lines(log.samples)))

    def _resume_refusal(self, running: bool) -> str | None:
        """The Runs list's rule for `r` (app.runlog.resume_refusal): a checkpoint is needed."""
        log = self.log_
        if log.run_dir is None:
            return "nothing to resume: the run has no folder yet"
        checkpoints = 0 if running else len(list_checkpoints(log.run_dir))
        return resume_refusal(log.run_dir.name, log.status, running, checkpoints)

    def _draw_charts(self) -> None:
        charts = charts_for(self.log_.steps, self.log_.evals)
        self.query_one("#charts-empty", Static).display = not charts
        grid = self.query_one("#charts-grid", Grid)
        for spec, series in charts:
            chart = self._charts.get(spec.title)
            if chart is None:
                chart = self._charts[spec.title] = MetricChart(spec.title, classes="chart")
                grid.mount(chart)
            chart.show(series)

    def on_resize(self) -> None:
        self.call_after_refresh(self._charts_hint)

    def _charts_hint(self, _value: object = None) -> None:
        """`N more charts below: PgDn` while some charts are out of sight under the fold."""
        scroll = self.query_one("#charts-scroll", VerticalScroll)
        grid = self.query_one("#charts-grid", Grid)
        bottom = scroll.scroll_y + scroll.size.height  # the fold, in the scroll's own rows
        top = grid.virtual_region.y
        below = sum(1 for c in self._charts.values() if top + c.virtual_region.bottom > bottom)
        hint = self.query_one("#charts-more", Static)
        if below:
            more = f"{below} more chart{'s' if below != 1 else ''} below"
            hint.update(f"↓ {more}: PgDn (or j) scrolls down, PgUp (or k) back up")
        elif scroll.scroll_y > 0:
            hint.update("↑ PgUp (or k) scrolls back up")
        else:
            hint.update("")
        hint.display = bool(below) or scroll.scroll_y > 0
        if (below > 0) != (self._below > 0):
            self._below = below
            self.refresh_bindings()
        self._below = below

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Show a key only where it does something, so the footer fits 80 columns."""
        if action in ("stop", "resume"):
            found = self.query(f"#{action}")  # none before compose: allowed
            return not found.first(Button).disabled if found else True
        if action == "continue_run":
            return self.log_.status == "finished" and self.log_.run_dir is not None
        if action == "scroll_charts" and parameters == (1,):
            return self._below > 0  # shown (and working) only while charts are below the fold
        return True

    def action_scroll_charts(self, direction: int) -> None:
        tabs = self.query_one(TabbedContent)
        if tabs.active != "charts":
            tabs.active = "charts"
            return
        scroll = self.query_one("#charts-scroll", VerticalScroll)
        if direction > 0:
            scroll.scroll_page_down(animate=False)
        else:
            scroll.scroll_page_up(animate=False)

    def action_continue_run(self) -> None:
        if self.log_.run_dir is not None:
            self.app.continue_from(self.log_.run_dir)

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_stop(self) -> None:
        if not self.app.stop_run(self.log_):
            self.notify("this run is not running", severity="warning")

    def action_resume(self) -> None:
        if self.query_one("#resume", Button).disabled:
            self.notify(self.refusal or "nothing to resume", severity="warning")
            return
        self.app.resume_run(self.log_)
        self._drawn = -1

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "stop":
            self.action_stop()
        elif event.button.id == "resume":
            self.action_resume()
