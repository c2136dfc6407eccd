"""Model work for the Chat and Compare screens, run in thread workers: load (cached), then
answer with a decoding strategy. Text arrives through an `on_text` callback as plain strings;
the caller decides how it reaches the UI. No Textual here."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

BASIC = ("greedy", "sample")
SAMPLE_TEMPERATURE = 0.8

_lock = threading.Lock()
_models: dict[tuple[str, str | None], tuple] = {}
MAX_MODELS = 2  # Compare holds the base model and one adapted copy


def strategies() -> tuple[str, ...]:
    """greedy and sample always; the test-time scaling strategies once mlxpt.decode.strategies exists."""
    try:
        from mlxpt.decode.strategies import STRATEGIES
    except ImportError:
        return BASIC
    return tuple(STRATEGIES)


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
    strategy: str = "greedy",
    n: int = 4,
    max_tokens: int = 256,
    on_text: Callable[[str], None] = lambda s: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Answer:
    """Answer the last user turn of `messages`; greedy and sample stream through `on_text`."""
    from mlxpt.decode.generate import chat_prompt

    prompt = chat_prompt(tokenizer, messages)
    t0 = time.perf_counter()
    if strategy in BASIC:
        from mlxpt.decode.generate import iter_generate
        from mlxpt.decode.sampling import make_sampler

        sampler = make_sampler(temperature=0.0 if strategy == "greedy" else SAMPLE_TEMPERATURE)
        parts, tokens = [], 0
        for chunk in iter_generate(model, tokenizer, prompt, max_tokens, sampler):
            parts.append(chunk.text)
            on_text(chunk.text)
            tokens = chunk.generation_tokens or tokens + (chunk.token is not None)
            if cancelled():
                break
        return Answer("".join(parts), strategy, tokens, time.perf_counter() - t0)
    from mlxpt.decode.strategies import run_strategy

    r = run_strategy(model, tokenizer, prompt, strategy, n=n, max_tokens=max_tokens)
    on_text(r.text)
    return Answer(r.text, strategy, r.generated_tokens, r.seconds, describe(r))


def describe(result) -> str:
    """Votes (self-consistency) or scores (best-of-N), one short line."""
    if getattr(result, "votes", None) is not None:
        votes = sorted(result.votes.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k!r}: {v}" for k, v in votes[:6]) or "no answer extracted"
        return f"votes: {shown} (n={result.n_used})"
    if getattr(result, "scores", None):
        return "scores: " + ", ".join(f"{s:.3g}" for s in result.scores[:8]) + f" (n={result.n_used})"
    return f"n={getattr(result, 'n_used', 1)}"
