"""Read and validate JSONL datasets in the mlx-lm / TRL formats.

Three formats, detected per file from the first valid row:
  chat         {"messages": [{"role", "content"}, ...], "tools": [...]?}
  completions  {"prompt": str, "completion": str}
  text         {"text": str}
Every line is validated fully and all problems are collected, so a user fixes a file in one pass.
Unknown extra keys are kept in `Row.extra` (e.g. an eval "answer" field) and otherwise ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMAT_KEYS = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}
BOM = b"\xef\xbb\xbf"


@dataclass
class Row:
    where: str  # "path:line"
    kind: str  # "chat" | "completions" | "text"
    data: dict  # chat: {"messages", "tools"?}; completions: {"prompt", "completion"}; text: {"text"}
    extra: dict = field(default_factory=dict)  # unrecognised keys, untouched


class _Dup(dict):
    """Marker for a JSON object that repeated a key (json keeps the last one silently)."""


def _pairs(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen, dups = set(), []
        for k, _ in pairs:
            if k in seen:
                dups.append(k)
            seen.add(k)
        d = _Dup(d)
        d.dups = dups
    return d


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def _find_dup(obj) -> str | None:
    if isinstance(obj, _Dup):
        return obj.dups[0]
    if isinstance(obj, dict):
        return next((k for v in obj.values() if (k := _find_dup(v))), None)
    if isinstance(obj, list):
        return next((k for v in obj if (k := _find_dup(v))), None)
    return None


def _has_surrogate(obj) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogate(v) for v in obj)
    return False


def _whole_json(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def detect_kind(obj: dict) -> list[str]:
    """Formats whose keys appear in `obj` (normally exactly one)."""
    return [k for k, keys in FORMAT_KEYS.items() if any(key in obj for key in keys)]


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


def _check_chat(obj: dict, err) -> dict | None:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        return err(
            "E120",
            f"'messages' is {_tname(msgs)}, expected a list of messages",
            'write "messages": [{"role": "user", "content": "..."}, ...]',
        )
    if not msgs:
        return err("E121", "'messages' is empty", "add at least a user and an assistant turn")
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        return err(
            "E132",
            f"'tools' is {_tname(tools)}, expected a list of tool schemas",
            'write "tools": [{"type": "function", "function": {...}}] or remove it',
        )
    ok = True
    for j, m in enumerate(msgs):
        at = f"messages[{j}]"
        if not isinstance(m, dict):
            ok = err(
                "E122",
                f"{at} is {_tname(m)}, expected an object",
                'each message is {"role": ..., "content": ...}',
            )
            continue
        role = m.get("role")
        if "role" not in m or not isinstance(role, str):
            ok = err(
                "E123",
                f"{at} has no string 'role'",
                "add a role: system, user, assistant or tool",
            )
            continue
        if role not in ROLES:
            ok = err(
                "E124",
                f"{at} has unknown role {role!r}",
                f"use one of {', '.join(ROLES)} (rename e.g. 'human'->'user', 'gpt'->'assistant')",
            )
            continue
        calls = m.get("tool_calls")
        if calls is not None and (
            role != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)
        ):
            ok = err(
                "E133",
                f"{at} has invalid 'tool_calls'",
                "tool_calls must be a list of objects on an assistant message",
            )
            continue
        if "content" not in m:
            ok = err("E125", f"{at} ({role}) has no 'content'", "add a 'content' string")
            continue
        content = m["content"]
        if content is None:
            if role == "assistant" and calls:
                continue
            ok = err(
                "E128",
                f"{at} ({role}) content is null",
                "null content is allowed only on an assistant message with tool_calls",
            )
            continue
        if not isinstance(content, str):
            ok = err(
                "E126",
                f"{at} ({role}) content is {_tname(content)}, expected a string",
                "flatten content parts into one string",
            )
            continue
        if not content.strip() and role != "tool" and not calls:
            ok = err(
                "E127",
                f"{at} ({role}) content is empty or whitespace",
                "remove the message or write its text",
            )
            continue
    if not ok:
        return None
    roles = [m["role"] for m in msgs]
    if "system" in roles[1:]:
        return err(
            "E130",
            f"system message at messages[{roles.index('system', 1)}], not first",
            "put one system message first or merge it into the first one",
        )
    if "assistant" not in roles:
        return err(
            "E129",
            "conversation has no assistant turn, so nothing would be trained",
            "add the assistant reply, or use the text format for plain text",
        )
    if roles[-1] != "assistant":
        return err(
            "E131",
            f"conversation ends with a {roles[-1]} turn, not assistant",
            "drop the trailing turn or add the assistant reply (an untrained tail is almost always a data bug)",
        )
    data = {"messages": [dict(m) for m in msgs]}
    if tools is not None:
        data["tools"] = tools
    return data


def _check_completions(obj: dict, err) -> dict | None:
    for key, c_type, c_empty in (
        ("prompt", "E140", "E141"),
        ("completion", "E142", "E143"),
    ):
        if key not in obj:
            return err(
                "E111",
                f"completions row has no {key!r}",
                "a completions row needs both 'prompt' and 'completion'",
            )
        v = obj[key]
        if not isinstance(v, str):
            return err(
                c_type,
                f"{key!r} is {_tname(v)}, expected a string",
                f"make {key!r} a string",
            )
        if not v.strip():
            return err(
                c_empty,
                f"{key!r} is empty or whitespace",
                "remove the row or fill it in",
            )
    return {"prompt": obj["prompt"], "completion": obj["completion"]}


def _check_text(obj: dict, err) -> dict | None:
    v = obj["text"]
    if not isinstance(v, str):
        return err("E150", f"'text' is {_tname(v)}, expected a string", "make 'text' a string")
    if not v.strip():
        return err("E151", "'text' is empty or whitespace", "remove the row or fill it in")
    return {"text": v}


_CHECKS = {"chat": _check_chat, "completions": _check_completions, "text": _check_text}


def scan_jsonl(path: str | os.PathLike) -> tuple[list[Row], list[DataError]]:
    """Validate a JSONL file without raising: (valid rows, one DataError per problem)."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        return [], [DataError("E101", "file not found", name, "check the path")]
    if p.is_dir():
        return [], [
            DataError(
                "E102",
                "is a directory, expected a .jsonl file",
                name,
                "point at the file, or use a folder holding train.jsonl",
            )
        ]
    try:
        raw = p.read_bytes()
    except OSError as e:
        return [], [DataError("E101", f"cannot read file: {e.strerror}", name, "check permissions")]
    raw = raw.removeprefix(BOM)
    rows: list[Row] = []
    errors: list[DataError] = []
    kind: str | None = None
    first_kind_at = ""
    nonblank = 0
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        where = f"{name}:{lineno}"

        def err(code, what, hint=None, _where=where):
            errors.append(DataError(code, what, _where, hint))

        bline = bline.rstrip(b"\r")
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            nonblank += 1
            err(
                "E104",
                f"not valid UTF-8 (byte {e.start + 1} of the line)",
                "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
            )
            continue
        text = line.strip()
        if not text:
            continue
        nonblank += 1
        lead = len(line) - len(line.lstrip())
        try:
            obj, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError as e:
            err(
                "E105",
                f"invalid JSON at column {lead + e.colno}: {e.msg}",
                "each line must be one complete JSON object (no pretty-printed JSON)",
            )
            continue
        except RecursionError:
            err("E105", "invalid JSON: nested too deeply", "flatten the row")
            continue
        if text[end:].strip():
            err(
                "E106",
                f"extra data after the JSON object at column {lead + end + 1}",
                "put one JSON object per line",
            )
            continue
        if not isinstance(obj, dict):
            err(
                "E107",
                f"top-level JSON is {_tname(obj)}, expected an object",
                'wrap the row in an object, e.g. {"text": ...}',
            )
            continue
        if (dup := _find_dup(obj)) is not None:
            err(
                "E112",
                f"duplicate key {dup!r} in the JSON object",
                "keep one value per key",
            )
            continue
        if _has_surrogate(obj):
            err(
                "E113",
                "string contains an unpaired surrogate escape (\\ud800-\\udfff)",
                "fix the broken \\u escape; it cannot be encoded as UTF-8",
            )
            continue
        kinds = detect_kind(obj)
        if not kinds:
            keys = ", ".join(sorted(obj)[:6]) or "none"
            err(
                "E108",
                f"no recognised format keys (found: {keys})",
                "use 'messages' (chat), 'prompt'+'completion' (completions) or 'text'",
            )
            continue
        if len(kinds) > 1:
            err(
                "E110",
                f"row mixes format keys of {' and '.join(kinds)}",
                "keep one format's keys per row (e.g. move 'text' to another name)",
            )
            continue
        row_kind = kinds[0]
        if kind is None:
            kind, first_kind_at = row_kind, where
        elif row_kind != kind:
            err(
                "E109",
                f"{row_kind} row in a {kind} file (format set by {first_kind_at})",
                "use one format per file; split the file or convert the rows",
            )
            continue
        data = _CHECKS[row_kind](obj, err)
        if data is None:
            continue
        used = {k for keys in FORMAT_KEYS.values() for k in keys} | {"tools"}
        extra = {k: v for k, v in obj.items() if k not in used}
        rows.append(Row(where=where, kind=row_kind, data=data, extra=extra))
    if any(e.code == "E105" for e in errors) and (whole := _whole_json(raw)) is not None:
        # A pretty-printed object or a JSON array: one clear error instead of one per line.
        what = f"file is one JSON {_tname(whole)} spanning lines, not JSON Lines"
        hint = "write one object per line, e.g. jq -c '.[]' data.json > data.jsonl"
        return [], [DataError("E114", what, f"{name}:1", hint)]
    if nonblank == 0:
        errors.append(
            DataError(
                "E103",
                "file is empty (no rows)",
                f"{name}:1",
                "add rows, one JSON object per line",
            )
        )
    return rows, errors


def raise_if_errors(errors: list[DataError], label: str) -> None:
    """Raise one DataError that summarises `errors` (and carries them in `.errors`)."""
    if not errors:
        return
    first = errors[0]
    if len(errors) == 1:
        raise first
    n_rows = len({e.where for e in errors})
    count = f"{n_rows} invalid rows" + (f" ({len(errors)} problems)" if n_rows < len(errors) else "")
    raise DataError(
        first.code,
        f"{count} in {label}; first: {first.what}",
        first.where,
        first.hint,
        errors=list(errors),
    )


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """Read and fully validate a JSONL dataset; raise DataError listing every problem."""
    rows, errors = scan_jsonl(path)
    raise_if_errors(errors, Path(path).name)
    return rows


def resolve_splits(path: str | os.PathLike, valid: str | None = None) -> tuple[str, str | None]:
    """(train file, valid file or None) for a folder or a train file plus optional valid file."""
    p = Path(path)
    if p.is_dir():
        train = p / "train.jsonl"
        if not train.exists():
            have = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
            raise DataError(
                "E160",
                "folder has no train.jsonl",
                str(p),
                f"name the training file train.jsonl (folder holds: {have})",
            )
        if valid is None and (p / "valid.jsonl").exists():
            valid = str(p / "valid.jsonl")
        return str(train), valid
    return str(p), valid


def scan_splits(path, valid=None) -> tuple[list[Row], list[Row], list[DataError]]:
    """Like load_splits, but returns the errors instead of raising them."""
    try:
        train_path, valid_path = resolve_splits(path, valid)
    except DataError as e:
        return [], [], [e]
    train, errors = scan_jsonl(train_path)
    valid_rows: list[Row] = []
    if valid_path is not None:
        valid_rows, verr = scan_jsonl(valid_path)
        errors += verr
    return train, valid_rows, errors


def load_splits(path: str | os.PathLike, valid: str | None = None) -> tuple[list[Row], list[Row]]:
    """(train rows, valid rows) from a folder with train.jsonl[/valid.jsonl] or a train file.

    Errors in both files are collected before raising. No valid split gives [].
    """
    train, valid_rows, errors = scan_splits(path, valid)
    raise_if_errors(errors, Path(path).name)
    return train, valid_rows
