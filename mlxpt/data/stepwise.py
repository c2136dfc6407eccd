"""Stepwise supervision for a process reward model: read, validate and encode TRL's
`{"prompt", "completions": [step, ...], "labels": [...]}` JSONL.

`prompt` is a string, or (chat form) a message list ending in a user turn; an optional `system`
string is prepended. `completions` are the solution's steps in order, `labels` one per step: true /
false, or a number in [0, 1] (a soft label: the share of continuations from that step that reach
the right answer, as `mlxpt data label-steps --soft` writes). Other fields ride along unread.
Problems are one-line DataErrors (E146-E149, E152-E159; message problems of a chat prompt are
E147 with the preference reader's wording), all collected before any model is read.

Encoding (the same for training and for scoring, decode/prm.py): the prompt as the chat template
renders it with the assistant cue (no template: its text and the delimiter), then each step
followed by the step delimiter, each such piece tokenised on its own. A step's label sits on the
last token of its piece, so the scores of a prefix of steps never depend on the steps after it.
Rows longer than `max_seq_len` lose their last steps, never a part of one (or are dropped, or
are an error: `overlong`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlxpt.data.encode import _Tok
from mlxpt.data.formats import raise_if_errors, resolve_splits
from mlxpt.data.lines import ObjectLines
from mlxpt.data.preference import _messages
from mlxpt.data.row_checks import _tname
from mlxpt.errors import ConfigError, DataError

KEYS = ("prompt", "completions", "labels")
SHAPE = '{"prompt": "...", "completions": ["step", ...], "labels": [true, false, ...]}'
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}
DEFAULT_DELIMITER = "\n"


def step_delimiter(text: str) -> str:
    """The delimiter a setting names: `\\n`, `\\t`, `\\r` and `\\\\` typed as two characters
    are read as escapes (a shell or a YAML plain scalar cannot easily hold a newline)."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ESCAPES:
            out.append(ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def check_delimiter(text: str, where: str = "step_delimiter") -> str:
    """The delimiter as text (escapes read), or E530 when it is empty."""
    if not isinstance(text, str) or not step_delimiter(text):
        raise ConfigError("E530", "the step delimiter is empty", where, "use \\n (the default) or another text")
    return step_delimiter(text)


def split_steps(text: str, delimiter: str = DEFAULT_DELIMITER) -> list[str]:
    """A solution's steps: its text cut at each delimiter, blank pieces dropped, the rest as is."""
    return [s for s in text.split(delimiter) if s.strip()]


@dataclass
class StepRow:
    where: str  # "path:line"
    prompt: list[dict]  # messages, system first if any, ending with a user turn
    steps: list[str]
    labels: list[float]  # each in [0, 1]; true is 1.0, false 0.0
    chat: bool  # False: the string form (plain text when the tokenizer has no chat template)
    source: str = "stepwise"  # as written: "stepwise" (string prompt) or "conversational stepwise"


@dataclass
class StepExample:
    tokens: list[int]
    ends: list[int]  # index in `tokens` of each step's last token (its delimiter's)
    labels: list[float]
    where: str


def _label(v) -> float | None:
    """A label as a float in [0, 1], or None when it is not one."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1:
        return float(v)
    return None


def _prompt(obj: dict, err) -> tuple[list[dict], bool] | None:
    """(messages, chat) of a row's prompt and optional system string."""
    prompt, system = obj["prompt"], obj.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        return err("E155", f"'system' is {_tname(system)} or empty, expected a non-empty string", "fix or remove it")
    if isinstance(prompt, str):
        if not prompt.strip():
            return err("E147", "'prompt' is empty or whitespace", "write the question or drop the row")
        msgs, chat = [{"role": "user", "content": prompt}], False
    elif isinstance(prompt, list):
        # the preference reader's message checks, reported under this format's code
        msgs = _messages(prompt, "prompt", lambda code, what, hint=None: err("E147", what, hint), assistant=False)
        if msgs is None:
            return None
        if any(m["role"] == "system" for m in msgs[1:]):
            return err("E147", "system message not first in the prompt", "put one system message first")
        chat = True
    else:
        return err("E147", f"'prompt' is {_tname(prompt)}, expected a string or a message list", "fix the prompt")
    if system is not None:
        if msgs[0]["role"] == "system":
            return err("E155", "both 'system' and a system message in the prompt", "keep one of them")
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs, chat


def check_row(obj: dict, where: str, err) -> StepRow | None:
    """The row as a StepRow, or None after reporting its first problem through `err(code, what, hint)`."""
    missing = [k for k in KEYS if k not in obj]
    if missing:
        keys = ", ".join(sorted(obj)[:6]) or "none"
        return err("E146", f"missing {', '.join(map(repr, missing))} (found: {keys})", f"write {SHAPE}")
    got = _prompt(obj, err)
    if got is None:
        return None
    msgs, chat = got
    steps, labels = obj["completions"], obj["labels"]
    if not isinstance(steps, list) or not steps:
        what = "an empty list" if isinstance(steps, list) else _tname(steps)
        return err("E148", f"'completions' is {what}, expected a non-empty list of steps", "one string per step")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            return err("E148", f"completions[{i}] is {_tname(s)}, expected a string", "one string per step")
        if not s.strip():
            return err("E149", f"completions[{i}] (step {i + 1}) is empty or whitespace", "write the step or drop it")
    if not isinstance(labels, list):
        return err("E152", f"'labels' is {_tname(labels)}, expected a list", "one label per step")
    if len(labels) != len(steps):
        return err(
            "E153", f"{len(labels)} labels for {len(steps)} steps", "give exactly one label per entry of 'completions'"
        )
    values = []
    for i, v in enumerate(labels):
        x = _label(v)
        if x is None:
            shown = repr(v) if isinstance(v, (int, float, str)) else _tname(v)
            return err("E154", f"labels[{i}] is {shown}, expected true, false or a number in [0, 1]", "fix the label")
        values.append(x)
    return StepRow(where, msgs, list(steps), values, chat, "conversational stepwise" if chat else "stepwise")


def scan_stepwise(path: str | os.PathLike) -> tuple[list[StepRow], list[DataError]]:
    """(valid rows, one DataError per problem); never raises."""
    lines = ObjectLines(path, SHAPE)
    rows: list[StepRow] = []
    for where, obj in lines:

        def err(code, what, hint=None, _where=where):
            lines.err(code, what, _where, hint)

        row = check_row(obj, where, err)
        if row is not None:
            rows.append(row)
    if lines.nonblank == 0 and not lines.errors:
        lines.err("E103", "file is empty (no rows)", f"{path}:1", "add stepwise rows")
    return rows, lines.errors


def load_stepwise(path: str | os.PathLike, valid: str | None = None) -> tuple[list[StepRow], list[StepRow]]:
    """(train rows, valid rows) of a file, or a folder with train.jsonl (+ valid.jsonl); raises one
    DataError listing every problem of both files."""
    train_path, valid_path = resolve_splits(path, valid)
    train, errors = scan_stepwise(train_path)
    valid_rows: list[StepRow] = []
    if valid_path is not None:
        valid_rows, verr = scan_stepwise(valid_path)
        errors += verr
    raise_if_errors(errors, Path(path).name)
    return train, valid_rows


def encode_head(tok: _Tok, prompt: list[dict], chat: bool, delimiter: str, where: str) -> list[int]:
    """Token ids of the prompt, as the steps follow it (see the module doc)."""
    if tok.template:
        return tok.ids(tok.render(prompt, None, True, where))
    if chat:
        raise DataError(
            "E156", "chat-form prompt but the tokenizer has no chat template", where, "use a string prompt"
        )  # fmt: skip
    return tok.ids(prompt[-1]["content"] + delimiter)


def encode_steps(tok: _Tok, head: list[int], steps: list[str], delimiter: str) -> tuple[list[int], list[int]]:
    """(tokens, end index of each step): `head`, then each step and the delimiter, tokenised piece by piece."""
    tokens, ends = list(head), []
    for s in steps:
        tokens += tok.ids(s + delimiter, start=False)
        ends.append(len(tokens) - 1)
    return tokens, ends


def encode_stepwise(
    rows: list[StepRow], tokenizer, delimiter: str, max_len: int, overlong: str
) -> tuple[list[StepExample], dict]:
    """Encode every row; see the module doc for rows over `max_len`. Returns (examples, report)."""
    if overlong not in ("truncate", "drop", "error"):
        raise ConfigError("E211", f"unknown overlong policy {overlong!r}", None, "use truncate, drop or error")
    tok = _Tok(tokenizer)
    report = {"rows": len(rows), "kept": 0, "steps": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_room": 0}
    report["max_len_seen"] = 0
    out: list[StepExample] = []
    errors: list[DataError] = []
    for row in rows:
        try:
            head = encode_head(tok, row.prompt, row.chat, delimiter, row.where)
        except DataError as e:
            errors.append(e)
            continue
        tokens, ends = encode_steps(tok, head, row.steps, delimiter)
        report["max_len_seen"] = max(report["max_len_seen"], len(tokens))
        labels = list(row.labels)
        if len(tokens) > max_len:
            if overlong == "error":
                errors.append(
                    DataError(
                        "E157", f"row is {len(tokens)} tokens, longer than max_seq_len {max_len}", row.where,
                        "shorten it, raise --max-seq-len, or set --overlong truncate or drop",
                    )
                )  # fmt: skip
                continue
            fit = sum(e < max_len for e in ends)  # whole steps only
            if overlong == "drop" or fit == 0:
                report["dropped_no_room" if fit == 0 else "dropped_too_long"] += 1
                continue
            tokens, ends, labels = tokens[: ends[fit - 1] + 1], ends[:fit], labels[:fit]
            report["truncated"] += 1
        out.append(StepExample(tokens, ends, labels, row.where))
        report["kept"] += 1
        report["steps"] += len(ends)
    raise_if_errors(errors, "the stepwise data")
    return out, report


def describe(rows: list[StepRow]) -> str:
    """`N rows (forms), S steps, P % labelled correct, Q soft`: what a split holds."""
    forms = ", ".join(f"{k} {n}" for k, n in sorted(Counter(r.source for r in rows).items())) or "none"
    labels = [x for r in rows for x in r.labels]
    good = sum(x >= 0.5 for x in labels)
    soft = sum(0 < x < 1 for x in labels)
    share = 100 * good / max(len(labels), 1)
    return f"{len(rows)} stepwise rows ({forms}); {len(labels)} steps, {share:.0f}% labelled correct, {soft} soft"


def as_trl_row(row: StepRow) -> dict:
    """The row in TRL's stepwise form (what `mlxpt data convert` writes): labels as true/false
    where they are 0 or 1, the prompt as given (a string, or messages with the system first)."""
    if row.chat:
        prompt: dict = {"prompt": row.prompt}
    else:
        system = [m["content"] for m in row.prompt if m["role"] == "system"]
        prompt = {**({"system": system[0]} if system else {}), "prompt": row.prompt[-1]["content"]}
    labels = [bool(x) if x in (0.0, 1.0) else x for x in row.labels]
    return {**prompt, "completions": row.steps, "labels": labels}
