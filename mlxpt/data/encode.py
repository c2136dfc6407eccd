"""Turn validated rows into token ids plus an explicit loss mask.

The mask is never derived from pad ids, so EOS stays trained when pad == eos. Chat rows are
rendered with the tokenizer's own chat template (Hugging Face renders it in Jinja's sandbox);
assistant spans come from rendering the conversation prefix by prefix, and each prefix must
tokenise to a prefix of the full conversation, or we refuse rather than guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxpt.data.formats import Row, raise_if_errors
from mlxpt.errors import ConfigError, DataError

MASKS = ("assistant", "prompt", "none")
OVERLONG = ("truncate", "drop", "error")


@dataclass
class Example:
    tokens: list[int]
    mask: list[int]  # mask[i] == 1: token i is a training target (predicted from tokens[:i])
    where: str


class _Tok:
    """A tokenizer plus the facts about it we need once: BOS behaviour, EOS, template."""

    def __init__(self, tokenizer):
        self.tk = tokenizer
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_text = getattr(tokenizer, "bos_token", None)
        self.template = getattr(tokenizer, "chat_template", None)
        plain = tokenizer.encode("a", add_special_tokens=False)
        special = tokenizer.encode("a", add_special_tokens=True)
        # Only add a BOS ourselves when the tokenizer would, and the text does not already carry it.
        self.adds_bos = self.bos is not None and len(special) > len(plain) and special[0] == self.bos

    def ids(self, text: str, start: bool = True) -> list[int]:
        ids = list(self.tk.encode(text, add_special_tokens=False))
        if start and self.adds_bos and not (self.bos_text and text.startswith(self.bos_text)):
            ids = [self.bos, *ids]
        return ids

    def render(self, messages, tools, generation: bool, where: str) -> str:
        try:
            out = self.tk.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation)
        except Exception as e:  # noqa: BLE001 - a template error is a data problem, not a crash
            raise DataError(
                "E204",
                f"chat template failed to render: {type(e).__name__}: {e}",
                where,
                "the model's template rejects this conversation (role order, tools?)",
            ) from None
        if not isinstance(out, str):
            raise DataError("E204", "chat template did not return text", where)
        return out


def _prefix_len(tok: _Tok, full_text: str, full: list[int], text: str, where: str) -> int:
    ids = tok.ids(text)
    if not full_text.startswith(text) or full[: len(ids)] != ids:
        raise DataError(
            "E202",
            "chat template is not prefix-stable: a rendered prefix of the conversation does not "
            "tokenise to a prefix of the whole",
            where,
            "its assistant turns cannot be located; use mask='none', the completions format, "
            "or a model whose template renders earlier turns unchanged",
        )
    return len(ids)


def _encode_chat(row: Row, tok: _Tok, mask: str, messages=None) -> tuple[list[int], list[int]]:
    if not tok.template:
        raise DataError(
            "E201",
            "chat row but the tokenizer has no chat template",
            row.where,
            "use a model with a chat template (e.g. an -Instruct model) or the text format",
        )
    msgs = messages if messages is not None else row.data["messages"]
    tools = row.data.get("tools")
    full_text = tok.render(msgs, tools, False, row.where)
    full = tok.ids(full_text)
    m = [0] * len(full)
    if mask == "none":
        m = [1] * len(full)
    else:
        first = row.data.get("train_from", 0)  # a conversational prompt-completion trains its completion only
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant" or i < first or msg.get("weight", 1) == 0:
                continue  # weight 0 (OpenAI's fine-tuning files): a turn kept as context only
            head = tok.render(msgs[:i], tools, True, row.where)
            start = _prefix_len(tok, full_text, full, head, row.where)
            if mask == "prompt":
                m[start:] = [1] * (len(full) - start)
                break
            # The turn, its end-of-turn token and the glue before the next turn are trained.
            end_text = tok.render(msgs[: i + 1], tools, False, row.where)
            end = _prefix_len(tok, full_text, full, end_text, row.where)
            m[start:end] = [1] * (end - start)
    return full, m


def _encode_plain(row: Row, tok: _Tok, mask: str) -> tuple[list[int], list[int]]:
    eos = [] if tok.eos is None else [tok.eos]
    if row.kind == "text":
        ids = tok.ids(row.data["text"])
        ids += eos if not ids or ids[-1] != tok.eos else []
        return ids, [1] * len(ids)
    prompt = tok.ids(row.data["prompt"])
    completion = tok.ids(row.data["completion"], start=False) + eos
    head = 1 if mask == "none" else 0
    return prompt + completion, [head] * len(prompt) + [1] * len(completion)


def _encode(row: Row, tok: _Tok, mask: str, max_len: int, overlong: str):
    """(Example | None, status, raw length); status in kept/truncated/too_long/untrainable."""
    if mask not in MASKS:
        raise ConfigError("E210", f"unknown mask mode {mask!r}", None, f"use one of {MASKS}")
    if overlong not in OVERLONG:
        raise ConfigError(
            "E211",
            f"unknown overlong policy {overlong!r}",
            None,
            f"use one of {OVERLONG}",
        )
    if row.kind == "chat":
        tokens, m = _encode_chat(row, tok, mask)
    elif row.kind == "completions" and tok.template:
        msgs = [
            {"role": "user", "content": row.data["prompt"]},
            {"role": "assistant", "content": row.data["completion"]},
        ]
        tokens, m = _encode_chat(row, tok, mask, messages=msgs)
    else:
        tokens, m = _encode_plain(row, tok, mask)
    if m:
        m[0] = 0  # the first token has no context to be predicted from
    n = len(tokens)
    status = "kept"
    if n > max_len:
        if overlong == "drop":
            return None, "too_long", n
        if overlong == "error":
            raise DataError(
                "E203",
                f"row is {n} tokens, longer than max_len {max_len}",
                row.where,
                "shorten the row, raise max_len, or set overlong to truncate or drop",
            )
        tokens, m, status = tokens[:max_len], m[:max_len], "truncated"
    if sum(m) == 0:
        return None, "untrainable", n
    return Example(tokens=tokens, mask=m, where=row.where), status, n


def encode(
    row: Row,
    tokenizer,
    mask: str = "assistant",
    max_len: int = 2048,
    overlong: str = "truncate",
) -> Example | None:
    """Tokenise one row with its loss mask; None when it is dropped (too long or untrainable)."""
    return _encode(row, _Tok(tokenizer), mask, max_len, overlong)[0]


def encode_all(
    rows: list[Row],
    tokenizer,
    mask: str = "assistant",
    max_len: int = 2048,
    overlong: str = "truncate",
) -> tuple[list[Example], dict]:
    """Encode every row; collect all row errors into one DataError; count what was dropped."""
    tok = _Tok(tokenizer)
    out: list[Example] = []
    errors: list[DataError] = []
    keys = (
        "rows",
        "kept",
        "truncated",
        "dropped",
        "untrainable",
        "tokens",
        "trained_tokens",
    )
    report = dict.fromkeys((*keys, "max_len_seen"), 0)
    report["rows"] = len(rows)
    for row in rows:
        try:
            ex, status, n = _encode(row, tok, mask, max_len, overlong)
        except DataError as e:
            errors.append(e)
            continue
        report["max_len_seen"] = max(report["max_len_seen"], n)
        if ex is None:
            report["dropped"] += 1
            report["untrainable"] += status == "untrainable"
            continue
        out.append(ex)
        report["kept"] += 1
        report["truncated"] += status == "truncated"
        report["tokens"] += len(ex.tokens)
        report["trained_tokens"] += sum(ex.mask)
    raise_if_errors(errors, "the dataset")
    return out, report


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS, else 0 (padding is never trained)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = eos if eos is not None else 0
    return int(pad)
