"""`?`: the keys of the screen below, read from its bindings (so the list never goes stale)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

ALWAYS = [("?  F1", "this help"), ("ctrl+q", "quit (running children checkpoint first)")]


def keys_of(screen: Screen) -> list[tuple[str, str]]:
    out = []
    for b in getattr(screen, "BINDINGS", []):
        if isinstance(b, Binding) and b.description:
            keys = b.key_display or b.key.replace(",", " ")
            out.append((keys, b.tooltip or b.description))  # the tooltip: a footer label's long form
        elif isinstance(b, tuple) and len(b) >= 3:
            out.append((b[0], b[2]))
    return out


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q,f1", "close", "Close")]

    def __init__(self, below: Screen) -> None:
        super().__init__()
        self.below = below

    def compose(self) -> ComposeResult:
        name = type(self.below).__name__.removesuffix("Screen")
        lines = [f"[b]{name} keys[/b]", ""]
        lines += [f"  [b]{k:<12}[/b] {d}" for k, d in keys_of(self.below)]
        lines += ["", "[b]Everywhere[/b]", ""]
        lines += [f"  [b]{k:<12}[/b] {d}" for k, d in ALWAYS]
        lines += ["  tab/shift+tab  move between fields and buttons", "", "escape closes this help"]
        with VerticalScroll(id="help"):
            yield Static("\n".join(lines), id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
