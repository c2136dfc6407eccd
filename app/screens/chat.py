"""Chat: model and adapter picker, streaming answers, a decoding-strategy switch (with votes or
scores shown), tokens/s, and a conversation reset. Model work runs in a thread worker."""

from __future__ import annotations

import threading
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Select, Static

from app import engine
from app.messages import TextArrived

NO_ADAPTER = "(none: base model)"


def adapter_runs(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of runs that have a saved adapter, newest first."""
    try:
        dirs = sorted((p for p in runs_dir.iterdir() if (p / "adapters.safetensors").is_file()), reverse=True)
    except OSError:
        return []
    return [(p.name, str(p)) for p in dirs]


class StreamBuffer:
    """Text a worker thread produces, drained by the UI; one TextArrived per burst."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)

    def drain(self) -> str:
        with self._lock:
            text, self._parts = "".join(self._parts), []
        return text


class ModelPicker(Vertical):
    """Model field, adapter select, system prompt and (optionally) the strategy switch."""

    def __init__(self, runs_dir: Path, adapter: str | None, strategies: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.runs_dir, self.adapter, self.with_strategies = runs_dir, adapter, strategies

    def compose(self) -> ComposeResult:
        runs = adapter_runs(self.runs_dir)
        paths = [p for _, p in runs]
        yield Label("model (blank: default)")
        yield Input("", placeholder="smollm2-135m", id="pick-model", compact=True)
        yield Label("adapter")
        yield Select(
            [(NO_ADAPTER, NO_ADAPTER), *runs],
            value=self.adapter if self.adapter in paths else NO_ADAPTER,
            allow_blank=False,
            id="pick-adapter",
            compact=True,
        )
        yield Label("system prompt (blank: none)")
        yield Input("", placeholder="e.g. Answer in one sentence.", id="pick-system", compact=True)
        if self.with_strategies:
            yield Label("strategy (ctrl+t)")
            yield Select(
                [(s, s) for s in engine.strategies()],
                value="greedy",
                allow_blank=False,
                id="pick-strategy",
                compact=True,
            )
            yield Label("n (best-of-N, self-consistency)")
            yield Input(str(engine.CHAT_N), id="pick-n", compact=True, restrict=r"[0-9]*")

    def choice(self) -> tuple[str | None, str | None]:
        model = self.query_one("#pick-model", Input).value.strip() or None
        adapter = self.query_one("#pick-adapter", Select).value
        return model, None if adapter == NO_ADAPTER else str(adapter)

    def system(self) -> str | None:
        """The system prompt, or None when the field is blank."""
        return self.query_one("#pick-system", Input).value.strip() or None


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Runs"),
        Binding("ctrl+l", "reset", "Reset"),
        Binding("ctrl+t", "strategy", "Strategy"),
    ]

    def __init__(self, adapter: str | None = None, max_tokens: int = 256) -> None:
        super().__init__()
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.history: list[dict] = []
        self.buffer = StreamBuffer()
        self.reply: Static | None = None
        self.reply_text = ""
        self.busy = False
        self.turn = 0  # answers from before a reset are dropped

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield ModelPicker(self.app.runs_dir, self.adapter, id="chat-side")
            with Vertical(id="chat-main"):
                yield VerticalScroll(Static("Type a message and press enter.", classes="hint"), id="chat-log")
                yield Static("", id="chat-stats")
                yield Input(placeholder="message (enter sends)", id="chat-input")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mlxpt — chat"
        self.query_one("#chat-input", Input).focus()

    @on(Input.Submitted, "#chat-input")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.busy:
            self.notify("still answering the last message", severity="warning")
            return
        event.input.value = ""
        picker = self.query_one(ModelPicker)
        model, adapter = picker.choice()
        strategy = str(self.query_one("#pick-strategy", Select).value)
        n = int(self.query_one("#pick-n", Input).value or engine.CHAT_N)
        cfg = engine.decode_config(strategy, max(1, n), self.max_tokens)
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(Static(f"you: {text}", classes="user"))
        self.reply = Static("…", classes="assistant")
        self.reply_text = ""
        log.mount(self.reply)
        log.scroll_end(animate=False)
        self.history.append({"role": "user", "content": text})
        self.busy = True
        self._answer(self.turn, model, adapter, list(self.history), cfg, picker.system())

    @work(thread=True, exclusive=True, group="chat")
    def _answer(
        self, turn: int, model: str | None, adapter: str | None, messages: list[dict], cfg, system: str | None
    ) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        self.app.call_from_thread(self._stats, "loading the model...")
        try:
            m, tok = engine.load_model(model, adapter)
            self.app.call_from_thread(self._stats, f"answering ({cfg.strategy})...")

            def on_text(t: str) -> None:
                self.buffer.add(t)
                self.post_message(TextArrived("chat"))

            result = engine.answer(m, tok, messages, cfg, on_text, lambda: worker.is_cancelled, system)
        except Exception as e:  # noqa: BLE001 - a failed load or answer is shown, the app lives on
            line = getattr(e, "line", None)
            self.app.call_from_thread(self._failed, turn, line() if callable(line) else f"{type(e).__name__}: {e}")
            return
        self.app.call_from_thread(self._done, turn, result)

    def on_text_arrived(self, message: TextArrived) -> None:
        text = self.buffer.drain()
        if text and self.reply is not None:
            self.reply_text += text
            self.reply.update(f"assistant: {self.reply_text}")
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def _stats(self, text: str) -> None:
        self.query_one("#chat-stats", Static).update(text)

    def _done(self, turn: int, result: engine.Answer) -> None:
        if turn != self.turn:
            return
        self.on_text_arrived(TextArrived("chat"))
        if self.reply is not None:
            self.reply.update(f"assistant: {result.text}")
        self.history.append({"role": "assistant", "content": result.text})
        detail = f"  ·  {result.detail}" if result.detail else ""
        self._stats(f"{result.strategy}: {result.tokens} tokens, {result.tokens_per_s:.1f} tok/s{detail}")
        self.busy = False

    def _failed(self, turn: int, line: str) -> None:
        if turn != self.turn:
            return
        if self.reply is not None:
            self.reply.update(f"error: {line}")
            self.reply.add_class("-bad")
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()
        self._stats("")
        self.busy = False

    def action_reset(self) -> None:
        self.workers.cancel_group(self, "chat")
        self.history, self.busy, self.reply = [], False, None
        self.turn += 1
        self.buffer.drain()
        log = self.query_one("#chat-log", VerticalScroll)
        log.remove_children()
        log.mount(Static("Conversation reset.", classes="hint"))
        self._stats("")

    def action_strategy(self) -> None:
        select = self.query_one("#pick-strategy", Select)
        options = list(engine.strategies())
        select.value = options[(options.index(str(select.value)) + 1) % len(options)]
        self.notify(f"strategy: {select.value}")

    def action_back(self) -> None:
        self.workers.cancel_group(self, "chat")
        self.app.pop_screen()
