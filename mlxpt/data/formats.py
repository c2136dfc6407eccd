"""Read and validate JSONL datasets in the mlx-lm / TRL formats.

Three formats, detected per row from its keys:
  chat         {"messages": [{"role", "content"}, ...], "tools": [...]?}
  completions  {"prompt": str, "completion": str}
  text         {"text": str}
and the other tools' formats read as chat rows (foreign.py): Alpaca, ShareGPT and TRL's
conversational prompt-completion. A file holds one kind (chat, completions or text); the chat
formats may mix. `Row.source` keeps the format a row was written in.
Every line is validated fully and all problems are collected, so a user fixes a file in one pass.
Unknown extra keys are kept in `Row.extra` (e.g. an eval "answer" field) and otherwise ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.data.foreign import check_alpaca, check_chat_completion, check_sharegpt
from mlxpt.data.row_checks import _CHECKS, FORMAT_KEYS, OPTIONAL_KEYS, _check_completions, _tname, detect_kind
from mlxpt.errors import DataError

BOM = b"\xef\xbb\xbf"


@dataclass
class Row:
    where: str  # "path:line"
    kind: str  # "chat" | "completions" | "text"
    data: dict  # chat: {"messages", "tools"?, "train_from"?}; completions: {"prompt", "completion"}; text: {"text"}
    extra: dict = field(default_factory=dict)  # unrecognised keys, untouched
    source: str = ""  # the format as written: kind, or alpaca, sharegpt, conversational completions


def _completions(obj: dict, err) -> dict | None:
    if "prompt" in obj and "completion" in obj and any(isinstance(obj[k], list) for k in ("prompt", "completion")):
        return check_chat_completion(obj, err)
    return _check_completions(obj, err)


CHECKS = {**_CHECKS, "completions": _completions, "alpaca": check_alpaca, "sharegpt": check_sharegpt}


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
    first_kind_at = first_source = ""
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
        if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj) and nonblank == 1:
            err(  # what pandas' to_json(orient="records") and datasets' to_json(lines=False) write
                "E114",
                f"line is one JSON array of {len(obj)} objects, not JSON Lines",
                "write one object per line, e.g. jq -c '.[]' data.json > data.jsonl",
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
                "use 'messages' (chat), 'prompt'+'completion' (completions), 'text', "
                "'instruction'+'output' (alpaca) or 'conversations' (sharegpt)",
            )
            continue
        if kinds == ["text", "alpaca"] and "instruction" in obj and "output" in obj:
            kinds = ["alpaca"]  # tatsu-lab/alpaca's rows carry `text`, the same row in Alpaca's prompt template
        if len(kinds) > 1:
            err(
                "E110",
                f"row mixes format keys of {' and '.join(kinds)}",
                "keep one format's keys per row (e.g. move 'text' to another name)",
            )
            continue
        if kinds == ["completions"] and isinstance(obj.get("label"), bool):
            err(  # TRL's unpaired preference (KTO) rows: SFT would learn the label-false completions
                "E115",
                "a TRL unpaired-preference row (prompt, completion and a true/false 'label'): mlxpt has no KTO, "
                "and SFT would train the completions labelled false",
                "keep the good ones as SFT rows: jq -c 'select(.label) | del(.label)' in.jsonl > sft.jsonl",
            )
            continue
        source = kinds[0]
        if source == "completions" and any(isinstance(obj.get(k), list) for k in ("prompt", "completion")):
            source = "conversational completions"
        row_kind = source if source in ("completions", "text") else "chat"
        if kind is None:
            kind, first_kind_at, first_source = row_kind, where, source
        elif row_kind != kind:
            err(
                "E109",
                f"{source} row in {'an' if first_source[0] in 'aeiou' else 'a'} {first_source} file "
                f"(format set by {first_kind_at})",
                "use one format per file; split the file or convert the rows",
            )
            continue
        data = CHECKS[kinds[0]](obj, err)
        if data is None:
            continue
        used = {k for keys in FORMAT_KEYS.values() for k in keys} | {"tools", *OPTIONAL_KEYS.get(kinds[0], ())}
        extra = {k: v for k, v in obj.items() if k not in used}
        rows.append(Row(where=where, kind=row_kind, data=data, extra=extra, source=source))
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
