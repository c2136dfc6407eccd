"""Messages the TUI posts: small dataclasses; progress messages collapse with `can_replace`."""

from __future__ import annotations

from textual.message import Message


class RunUpdated(Message):
    """A run's RunLog changed (events arrived, or its child exited). A flood collapses to one."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunUpdated) and message.key == self.key


class TextArrived(Message):
    """Streamed text is waiting in a buffer for pane `target`; the handler drains the buffer."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TextArrived) and message.target == self.target


class EvalProgress(Message):
    """An evaluation worker moved on: `label` (base/adapter) has scored `done` of `total` prompts."""

    def __init__(self, label: str, done: int, total: int) -> None:
        super().__init__()
        self.label, self.done, self.total = label, done, total

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EvalProgress)
