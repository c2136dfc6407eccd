"""Prompt sets for RL with verifiable rewards: read, validate and encode `{"prompt", "answer"}` JSONL.

`prompt` is a string or a message list ending in a user turn; an optional `system` string is
prepended. Chat rows in the SFT form (`{"messages": [...], "answer": ...}`) are accepted too:
their last assistant turn is dropped and the rest is the prompt, so an SFT test file is a prompt
set. Every other field (e.g. `answer`) is passed through to the reward functions. Problems are
one-line DataErrors (E171-E179, file:line, hint), all collected before any model is read.

Prompts are never truncated (a cut question has no right answer): a prompt that leaves fewer than
`max_completion_length` tokens within `max_seq_len` is dropped and counted, or with
`overlong=error` reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.data.encode import _Tok
from mlxpt.data.formats import raise_if_errors, resolve_splits
from mlxpt.data.lines import ObjectLines
from mlxpt.data.row_checks import _tname
from mlxpt.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class PromptRow:
    where: str  # "path:line"
    prompt: str | list[dict]  # as given (what reward functions see)
    messages: list[dict]  # system + conversation, ending with a user turn
    chat: bool  # False: a plain string prompt
    fields: dict = field(default_factory=dict)  # every other field, e.g. answer


@dataclass
class PromptExample:
    tokens: list[int]  # the rendered prompt, generation cue included
    row: PromptRow


def _check_messages(msgs, err) -> list[dict] | None:
    if not isinstance(msgs, list) or not msgs:
        return err("E172", "'prompt' must be a non-empty string or a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return err("E172", f"message {i + 1} must be an object with string 'role' and 'content'", None)
        if m["role"] not in ROLES:
            return err("E172", f"message {i + 1} has role {m['role']!r}", f"use one of {', '.join(ROLES)}")
    if msgs[-1]["role"] != "user":
        return err("E174", "the prompt must end with a user message", "drop trailing assistant turns")
    if not any(m["content"].strip() for m in msgs if m["role"] == "user"):
        return err("E171", "the prompt has no text", "write the question in the user message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _check(obj: dict, where: str, err, require: tuple[str, ...]) -> PromptRow | None:
    if "prompt" in obj:
        given = obj["prompt"]
        if isinstance(given, str):
            if not given.strip():
                return err("E171", "'prompt' is empty", "write the question")
            msgs, chat = [{"role": "user", "content": given}], False
        else:
            msgs, chat = _check_messages(given, err), True
            if msgs is None:
                return None
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "system")}
    elif "messages" in obj:  # an SFT chat row: the prompt is everything before the last reply
        convo = obj["messages"]
        if isinstance(convo, list) and convo and isinstance(convo[-1], dict) and convo[-1].get("role") == "assistant":
            convo = convo[:-1]
        msgs, chat, given = _check_messages(convo, err), True, convo
        if msgs is None:
            return None
        rest = {k: v for k, v in obj.items() if k not in ("messages", "system")}
    else:
        return err("E171", "no 'prompt' field", 'write {"prompt": "...", "answer": "..."}')
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            return err("E172", f"'system' is {_tname(system)}, expected a string")
        if msgs[0]["role"] == "system":
            return err("E172", "both 'system' and a system message in the prompt", "keep one of them")
        msgs, chat = [{"role": "system", "content": system}, *msgs], True
    for name in require:
        if rest.get(name) is None:
            return err(
                "E173",
                f"no {name!r} field",
                f"the chosen reward functions (or rft's --rationalize) need {name!r} on every row",
            )
    return PromptRow(where, given, msgs, chat, rest)


def scan_prompts(path: str | os.PathLike, require: tuple[str, ...] = ()) -> tuple[list[PromptRow], list[DataError]]:
    """(valid rows, one DataError per problem); never raises."""
    lines = ObjectLines(path, '{"prompt": "...", "answer": "..."}')
    rows: list[PromptRow] = []
    for where, obj in lines:

        def err(code, what, hint=None, _where=where):
            lines.err(code, what, _where, hint)

        row = _check(obj, where, err, require)
        if row is not None:
            rows.append(row)
    if lines.nonblank == 0 and not lines.errors:
        lines.err("E103", "file is empty (no rows)", f"{path}:1", "add prompt rows")
    return rows, lines.errors


def load_prompts(
    path: str | os.PathLike, valid: str | None = None, require: tuple[str, ...] = ()
) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train rows, valid rows); `path` is a file or a folder with train.jsonl (+ valid/test.jsonl).
    Raises one DataError listing every problem."""
    p = Path(path)
    if valid is None and p.is_dir() and not (p / "valid.jsonl").exists() and (p / "test.jsonl").exists():
        valid = str(p / "test.jsonl")
    train_path, valid_path = resolve_splits(path, valid)
    train, errors = scan_prompts(train_path, require)
    valid_rows: list[PromptRow] = []
    if valid_path is not None:
        valid_rows, verr = scan_prompts(valid_path, require)
        errors += verr
    raise_if_errors(errors, p.name)
    return train, valid_rows


def encode_prompts(
    rows: list[PromptRow], tokenizer, max_seq_len: int, max_completion_length: int, overlong: str
) -> tuple[list[PromptExample], dict]:
    """Render and tokenise each prompt; see the module doc for over-long prompts."""
    tok = _Tok(tokenizer)
    budget = max_seq_len - max_completion_length
    if budget < 1:
        raise DataError(
            "E176",
            f"max_seq_len {max_seq_len} leaves no room for the prompt beside max_completion_length {max_completion_length}",
            "max_seq_len",
            "raise --max-seq-len or lower --max-completion-length",
        )
    out: list[PromptExample] = []
    dropped = 0
    longest = 0
    for row in rows:
        if tok.template:
            tokens = tok.ids(tok.render(row.messages, None, True, row.where))
        elif row.chat:
            raise DataError(
                "E177", "chat-form prompt but the tokenizer has no chat template", row.where, "use a string prompt"
            )
        else:
            tokens = tok.ids(row.messages[-1]["content"])
        longest = max(longest, len(tokens))
        if len(tokens) > budget:
            if overlong == "error":
                raise DataError(
                    "E175",
                    f"prompt is {len(tokens)} tokens; with max_completion_length {max_completion_length} "
                    f"it exceeds max_seq_len {max_seq_len}",
                    row.where,
                    "raise --max-seq-len, or --overlong drop",
                )
            dropped += 1
            continue
        out.append(PromptExample(tokens, row))
    return out, {"rows": len(rows), "kept": len(out), "dropped_overlong": dropped, "longest_prompt": longest}
