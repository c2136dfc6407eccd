"""Compare: one prompt (under an optional system prompt) answered greedily by the base model and
by an adapter, side by side."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from app import engine
from app.messages import TextArrived
from app.screens.chat import ModelPicker, StreamBuffer

SIDES = ("base", "tuned")


class CompareScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Runs")]

    def __init__(self, adapter: str | None = None, max_tokens: int = 256) -> None:
        super().__init__()
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.buffers = {side: StreamBuffer() for side in SIDES}
        self.texts = dict.fromkeys(SIDES, "")

    def compose(self) -> ComposeResult:
        yield Header()
        yield ModelPicker(self.app.runs_dir, self.adapter, strategies=False, id="cmp-side")
        yield Input(placeholder="prompt (enter: answer with both)", id="cmp-prompt")
        with Horizontal(id="cmp-panes"):
            for side in SIDES:
                with Vertical(classes="cmp-pane"):
                    yield Static(f"[b]{side}[/b]", id=f"cmp-title-{side}")
                    yield VerticalScroll(Static("", id=f"cmp-{side}"))
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — compare base and adapter"
        self.query_one("#cmp-prompt", Input).focus()

    @on(Input.Submitted, "#cmp-prompt")
    def _go(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        picker = self.query_one(ModelPicker)
        model, adapter = picker.choice()
        if not prompt:
            return
        if adapter is None:
            self.notify("pick an adapter to compare against the base model", severity="warning")
            return
        for side in SIDES:
            self.texts[side] = ""
            self.buffers[side].drain()
            self.query_one(f"#cmp-{side}", Static).update("…")
        self._run(model, adapter, prompt, picker.system())

    @work(thread=True, exclusive=True, group="compare")
    def _run(self, model: str | None, adapter: str, prompt: str, system: str | None = None) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        base = engine.base_model_for(adapter, model)
        messages = [{"role": "user", "content": prompt}]
        for side, which in (("base", None), ("tuned", adapter)):
            if worker.is_cancelled:
                return
            try:
                m, tok = engine.load_model(base, which)

                def on_text(t: str, side: str = side) -> None:
                    self.buffers[side].add(t)
                    self.post_message(TextArrived(side))

                cfg = engine.decode_config("greedy", 1, self.max_tokens)
                result = engine.answer(m, tok, messages, cfg, on_text, lambda: worker.is_cancelled, system)
                title = f"[b]{side}[/b]  {result.tokens} tokens, {result.tokens_per_s:.1f} tok/s"
            except Exception as e:  # noqa: BLE001 - shown in the pane, the app lives on
                line = getattr(e, "line", None)
                self.buffers[side].add(f"error: {line() if callable(line) else e}")
                self.post_message(TextArrived(side))
                title = f"[b]{side}[/b]  failed"
            self.app.call_from_thread(self.query_one(f"#cmp-title-{side}", Static).update, title)

    def on_text_arrived(self, message: TextArrived) -> None:
        side = message.target
        self.texts[side] += self.buffers[side].drain()
        self.query_one(f"#cmp-{side}", Static).update(self.texts[side])

    def action_back(self) -> None:
        self.workers.cancel_group(self, "compare")
        self.app.pop_screen()
