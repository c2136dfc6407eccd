"""`mlxpt data check`: what a dataset holds and what training would see, without raising."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mlxpt.data.batching import packing_efficiency
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
        kinds = Counter(r.source or r.kind for r in rows)
        fmt = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "no valid rows"
        files = sorted({r.where.rsplit(":", 1)[0] for r in rows})
        lines.append(f"{split}: {len(rows)} valid rows ({fmt}) {' '.join(files)}".rstrip())
        if tokenizer is None or not rows:
            continue
        at, before = len(lines) - 1, len(errors)
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
        if len(errors) > before:  # rows the tokenizer refused are rejected, not also valid
            bad = {e.where for e in errors[before:]}
            kept = [r for r in rows if r.where not in bad]
            kinds = Counter(r.source or r.kind for r in kept)
            fmt = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "no valid rows"
            lines[at] = f"{split}: {len(kept)} valid rows ({fmt}) {' '.join(files)}".rstrip()
        if lengths:
            total = sum(lengths)
            lines.append(
                f"  tokens: {_stats(lengths)}; total {total}; trained {trained} "
                f"({100 * trained / max(total, 1):.1f}%); over max_len {max_len}: {over} "
                "(truncated)"
            )
            if split == "train":  # what `--packing` saves at the default batch of 4 (data/batching.py)
                eff = packing_efficiency([min(n, max_len) for n in lengths], 4, max_len)
                lines.append(
                    f"  real tokens / computed positions at batch 4: {eff['packed_efficiency']:.1%} packed "
                    f"into bins of {max_len}, {eff['padded_efficiency']:.1%} as padded rows"
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


PAIR_METHODS = ("dpo", "simpo", "orpo", "rm")


def data_kind(method: str) -> str:
    """What a method trains on: "sft" rows, "pref" (preference pairs), "prompts" (GRPO's and RFT's
    prompts with answers) or "stepwise" (a process reward model's labelled steps)."""
    if method == "prm":
        return "stepwise"
    return "pref" if method in PAIR_METHODS else ("prompts" if method in ("grpo", "rft") else "sft")


def detect_data_kind(path: str, valid: str | None = None) -> str:
    """The kind of a data file from its first JSON object: chosen + rejected are preference pairs,
    completions + labels stepwise rows, a prompt with no completion a GRPO prompt, anything else
    SFT rows (whose check says why)."""
    import json

    from mlxpt.data.formats import resolve_splits

    try:
        train, _ = resolve_splits(path, valid)
        with open(train, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    break
            else:
                return "sft"
    except (OSError, ValueError, DataError):
        return "sft"  # the SFT check reports the file's own problem with its line
    if not isinstance(obj, dict):
        return "sft"
    if "chosen" in obj and "rejected" in obj:
        return "pref"
    if "completions" in obj and "labels" in obj:
        return "stepwise"
    if "prompt" in obj and "completion" not in obj:
        return "prompts"
    return "sft"


def check_kind_report(kind: str, path: str, valid: str | None = None, tokenizer=None, max_len: int = 2048):
    """`check_report` for preference pairs ("pref"), GRPO prompts ("prompts") and stepwise rows
    ("stepwise", steps joined by the default delimiter, a newline)."""
    from mlxpt.data.formats import resolve_splits
    from mlxpt.data.preference import encode_preference, scan_preference
    from mlxpt.data.prompts import encode_prompts, scan_prompts
    from mlxpt.data.stepwise import DEFAULT_DELIMITER, encode_stepwise, scan_stepwise
    from mlxpt.data.stepwise import describe as describe_steps

    train_path, valid_path = resolve_splits(path, valid)
    lines, errors = [], []
    for split, p in (("train", train_path), ("valid", valid_path)):
        if p is None:
            lines.append("valid: none (the caller decides: split off train or skip eval)")
            continue
        if kind == "pref":
            rows, same, errs = scan_preference(p)
            forms = ", ".join(f"{k} {n}" for k, n in sorted(Counter(r.source for r in rows).items()))
            lines.append(f"{split}: {len(rows)} preference pairs ({forms or 'none'}; {same} identical dropped) {p}")
        elif kind == "stepwise":
            rows, errs = scan_stepwise(p)
            lines.append(f"{split}: {describe_steps(rows)} {p}")
        else:
            rows, errs = scan_prompts(p)
            lines.append(f"{split}: {len(rows)} prompts (completions are sampled in training) {p}")
        errors += errs
        if tokenizer is None or not rows:
            continue
        if kind == "pref":
            examples, report = encode_preference(rows, tokenizer, max_len, "truncate")
            lengths = [len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in examples]
        elif kind == "stepwise":
            try:
                examples, report = encode_stepwise(rows, tokenizer, DEFAULT_DELIMITER, 10**9, "truncate")
            except DataError as e:
                errors += e.errors
                continue
            lengths = [len(e.tokens) for e in examples]
        else:
            examples, report = encode_prompts(rows, tokenizer, max_len, 0, "drop")
            lengths = [len(e.tokens) for e in examples]
        if lengths:
            lines.append(f"  tokens: {_stats(lengths)}; over max_len {max_len}: {sum(n > max_len for n in lengths)}")
    lines.append(f"rejected: {len(errors)} row{'s' if len(errors) != 1 else ''}")
    lines += [f"  {e.line()}" for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
    return "\n".join(lines), len(errors)
