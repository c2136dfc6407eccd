"""Prompt building and streaming generation on top of mlx-lm's `stream_generate`.

`iter_generate` yields one `GenerationChunk` per decoded text segment; the last chunk carries
the finish reason and speed. Generation stops at any of the tokenizer's EOS / end-of-turn ids
(the wrapper's `eos_token_ids`, plus the chat template's end-of-turn token when it has one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mlxpt.errors import ConfigError, ModelError

# End-of-turn markers of common chat templates; added to the stop ids when the vocab has them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class GenerationChunk:
    """A piece of streamed text. `finish_reason` and the speeds are set on the last chunk."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS / end of turn) | "length" (max_tokens)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0  # tokens generated, not counting the stop token
    generation_tps: float = 0.0


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def chat_prompt(tokenizer, messages: list[dict], system: str | None = None) -> list[int]:
    """Token ids for `messages` rendered by the chat template, ending with the assistant cue.

    Without a chat template, the raw text of the last user message is used, and a system prompt
    (which it has no place for: once dropped without a word) is refused, E603."""
    if system:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    if not getattr(tokenizer, "has_chat_template", False):
        if any(m["role"] == "system" for m in messages):
            raise ModelError(
                "E603", "the model has no chat template, so a system prompt has no place in the prompt",
                "chat_template", "drop --system (or the system message), or use a model with a chat template",
            )  # fmt: skip
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ConfigError("E602", "no user message to generate from", "prompt", "give a prompt")
        return _encode(tokenizer, users[-1])
    from jinja2 import TemplateError

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except (TemplateError, ValueError, TypeError, KeyError) as e:  # e.g. no system role
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            "E603",
            f"the chat template failed: {first}",
            "chat_template",
            "drop --system (or /system in chat), or pass --raw to generate",
        ) from None
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def add_stop_tokens(tokenizer):
    """The mlx-lm TokenizerWrapper for `tokenizer`, with the vocab's end-of-turn tokens added to
    its EOS ids (an untrained or template-only end-of-turn token would otherwise never stop)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN:
        if t in vocab and vocab[t] not in tokenizer.eos_token_ids:
            tokenizer.add_eos_token(t)
    return tokenizer


def iter_generate(
    model,
    tokenizer,
    prompt_tokens: list[int],
    max_tokens: int = 256,
    sampler: Callable | None = None,
    repetition_penalty: float | None = None,
) -> Iterator[GenerationChunk]:
    """Stream the continuation of `prompt_tokens` as text chunks; see GenerationChunk."""
    if max_tokens < 1:
        raise ConfigError(
            "E604",
            f"max-tokens={max_tokens} is out of range",
            "--max-tokens",
            "use a whole number >= 1",
        )
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ConfigError(
            "E605",
            f"repetition-penalty={repetition_penalty} is out of range",
            "--repetition-penalty",
            "use a value > 0 (1: off)",
        )
    if not prompt_tokens:
        raise ConfigError("E602", "the prompt is empty", "prompt", "give a non-empty prompt")
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    from mlxpt.decode.sampling import make_sampler

    tokenizer = add_stop_tokens(tokenizer)  # stream_generate stops on tokenizer.eos_token_ids
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    for r in stream_generate(
        model,
        tokenizer,
        list(prompt_tokens),
        max_tokens=max_tokens,
        sampler=sampler or make_sampler(),
        logits_processors=processors,
    ):
        if r.finish_reason is None:
            yield GenerationChunk(r.text, r.token)
            continue
        stopped = r.finish_reason == "stop"
        yield GenerationChunk(
            r.text,
            None if stopped else r.token,
            r.finish_reason,
            r.prompt_tokens,
            r.prompt_tps,
            r.generation_tokens - (1 if stopped else 0),
            r.generation_tps,
        )


def generate_text(model, tokenizer, prompt_tokens: list[int], **kwargs) -> str:
    """The whole continuation as one string (see iter_generate for the arguments)."""
    return "".join(c.text for c in iter_generate(model, tokenizer, prompt_tokens, **kwargs))
