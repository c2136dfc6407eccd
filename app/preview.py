"""The New run form's live checks, run in thread workers: data validation (file:line errors),
token lengths, a masked example and a memory estimate. Plain values in, plain values out."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mlxpt.errors import MlxptError

MAX_ROWS = 200  # the first rows are enough for a histogram, and quick to tokenise
MAX_ERRORS = 20

_lock = threading.Lock()
_tokenizers: dict[str, object] = {}
_estimate_model: dict[tuple, object] = {}


@dataclass
class DataPreview:
    errors: list[str] = field(default_factory=list)
    summary: str = ""
    lengths: list[int] = field(default_factory=list)
    example: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained)
    example_where: str = ""
    longest: int = 0


def tokenizer_for(model: str, trust_remote_code: bool = False):
    with _lock:
        if model not in _tokenizers:
            from mlxpt.models.loader import load_tokenizer

            _tokenizers[model] = load_tokenizer(model, trust_remote_code)
        return _tokenizers[model]


def _segments(tokenizer, tokens: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and mask[j] == mask[i]:
            j += 1
        out.append((tokenizer.decode(tokens[i:j], skip_special_tokens=False), bool(mask[i])))
        i = j
    return out


def check_data(kind: str, cfg) -> DataPreview:
    """Validate the data named in `cfg` and describe what training would see.
    `kind`: "sft" (chat/completions/text rows), "pref" (preference pairs), "prompts" (GRPO, RFT)
    or "stepwise" (a process reward model's labelled steps)."""
    from mlxpt.data.formats import resolve_splits

    out = DataPreview()
    try:
        train_path, valid_path = resolve_splits(cfg.data.data, cfg.data.valid)
    except MlxptError as e:
        out.errors = [e.line()]
        return out
    preference = kind == "pref"
    if preference:
        from mlxpt.data.preference import scan_preference

        rows, same, errors = scan_preference(train_path)
        if valid_path:
            errors += scan_preference(valid_path)[2]
        out.summary = f"{len(rows)} preference pairs ({same} identical dropped)"
    elif kind == "stepwise":
        from mlxpt.data.stepwise import describe, scan_stepwise

        rows, errors = scan_stepwise(train_path)
        if valid_path:
            errors += scan_stepwise(valid_path)[1]
        out.summary = describe(rows)
    elif kind == "prompts":
        from mlxpt.data.prompts import scan_prompts

        rows, errors = scan_prompts(train_path)
        if valid_path:
            errors += scan_prompts(valid_path)[1]
        out.summary = f"{len(rows)} prompts (completions are sampled during training)"
    else:
        from mlxpt.data.formats import scan_splits

        rows, valid_rows, errors = scan_splits(cfg.data.data, cfg.data.valid)
        out.summary = f"{len(rows)} train rows, {len(valid_rows)} valid rows"
    out.errors = [e.line() for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.errors.append(f"... and {len(errors) - MAX_ERRORS} more")
    if not rows:
        out.errors = out.errors or ["E100: no usable rows in the data - check the file"]
        return out
    try:
        tokenizer = tokenizer_for(cfg.model.model, cfg.model.trust_remote_code)
    except MlxptError as e:
        out.errors.append(e.line())
        return out
    if kind == "prompts":
        from mlxpt.data.prompts import encode_prompts

        try:
            examples, _ = encode_prompts(rows[:MAX_ROWS], tokenizer, 10**9, 0, "truncate")
        except MlxptError as e:
            out.errors.extend(err.line() for err in getattr(e, "errors", [e])[:MAX_ERRORS])
            return out
        out.lengths = [len(ex.tokens) for ex in examples]
        if examples:
            first = examples[0]
            out.example = _segments(tokenizer, first.tokens, [0] * len(first.tokens))
            out.example_where = first.row.where
    elif kind == "stepwise":
        from mlxpt.data.stepwise import DEFAULT_DELIMITER, encode_stepwise

        try:
            examples, _ = encode_stepwise(rows[:MAX_ROWS], tokenizer, DEFAULT_DELIMITER, 10**9, "truncate")
        except MlxptError as e:
            out.errors.extend(err.line() for err in getattr(e, "errors", [e])[:MAX_ERRORS])
            return out
        out.lengths = [len(ex.tokens) for ex in examples]
        if examples:  # the step ends are what the head is trained on
            first = examples[0]
            ends = set(first.ends)
            out.example = _segments(tokenizer, first.tokens, [int(i in ends) for i in range(len(first.tokens))])
            out.example_where = first.where
    elif preference:
        from mlxpt.data.preference import encode_preference

        try:
            examples, _ = encode_preference(rows[:MAX_ROWS], tokenizer, 10**9, "truncate")
        except MlxptError as e:
            out.errors.extend(err.line() for err in getattr(e, "errors", [e])[:MAX_ERRORS])
            return out
        pairs = [ex.rows() for ex in examples]
        out.lengths = [max(len(a.tokens), len(b.tokens)) for a, b in pairs]
        if pairs:
            first = pairs[0][0]
            out.example, out.example_where = _segments(tokenizer, first.tokens, first.mask), first.where
    else:
        from mlxpt.data.encode import encode

        for row in rows[:MAX_ROWS]:
            try:
                ex = encode(row, tokenizer, cfg.data.mask, 10**9, "truncate")
            except MlxptError as e:
                if len(out.errors) < MAX_ERRORS:
                    out.errors.append(e.line())
                continue
            if ex is None:
                continue
            out.lengths.append(len(ex.tokens))
            if not out.example:
                out.example, out.example_where = _segments(tokenizer, ex.tokens, ex.mask), ex.where
        if out.lengths:
            out.summary += "\n" + packing_line(out.lengths, cfg.data)
    out.longest = max(out.lengths, default=0)
    return out


def packing_line(lengths: list[int], data) -> str:
    """Real tokens / computed positions at the form's batch and length (`mlxpt data check`'s
    figure, data/batching.py), packed into bins when --packing is on, else as padded rows."""
    from mlxpt.data.batching import packing_efficiency

    cap = data.max_seq_len
    eff = packing_efficiency([min(n, cap) for n in lengths], data.batch_size, cap)
    first = f" (first {len(lengths)} rows)" if len(lengths) >= MAX_ROWS else ""
    if data.packing:
        return (f"real tokens / computed positions{first}: {eff['packed_efficiency']:.0%} packed into bins of "
                f"{cap}, {eff['padded_efficiency']:.0%} as padded rows")  # fmt: skip
    return f"real tokens / computed positions{first}: {eff['padded_efficiency']:.0%} as padded rows (packing off)"


def estimate_memory(cfg, shape) -> dict:
    """Peak training memory (bytes by part) for the model and adapter in `cfg`: the same
    estimate `mlxpt train` checks before step 1. Loads the model once per model/adapter choice."""
    from mlxpt.models.memory import available_bytes, estimate_bytes

    a = cfg.adapter
    key = (cfg.model.model, cfg.model.quantize, a.fine_tune_type, a.rank, a.num_layers, a.targets,
           a.prefix_length, a.prefix_projection, a.adapter_size)  # fmt: skip
    with _lock:
        model = _estimate_model.get(key)
        if model is None:
            from mlxpt.models.adapters import apply_adapters
            from mlxpt.models.loader import load

            model, _ = load(cfg.model.model, quantize=cfg.model.quantize, trust_remote_code=cfg.model.trust_remote_code)
            apply_adapters(model, a, seed=0)
            _estimate_model.clear()  # one model at a time: it can be hundreds of MB
            _estimate_model[key] = model
    est = estimate_bytes(model, shape)
    est["available"] = available_bytes()
    return est
