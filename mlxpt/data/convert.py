"""`mlxpt data convert`: rows in any format the readers accept, written back in mlxpt's own.

SFT rows become `{"messages"}` chat rows (completions and text rows stay as they are; a
conversational prompt-completion row stays one, so only its completion is trained), preference
rows `{"prompt", "chosen", "rejected"}`, GRPO prompt rows `{"prompt", ...}`. Unknown fields of
SFT and prompt rows ride along; a preference row keeps only its pair (and `system`). Every row
is checked first; one bad row and nothing is converted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mlxpt.data.formats import raise_if_errors


def _sft_row(row) -> dict:
    data = dict(row.data)
    n = data.pop("train_from", None)
    if n is not None:
        msgs = data.pop("messages")
        data = {"prompt": msgs[:n], "completion": msgs[n:]}
    return {**data, **row.extra}


def _pref_row(row) -> dict:
    if row.chat:
        return {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected}
    system = [m["content"] for m in row.prompt if m["role"] == "system"]
    out = {"system": system[0]} if system else {}
    return {
        **out,
        "prompt": row.prompt[-1]["content"],
        "chosen": row.chosen[0]["content"],
        "rejected": row.rejected[0]["content"],
    }


def _prompt_row(row) -> dict:
    return {"prompt": row.messages if row.chat else row.messages[-1]["content"], **row.fields}


def convert_rows(path: str | Path, kind: str) -> tuple[list[dict], Counter, int]:
    """(rows in mlxpt's format, rows per source format, rows dropped) for `kind` sft|pref|prompts.

    Raises one DataError listing every problem; identical preference pairs are the only rows
    dropped (they carry no signal), counted in the third value."""
    dropped = 0
    if kind == "pref":
        from mlxpt.data.preference import scan_preference

        rows, dropped, errors = scan_preference(path)
        out, sources = [_pref_row(r) for r in rows], Counter(r.source for r in rows)
    elif kind == "prompts":
        from mlxpt.data.prompts import scan_prompts

        rows, errors = scan_prompts(path)
        out, sources = [_prompt_row(r) for r in rows], Counter("prompts" for _ in rows)
    else:
        from mlxpt.data.formats import scan_jsonl

        rows, errors = scan_jsonl(path)
        out, sources = [_sft_row(r) for r in rows], Counter(r.source for r in rows)
    raise_if_errors(errors, Path(path).name)
    return out, sources, dropped


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
