"""The JSON-lines walk shared by the preference and prompt readers: file checks, UTF-8, one JSON
object per line, duplicate keys, broken escapes. Each problem becomes one DataError (file:line,
hint); the caller checks the objects' fields and collects its own errors beside these."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from mlxpt.data.formats import _DECODER, BOM, _find_dup, _has_surrogate
from mlxpt.data.row_checks import _tname
from mlxpt.errors import DataError


class ObjectLines:
    """Iterate `(where, obj)` over the JSON objects of a .jsonl file; problems go to `errors`.

    `nonblank` counts non-blank lines (valid or not) once the walk is done."""

    def __init__(self, path: str | os.PathLike, expected: str):
        self.path, self.expected = Path(path), expected
        self.errors: list[DataError] = []
        self.nonblank = 0

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        p, name = self.path, str(self.path)
        if not p.is_file():
            what = "is a directory, expected a .jsonl file" if p.is_dir() else "file not found"
            self.errors.append(DataError("E101" if not p.is_dir() else "E102", what, name, "check the path"))
            return
        raw = p.read_bytes().removeprefix(BOM)
        for lineno, bline in enumerate(raw.split(b"\n"), start=1):
            where = f"{name}:{lineno}"
            try:
                text = bline.rstrip(b"\r").decode("utf-8").strip()
            except UnicodeDecodeError as e:
                self.nonblank += 1
                self.err(
                    "E104", f"not valid UTF-8 (byte {e.start + 1} of the line)", where, "re-save the file as UTF-8"
                )
                continue
            if not text:
                continue
            self.nonblank += 1
            try:
                obj, end = _DECODER.raw_decode(text)
            except (json.JSONDecodeError, RecursionError) as e:
                self.err(
                    "E105", f"invalid JSON: {getattr(e, 'msg', 'nested too deeply')}", where, "one JSON object per line"
                )
                continue
            if text[end:].strip():
                self.err("E106", "extra data after the JSON object", where, "put one JSON object per line")
            elif not isinstance(obj, dict):
                self.err(
                    "E107", f"top-level JSON is {_tname(obj)}, expected an object", where, f"write {self.expected}"
                )
            elif (dup := _find_dup(obj)) is not None:
                self.err("E112", f"duplicate key {dup!r} in the JSON object", where, "keep one value per key")
            elif _has_surrogate(obj):
                self.err("E113", "string contains an unpaired surrogate escape", where, "fix the broken \\u escape")
            else:
                yield where, obj

    def err(self, code: str, what: str, where: str, hint: str | None = None) -> None:
        self.errors.append(DataError(code, what, where, hint))
