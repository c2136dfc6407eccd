"""`mlxpt data check`: what a dataset holds and what training would see, without raising."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mlxpt.data.encode import _encode, _Tok
from mlxpt.data.formats import Row, scan_splits
from mlxpt.errors import DataError

MAX_LISTED = 20


def render_masked(tokenizer, tokens: list[int], mask: list[int], color: bool = False) -> str:
    """Decoded text with trained spans wrapped in [[ ]] (or ANSI inverse video when color)."""
    on, off = ("\x1b[7m", "\x1b[0m") if color else ("[[", "]]")
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(tokens[i:j], skip_special_tokens=False)
        out.append(f"{on}{text}{off}" if mask[i] else text)
        i = j
    return "".join(out)


def _stats(values: list[int]) -> str:
    a = np.asarray(values)
    return f"min {a.min()} / median {int(np.median(a))} / p95 {int(np.percentile(a, 95))} / max {a.max()}"


def check_report(
    path: str,
    valid: str | None = None,
    tokenizer=None,
    mask: str = "assistant",
    max_len: int = 2048,
    color: bool = False,
) -> tuple[str, int]:
    """(report text, number of rejected rows); the CLI exits 1 when the count is non-zero."""
    train, valid_rows, errors = scan_splits(path, valid)
    lines: list[str] = []
    preview = None
    for split, rows in (("train", train), ("valid", valid_rows)):
        if not rows and split == "valid":
            lines.append("valid: none (the caller decides: split off train or skip eval)")
            continue
        kinds = Counter(r.kind for r in rows)
        fmt = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "no valid rows"
        files = sorted({r.where.rsplit(":", 1)[0] for r in rows})
        lines.append(f"{split}: {len(rows)} valid rows ({fmt}) {' '.join(files)}".rstrip())
        if tokenizer is None or not rows:
            continue
        tok = _Tok(tokenizer)
        lengths, trained, over = [], 0, 0
        for row in rows:
            try:
                ex, status, n = _encode(row, tok, mask, max_len, "truncate")
            except DataError as e:
                errors.append(e)
                continue
            lengths.append(n)
            over += n > max_len
            if ex is None:
                if status == "untrainable":
                    errors.append(
                        DataError(
                            "E205",
                            "no trained tokens",
                            row.where,
                            "check the mask mode",
                        )
                    )
                continue
            trained += sum(ex.mask)
            preview = preview or (row, ex)
        if lengths:
            total = sum(lengths)
            lines.append(
                f"  tokens: {_stats(lengths)}; total {total}; trained {trained} "
                f"({100 * trained / max(total, 1):.1f}%); over max_len {max_len}: {over} "
                "(truncated)"
            )
    lines.append(f"rejected: {len(errors)} row{'s' if len(errors) != 1 else ''}")
    for e in errors[:MAX_LISTED]:
        lines.append(f"  {e.line()}")
    if len(errors) > MAX_LISTED:
        lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
    if preview is not None:
        row, ex = preview
        mark = "inverse video" if color else "[[ ]]"
        lines.append(f"preview ({row.where}, mask={mask}, trained tokens in {mark}):")
        lines.append(render_masked(tokenizer, ex.tokens, ex.mask, color))
    elif train and tokenizer is None:
        lines.append(f"preview ({train[0].where}): {_row_text(train[0])}")
    return "\n".join(lines), len(errors)


def _row_text(row: Row) -> str:
    if row.kind == "chat":
        return " | ".join(f"{m['role']}: {m.get('content')}" for m in row.data["messages"])
    if row.kind == "completions":
        return f"prompt: {row.data['prompt']} | completion: {row.data['completion']}"
    return row.data["text"]
