"""Preference pairs: read, validate and encode `{"prompt", "chosen", "rejected"}` JSONL.

Two forms, as in TRL: every field a string, or chat form (`prompt` a message list ending in a
user turn, `chosen`/`rejected` lists of assistant messages); an optional `system` string is
prepended. TRL's implicit-prompt chat rows (`chosen`/`rejected` whole conversations, no `prompt`)
are split where the two conversations part, at the last shared user turn. Problems are one-line
DataErrors (E180-E199, E145, file:line, hint), all collected before any model is read. Pairs
whose chosen and rejected agree after whitespace normalisation carry no signal (loss ln 2): they
are dropped and counted, and more than 5% of them is an error.

Encoding renders the chat template twice: prompt tokens = template(prompt, generation prompt),
response tokens = template(prompt + response) minus that prefix, which must be a token prefix
(or we refuse rather than guess). The response's end-of-turn token is trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlxpt.data.encode import Example, _Tok
from mlxpt.data.formats import raise_if_errors, resolve_splits
from mlxpt.data.lines import ObjectLines
from mlxpt.data.row_checks import _tname
from mlxpt.errors import ConfigError, DataError

MAX_IDENTICAL = 0.05  # more identical pairs than this fraction of rows is a data error
PROMPT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class PrefRow:
    where: str  # "path:line"
    prompt: list[dict]  # messages, ending with a user turn
    chosen: list[dict]  # assistant messages
    rejected: list[dict]
    chat: bool  # False: the string form (plain text when the tokenizer has no chat template)
    source: str = "pairs"  # as written: pairs (strings), conversational pairs, implicit-prompt pairs


@dataclass
class PrefExample:
    prompt: list[int]
    chosen: list[int]  # response tokens only, end-of-turn included
    rejected: list[int]
    where: str
    ref_chosen: float = 0.0  # summed reference log-probs of each response (set before training)
    ref_rejected: float = 0.0

    def rows(self) -> tuple[Example, Example]:
        """The two sequences with their loss masks (only response tokens are trained)."""
        p = [0] * len(self.prompt)
        return (
            Example(self.prompt + self.chosen, p + [1] * len(self.chosen), self.where),
            Example(self.prompt + self.rejected, p + [1] * len(self.rejected), self.where),
        )


def _norm(msgs: list[dict]) -> str:
    return "\n".join(" ".join(m["content"].split()) for m in msgs)


def _messages(v, key: str, err, assistant: bool) -> list[dict] | None:
    if not v:
        return err("E184" if assistant else "E182", f"{key!r} is an empty list", f"give {key!r} at least one message")
    for j, m in enumerate(v):
        at = f"{key}[{j}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return err("E186", f"{at} is not a message with a string 'role'", 'write {"role": ..., "content": "..."}')
        role, content = m["role"], m.get("content")
        if assistant and role != "assistant":
            return err("E187", f"{at} has role {role!r}, expected assistant", "responses hold assistant turns only")
        if role not in PROMPT_ROLES:
            return err("E186", f"{at} has unknown role {role!r}", f"use one of {', '.join(PROMPT_ROLES)}")
        if not isinstance(content, str):
            return err("E186", f"{at} content is {_tname(content)}, expected a string", "flatten content to a string")
        if not content.strip():
            code = "E184" if assistant else "E182"
            return err(code, f"{at} ({role}) content is empty or whitespace", "write its text or drop the row")
    if not assistant and v[-1]["role"] != "user":
        return err("E188", f"prompt ends with a {v[-1]['role']} turn, not user", "end the prompt with the user turn")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _split_implicit(obj: dict, err) -> dict | None:
    """TRL's implicit-prompt row as an explicit one: the prompt is the shared head of both
    conversations up to its last user turn; what follows is each response."""
    chosen, rejected = obj["chosen"], obj["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    users = [i for i in range(shared) if isinstance(chosen[i], dict) and chosen[i].get("role") == "user"]
    if not users:
        return err(
            "E145",
            f"implicit-prompt pair: 'chosen' and 'rejected' share no opening user turn (they differ at [{shared}])",
            "start both conversations with the same prompt, or give it as 'prompt'",
        )
    cut = users[-1] + 1
    later = [m for m in chosen[cut:] + rejected[cut:] if isinstance(m, dict) and m.get("role") != "assistant"]
    if later:  # once E187 with an index into the derived responses, not into the file's lists
        return err(
            "E145",
            f"implicit-prompt pair: 'chosen' and 'rejected' differ at [{shared}], before their last user turn",
            "a pair shares the conversation up to its last assistant reply: make one pair per reply that differs",
        )
    return {**obj, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _check(obj: dict, where: str, err) -> PrefRow | None:
    source = "pairs"
    if "prompt" not in obj and all(isinstance(obj.get(k), list) for k in ("chosen", "rejected")):
        obj, source = _split_implicit(obj, err), "implicit-prompt pairs"
        if obj is None:
            return None
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        keys = ", ".join(sorted(obj)[:6]) or "none"
        return err(
            "E180", f"missing {', '.join(map(repr, missing))} (found: {keys})", 'write {"prompt", "chosen", "rejected"}'
        )
    prompt = obj["prompt"]
    system = obj.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        return err("E189", f"'system' is {_tname(system)!s} or empty, expected a non-empty string", "fix or remove it")
    if isinstance(prompt, str):
        if not prompt.strip():
            return err("E182", "'prompt' is empty or whitespace", "write the prompt or drop the row")
        for key in ("chosen", "rejected"):
            v = obj[key]
            if not isinstance(v, str):
                hint = "with a string prompt, responses are strings too"
                return err(
                    "E185" if isinstance(v, list) else "E183", f"{key!r} is {_tname(v)}, expected a string", hint
                )
            if not v.strip():
                return err("E184", f"{key!r} is an empty response", "write the response or drop the row")
        msgs = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": obj["chosen"]}]
        rejected = [{"role": "assistant", "content": obj["rejected"]}]
        chat = False
    elif isinstance(prompt, list):
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], list):
                hint = "with a message-list prompt, responses are lists of assistant messages"
                code = "E185" if isinstance(obj[key], str) else "E183"
                return err(code, f"{key!r} is {_tname(obj[key])}, expected a list of messages", hint)
        msgs = _messages(prompt, "prompt", err, assistant=False)
        chosen = msgs and _messages(obj["chosen"], "chosen", err, assistant=True)
        rejected = chosen and _messages(obj["rejected"], "rejected", err, assistant=True)
        if not rejected:
            return None
        if any(m["role"] == "system" for m in msgs[1:]):
            return err("E189", "system message not first in the prompt", "put one system message first")
        chat = True
        source = "conversational pairs" if source == "pairs" else source
    else:
        return err("E181", f"'prompt' is {_tname(prompt)}, expected a string or a message list", "fix the prompt")
    if system is not None:
        if msgs[0]["role"] == "system":
            return err("E189", "both 'system' and a system message in the prompt", "keep one of them")
        msgs = [{"role": "system", "content": system}, *msgs]
    return PrefRow(where, msgs, chosen, rejected, chat, source)


def scan_preference(path: str | os.PathLike) -> tuple[list[PrefRow], int, list[DataError]]:
    """(valid rows, identical pairs dropped, one DataError per problem); never raises."""
    lines = ObjectLines(path, '{"prompt", "chosen", "rejected"}')
    rows: list[PrefRow] = []
    identical = 0
    for where, obj in lines:

        def err(code, what, hint=None, _where=where):
            lines.err(code, what, _where, hint)

        row = _check(obj, where, err)
        if row is None:
            continue
        if _norm(row.chosen) == _norm(row.rejected):
            identical += 1  # no preference signal: dropped and counted
            continue
        rows.append(row)
    errors, nonblank, name = lines.errors, lines.nonblank, str(path)
    if nonblank == 0 and not errors:
        errors.append(DataError("E103", "file is empty (no rows)", f"{name}:1", "add preference rows"))
    elif not errors and identical > MAX_IDENTICAL * nonblank:
        errors.append(
            DataError(
                "E190",
                f"{identical} of {nonblank} pairs have identical chosen and rejected responses",
                name,
                "such pairs carry no preference signal; fix how the pairs were made",
            )
        )
    return rows, identical, errors


def load_preference(path: str | os.PathLike, valid: str | None = None) -> tuple[list[PrefRow], list[PrefRow], dict]:
    """(train rows, valid rows, {split: identical pairs dropped}); raises one DataError for all problems."""
    try:
        train_path, valid_path = resolve_splits(path, valid)
    except DataError as e:
        raise e from None
    train, same, errors = scan_preference(train_path)
    counts = {"train": same}
    valid_rows: list[PrefRow] = []
    if valid_path is not None:
        valid_rows, counts["valid"], verr = scan_preference(valid_path)
        errors += verr
    raise_if_errors(errors, Path(path).name)
    return train, valid_rows, counts


def _encode(row: PrefRow, tok: _Tok) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids, the responses without the prompt prefix."""
    if not tok.template:
        if row.chat:
            raise DataError(
                "E193", "chat-form pair but the tokenizer has no chat template", row.where, "use a model with one"
            )
        eos = [] if tok.eos is None else [tok.eos]
        prompt = tok.ids(row.prompt[-1]["content"])
        return prompt, *(tok.ids(r[0]["content"], start=False) + eos for r in (row.chosen, row.rejected))
    head_text = tok.render(row.prompt, None, True, row.where)
    head = tok.ids(head_text)
    out = []
    for resp in (row.chosen, row.rejected):
        text = tok.render(row.prompt + resp, None, False, row.where)
        full = tok.ids(text)
        if not text.startswith(head_text) or full[: len(head)] != head:
            raise DataError(
                "E194",
                "chat template is not prefix-stable: the rendered prompt does not tokenise to a prefix of prompt + response",
                row.where,
                "use a model whose template renders the prompt unchanged before the reply",
            )
        out.append(full[len(head) :])
    return head, out[0], out[1]


def encode_preference(rows: list[PrefRow], tokenizer, max_len: int, overlong: str) -> tuple[list[PrefExample], dict]:
    """Encode every pair; over-length responses follow `overlong` (truncate/drop/error).

    The prompt is never truncated: a pair whose prompt leaves no room for a response is dropped
    and counted. Returns (examples, report).
    """
    if overlong not in ("truncate", "drop", "error"):
        raise ConfigError("E211", f"unknown overlong policy {overlong!r}", None, "use truncate, drop or error")
    tok = _Tok(tokenizer)
    report = dict.fromkeys(("rows", "kept", "truncated", "dropped_too_long", "dropped_no_room", "dropped_same"), 0)
    report["rows"] = len(rows)
    report["max_len_seen"] = 0
    out: list[PrefExample] = []
    errors: list[DataError] = []
    for row in rows:
        try:
            prompt, chosen, rejected = _encode(row, tok)
        except DataError as e:
            errors.append(e)
            continue
        n = len(prompt) + max(len(chosen), len(rejected))
        report["max_len_seen"] = max(report["max_len_seen"], n)
        if n > max_len:
            if overlong == "error":
                errors.append(
                    DataError(
                        "E192",
                        f"pair is {n} tokens, longer than max_seq_len {max_len}",
                        row.where,
                        "shorten it, raise --max-seq-len, or set --overlong truncate or drop",
                    )
                )
                continue
            room = max_len - len(prompt)
            if overlong == "drop" or room < 1:
                report["dropped_no_room" if room < 1 else "dropped_too_long"] += 1
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            report["truncated"] += 1
            if chosen == rejected:  # truncation cut away the difference
                report["dropped_same"] += 1
                continue
        out.append(PrefExample(prompt, chosen, rejected, row.where))
        report["kept"] += 1
    raise_if_errors(errors, "the preference data")
    return out, report
