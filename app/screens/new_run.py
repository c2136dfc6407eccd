"""New run: a form generated from the config dataclasses (help texts included), live data
validation with file:line errors, a token-length histogram, a masked example, a memory
estimate and the equivalent command line (ctrl+y copies it). Start launches `mlxpt train ... --events json` as a child process."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from app import form
from app.preview import DataPreview, check_data, estimate_memory
from app.widgets.histogram import LengthHistogram
from mlxpt.models.memory import Shape

DEBOUNCE_S = 0.4
DATA_KEYS = ("data", "valid", "model", "mask", "trust_remote_code")
MEMORY_KEYS = ("model", "quantize", "fine_tune_type", "rank", "num_layers", "targets", "batch_size", "max_seq_len")
MEMORY_KEYS += ("prefix_length", "prefix_projection", "adapter_size")


def example_text(segments: list[tuple[str, bool]], limit: int = 1200) -> Text:
    """The rendered example; trained tokens highlighted."""
    text = Text()
    for seg, trained in segments:
        text.append(seg, style="bold black on green" if trained else "dim")
        if len(text) > limit:
            text.append(" …")
            break
    return text


def memory_text(est: dict, shape: Shape) -> str:
    gb = 1e9
    line = (
        f"memory estimate: {est['total'] / gb:.2f} GB at {shape.label} "
        f"(weights {est['weights'] / gb:.2f}, optimizer {est['optimizer'] / gb:.2f}, "
        f"activations {est['activations'] / gb:.2f})"
    )
    avail = est.get("available")
    if avail:
        fits = "fits" if est["total"] <= avail else "DOES NOT FIT: lower batch size or max_seq_len"
        line += f"; {avail / gb:.1f} GB available: {fits}"
    return line


class NewRunScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Runs"),
        Binding("ctrl+g", "start", "Start"),
        Binding("ctrl+y", "copy_command", "Copy command"),
    ]

    def __init__(self, method: str = "sft", values: dict | None = None) -> None:
        super().__init__()
        self.method = method if method in form.methods() else "sft"
        self.initial = dict(values or {})  # a duplicated run's settings, for its own method
        self.source = self.method  # the method `initial` belongs to
        self.typed: dict[str, object] = {}  # what the user changed in the form, kept across methods
        self.shown: dict[str, str] = {}  # what the form put in each field when it was built (as str)
        self.error: str | None = None
        self.preview: DataPreview | None = None
        self.checking = False
        self.pending = True  # edits not yet validated (debounce)
        self._timer = None
        self._last_data: tuple | None = None
        self._last_memory: tuple | None = None
        self.cfg = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="new-body"):
            with VerticalScroll(id="form"):
                with Horizontal(classes="field"):
                    yield Label("method", classes="field-name")
                    yield Select(
                        [(m, m) for m in form.methods()],
                        value=self.method,
                        allow_blank=False,
                        id="method",
                        compact=True,
                    )
                yield Vertical(id="fields")
            with VerticalScroll(id="preview"):
                yield Static("checking the data...", id="check")
                yield LengthHistogram(id="hist")
                yield Static("", id="example")
                yield Static("", id="memory")
        yield Static("", id="field-help")
        yield Static("", id="cli-line")  # the equivalent command line, kept up to date
        with Horizontal(id="new-buttons"):
            yield Button("Start (ctrl+g)", id="start", variant="success", disabled=True, compact=True)
            yield Static("", id="form-error")
        yield Footer()

    async def on_mount(self) -> None:
        self.title = "mlxpt — new run"
        if "runs_dir" not in self.initial and str(self.app.runs_dir) != "runs":
            self.initial["runs_dir"] = str(self.app.runs_dir)
        await self._build_fields()
        self.query_one("#method", Select).focus()
        self._validate()

    async def _build_fields(self, previous: str | None = None) -> None:
        holder = self.query_one("#fields", Vertical)
        if holder.children and previous is not None:
            self._remember_typed(previous)
        await holder.remove_children()
        widgets, rows, chosen, self.shown = [], {}, {}, {}
        section = None
        source = {f.name: f.default for f in form.form_fields(self.source)}
        for f in form.form_fields(self.method):
            if f.section != section:
                section = f.section
                widgets.append(Static(section, classes="section"))
            value = self._start_value(f, source)
            wid = f"f-{f.name}"
            blank = f"blank: {f.default}" if f.kind == "text" and f.default not in (None, "") else ""  # the default
            if f.kind == "bool":
                v = "true" if str(value).lower() in ("true", "1", "yes", "on") else "false"
                chosen[f.name] = v == "true"  # a switch may show or hide others (rationalize: hint)
                w = Select([("false", "false"), ("true", "true")], value=v, allow_blank=False, id=wid, compact=True)
                self.shown[f.name] = str(v == "true")  # as values() reads it back
            elif f.kind == "choice":
                v = chosen[f.name] = self.shown[f.name] = str(value) if str(value) in f.choices else str(f.default)
                w = Select(
                    [(c, c) for c in f.choices], value=v, allow_blank=False, id=wid, compact=True, tooltip=f.help
                )
            else:
                self.shown[f.name] = "" if value is None else str(value)
                w = Input(self.shown[f.name], placeholder=blank, id=wid, compact=True, tooltip=f.help)
            w.help_text = f"{f.name}{f' ({blank})' if blank else ''}: {f.help}"
            rows[f.name] = Horizontal(Label(f.name, classes="field-name"), w, classes="field")
            widgets.append(rows[f.name])
        for name in form.hidden_fields(self.method, chosen):  # chosen: the choices, fine_tune_type's among them
            rows[name].display = False
        await holder.mount_all(widgets)

    def _remember_typed(self, previous: str) -> None:
        """Before the form is rebuilt for another method: note what the user changed in it. A
        setting put back to the old method's default takes the new one's."""
        defaults = {f.name: f.default for f in form.form_fields(previous)}
        for name, value in self.values(previous).items():
            if str(value) == self.shown.get(name):
                continue  # as the form put it there
            if str(value) == str(defaults.get(name)):
                self.typed.pop(name, None)
            else:
                self.typed[name] = value

    def _start_value(self, f: form.FormField, source: dict[str, object]) -> object:
        """A field's value when the form is built: what the user typed, else the duplicated run's
        setting, else the method's default. After a switch of method, a run's setting whose
        default differs between the two methods (data, a preset's beta...) takes the new
        method's default: an SFT run's data is not DPO's."""
        if f.name in self.typed:
            return self.typed[f.name]
        if f.name in self.initial and (self.method == self.source or str(source.get(f.name)) == str(f.default)):
            return self.initial[f.name]
        return f.default

    @on(Select.Changed, "#f-fine_tune_type")
    @on(Select.Changed, "#f-strategy")
    @on(Select.Changed, "#f-rationalize")
    def _show_type_fields(self) -> None:
        """Only the settings the chosen fine-tune type (and RFT strategy and rationalization) reads
        are shown; the others keep their values."""
        hidden = set(form.hidden_fields(self.method, self.values()))
        for w in self.query("#fields Input, #fields Select"):
            if w.id and w.id.startswith("f-") and w.parent is not None:
                w.parent.display = w.id[2:] not in hidden

    def values(self, method: str | None = None) -> dict[str, object]:
        out: dict[str, object] = {}
        kinds = {f.name: f.kind for f in form.form_fields(method or self.method)}
        for w in self.query("#fields Input, #fields Select"):
            if w.id and w.id.startswith("f-"):
                name = w.id[2:]
                out[name] = w.value == "true" if kinds.get(name) == "bool" else w.value
        return out

    # ---- live validation ------------------------------------------------------------------

    def on_descendant_focus(self, event) -> None:
        help_text = getattr(event.widget, "help_text", "") or (
            "training method (read from `mlxpt train`)" if event.widget.id == "method" else ""
        )
        self.query_one("#field-help", Static).update(help_text)

    @on(Select.Changed, "#method")
    async def _method_changed(self, event: Select.Changed) -> None:
        if event.value != self.method:
            previous, self.method = self.method, str(event.value)
            self.query_one("#memory", Static).update("")
            await self._build_fields(previous)
            self._schedule()

    @on(Input.Changed)
    @on(Select.Changed, "#fields Select")
    def _field_changed(self, event) -> None:
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.pending = True
        self._start_button()
        self._timer = self.set_timer(DEBOUNCE_S, self._validate)

    def _validate(self) -> None:
        values = self.values()
        self.pending = False
        self.cfg, self.error = form.validate(self.method, values)
        self.query_one("#form-error", Static).update(self.error or "")
        self.query_one("#cli-line", Static).update(Text("$ " + self.command_line()))
        if self.cfg is not None:
            data_key = (self.method, *(str(values.get(k)) for k in DATA_KEYS))
            if data_key != self._last_data:
                self._last_data = data_key
                self._last_memory = None
                self.checking = True
                self.query_one("#check", Static).update("checking the data...")
                self._check(data_key, self.cfg)
            elif self.preview is not None:
                self._maybe_memory()
        self._start_button()

    def _kind(self) -> str | None:
        """What the data holds: sft rows, preference pairs or prompts; None: no preview."""
        return form.data_kind(self.method)

    def _batch_shape(self, cfg, longest: int) -> Shape:
        """One training pass as `mlxpt train` estimates it before step 1 (the method's own shape;
        the MLX backend adds its gradient checkpointing, as here)."""
        from dataclasses import replace

        from mlxpt.train.methods import METHODS

        shape = METHODS[self.method].memory_shape(cfg, longest)
        return replace(shape, grad_checkpoint=cfg.train.grad_checkpoint)

    @work(thread=True, exclusive=True, group="check")
    def _check(self, key: tuple, cfg) -> None:
        kind = self._kind()
        if kind is None:
            result = DataPreview(summary=f"no data preview for {self.method} yet")
        else:
            result = check_data(kind, cfg)
        self.app.call_from_thread(self._show_check, key, result)

    def _show_check(self, key: tuple, p: DataPreview) -> None:
        if key != self._last_data:
            return  # a thread worker cannot be stopped; drop what a superseded check found
        self.preview, self.checking = p, False
        lines = [p.summary] if p.summary else []
        lines += ["data errors:", *[f"  {e}" for e in p.errors]] if p.errors else ["data OK"]
        check = self.query_one("#check", Static)
        check.update(Text("\n".join(lines)))
        check.set_class(bool(p.errors), "-bad")
        max_len = self.cfg.data.max_seq_len if self.cfg is not None else None
        self.query_one("#hist", LengthHistogram).show(p.lengths, max_len)
        example = self.query_one("#example", Static)
        if p.example:
            head = Text(f"example ({p.example_where}); trained tokens highlighted:\n", style="italic")
            example.update(head + example_text(p.example))
        else:
            example.update("")
        self._maybe_memory()
        self._start_button()

    def _maybe_memory(self) -> None:
        cfg, p = self.cfg, self.preview
        if cfg is None or p is None or p.errors or not p.lengths:
            return
        shape = self._batch_shape(cfg, p.longest)
        key = (
            cfg.model.model,
            cfg.model.quantize,
            *(str(getattr(cfg.adapter, k)) for k in vars(cfg.adapter)),
            shape,
        )
        if key == self._last_memory:
            return
        self._last_memory = key
        self.query_one("#memory", Static).update(f"estimating memory for {shape.label}...")
        self._memory(key, cfg, shape)

    @work(thread=True, exclusive=True, group="memory")
    def _memory(self, key: tuple, cfg, shape: Shape) -> None:
        try:
            text = memory_text(estimate_memory(cfg, shape), shape)
        except Exception as e:  # noqa: BLE001 - a model that will not load is shown, not raised
            line = getattr(e, "line", None)
            text = f"memory estimate unavailable: {line() if callable(line) else f'{type(e).__name__}: {e}'}"
        self.app.call_from_thread(self._show_memory, key, text)

    def _show_memory(self, key: tuple, text: str) -> None:
        if key == self._last_memory:
            self.query_one("#memory", Static).update(text)

    def _start_button(self) -> None:
        ok = not self.pending and self.cfg is not None and not self.checking
        ok = ok and self.preview is not None and not self.preview.errors
        self.query_one("#start", Button).disabled = not ok

    def command_line(self) -> str:
        """`mlxpt train METHOD --flag value ...`: what Start runs, as a person would type it."""
        import shlex

        argv = form.to_argv(self.method, self.values())[:-2]  # without --events json
        return shlex.join(["mlxpt", *argv])

    def action_copy_command(self) -> None:
        self.app.copy_to_clipboard(self.command_line())
        self.notify("command line copied (your terminal must allow OSC 52)")

    # ---- actions --------------------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()

    def action_start(self) -> None:
        if self.query_one("#start", Button).disabled:
            self.notify(self.error or "fix the data errors first (or wait for the check)", severity="warning")
            return
        from app.screens.monitor import MonitorScreen

        log = self.app.start_run(form.to_argv(self.method, self.values()))
        self.app.switch_screen(MonitorScreen(log))

    def action_back(self) -> None:
        self.app.pop_screen()
