"""Model work for the Chat and Compare screens, run in thread workers: load (cached), then
answer with a decoding strategy through the library's `run_strategy` (the function the CLI's
generate and chat call), on a `DecodeConfig` with the library's defaults (`decode_config`).
Text arrives through an `on_text` callback as plain strings; the caller decides how it reaches
the UI. No Textual here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from mlxpt.decode.options import DecodeConfig

CHAT_N = 4  # the Chat screen's n for best-of-N, self-consistency and beam until the user sets one
CHAT_BUDGET_PER_N = 64  # auto: the Chat screen's token budget is n x this (built-in rule, no table)

_lock = threading.Lock()
_models: dict[tuple[str, str | None], tuple] = {}
MAX_MODELS = 2  # Compare holds the base model and one adapted copy


def strategies() -> tuple[str, ...]:
    """The names of the library's decoding strategies, in its order (greedy first)."""
    from mlxpt.decode.strategies import STRATEGIES

    return tuple(STRATEGIES)


def decode_config(strategy: str = "greedy", n: int = CHAT_N, max_tokens: int = 256) -> DecodeConfig:
    """The DecodeConfig of a chat choice: the library's defaults (temperature included) with `n` for
    best-of-N, self-consistency and beam; greedy and sample are one streamed answer (n 1); `auto`
    spends up to n x CHAT_BUDGET_PER_N generated tokens, chosen by the built-in rule."""
    if strategy == "auto":
        return DecodeConfig(strategy, n, max_tokens, budget=n * CHAT_BUDGET_PER_N)
    return DecodeConfig(strategy, 1 if strategy in ("greedy", "sample") else n, max_tokens)


def base_model_for(adapter: str | None, model: str | None) -> str:
    from mlxpt.config import DEFAULT_MODEL

    if model:
        return model
    if adapter:
        from mlxpt.fuse import base_model_of

        return (base_model_of(adapter) or {}).get("model") or DEFAULT_MODEL
    return DEFAULT_MODEL


def load_model(model: str | None, adapter: str | None):
    """(model, tokenizer), cached; the model defaults to the adapter run's base model."""
    ref = base_model_for(adapter, model)
    key = (ref, adapter)
    with _lock:
        if key not in _models:
            from mlxpt.models.loader import load

            while len(_models) >= MAX_MODELS:
                _models.pop(next(iter(_models)))
            _models[key] = load(ref, adapter=adapter)
        return _models[key]


@dataclass
class Answer:
    text: str
    strategy: str
    tokens: int
    seconds: float
    detail: str = ""  # votes or scores, for best-of-N and self-consistency

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def answer(
    model,
    tokenizer,
    messages: list[dict],
    cfg: DecodeConfig,
    on_text: Callable[[str], None] = lambda s: None,
    cancelled: Callable[[], bool] = lambda: False,
    system: str | None = None,
) -> Answer:
    """Answer the last user turn of `messages` (under the `system` prompt, if any) with
    `run_strategy`; greedy and sample stream through `on_text` (and stop early once
    `cancelled()`), the other strategies send their chosen answer."""
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.decode.strategies import run_strategy

    prompt = chat_prompt(tokenizer, messages, system or None)
    r = run_strategy(model, tokenizer, prompt, cfg, on_chunk=lambda c: on_text(c.text), cancelled=cancelled)
    if cfg.streamed:
        return Answer(r.text, cfg.strategy, r.generated_tokens, r.seconds)
    on_text(r.text)
    return Answer(r.text, cfg.strategy, r.generated_tokens, r.seconds, describe(r))


def describe(result) -> str:
    """Votes (self-consistency) or scores (best-of-N), one short line; auto's choice first."""
    if getattr(result, "auto", None) is not None:
        from dataclasses import replace

        from mlxpt.decode.budget import describe as describe_auto

        return describe_auto(result.auto) + "; " + describe(replace(result, auto=None))
    if getattr(result, "votes", None) is not None:
        votes = sorted(result.votes.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k!r}: {v}" for k, v in votes[:6]) or "no answer extracted"
        return f"votes: {shown} (n={result.n_used})"
    if getattr(result, "scores", None):
        return "scores: " + ", ".join(f"{s:.3g}" for s in result.scores[:8]) + f" (n={result.n_used})"
    return f"n={getattr(result, 'n_used', 1)}"
