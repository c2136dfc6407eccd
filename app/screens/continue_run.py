"""Continue with …: pick the method of a new run that starts from a finished run's adapter."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from app import form

# What usually follows what: SFT teaches the format, DPO/GRPO then align or reinforce it.
NEXT = {"sft": "dpo", "dpo": "grpo", "simpo": "grpo", "orpo": "grpo"}


class ContinueScreen(ModalScreen[str | None]):
    """Dismisses with the chosen method, or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, run_name: str, method: str) -> None:
        super().__init__()
        self.run_name, self.method = run_name, method

    def compose(self) -> ComposeResult:
        methods = form.methods()
        with Vertical(id="continue"):
            yield Static(f"Continue from [b]{self.run_name}[/b] ({self.method}) with:", id="continue-title")
            yield OptionList(*[Option(m, id=m) for m in methods], id="continue-methods")
            yield Static("enter opens the New run form with its adapter as the start · esc cancels", classes="hint")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        want = NEXT.get(self.method, "dpo")
        options.highlighted = options.get_option_index(want) if want in form.methods() else 0
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
