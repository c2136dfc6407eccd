"""Batched sampling of N completions of one prompt: the prompt is prefilled once, its KV cache
is copied to N rows, and the rows decode together, each stopping on its own.

This is what makes best-of-N, self-consistency and GRPO groups cheap: decoding is bound by
reading the weights, and one read serves all N rows. Rows that finish are dropped from the
batch (and from the cache), so a group costs what its longest live rows cost.

`Completion.tokens` are exactly the sampled ids (never re-tokenised text; GRPO's log-probs need
that), without the stop token. `Completion.logprobs` are the model's log-softmax of each sampled
token at temperature 1, before any filter: the policy's log-probs, also a best-of-N score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlxpt.errors import ConfigError

PREFILL_CHUNK = 512


@dataclass
class Completion:
    tokens: list[int]  # generated ids, the stop token excluded
    text: str
    finish_reason: str  # "stop" (EOS, end of turn or a stop string) | "length" (max_tokens)
    logprobs: list[float] = field(default_factory=list)  # per token in `tokens`, temperature 1
    stop_token: int | None = None  # the EOS / end-of-turn id that ended it (not in `tokens`)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@dataclass
class GroupStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _map_cache(cache: list, fn: Callable) -> None:
    """Apply `fn` to every per-row array of every layer cache, in place (batch is axis 0)."""
    import mlx.core as mx

    for c in cache:
        if hasattr(c, "keys") and hasattr(c, "values") and not callable(c.keys):
            if c.keys is not None:
                c.keys, c.values = fn(c.keys), fn(c.values)
        elif hasattr(c, "cache"):  # ArraysCache (state-space layers)
            c.cache = [fn(a) if isinstance(a, mx.array) else a for a in c.cache]
        else:
            raise ConfigError(
                "E615",
                f"batched sampling does not support the {type(c).__name__} cache of this model",
                "decode",
                "use --strategy sample with --n 1, or another model",
            )


def _check(n: int, max_tokens: int, prompt_tokens: Sequence[int]) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError("E616", f"n={n!r} is out of range", "--n", "use a whole number >= 1")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError("E604", f"max-tokens={max_tokens} is out of range", "--max-tokens", "use a whole number >= 1")
    if not prompt_tokens:
        raise ConfigError("E602", "the prompt is empty", "prompt", "give a non-empty prompt")


def generate_group(
    model,
    tokenizer,
    prompt_tokens: Sequence[int],
    n: int,
    max_tokens: int = 256,
    sampler: Callable | None = None,
    stop_strings: Sequence[str] = (),
    logits_processors: Sequence[Callable] | None = None,
    stats: GroupStats | None = None,
) -> list[Completion]:
    """`n` completions of `prompt_tokens`, decoded as one batch (see the module doc).

    `sampler` maps log-probs (rows, V) to token ids (rows,) (default: greedy); the logits
    processors (e.g. a repetition penalty) are mlx-lm's `(tokens, logits) -> logits`, applied per
    row. Rows stop at the tokenizer's EOS / end-of-turn ids or when their text contains one of
    `stop_strings` (the text is cut before it)."""
    return generate_groups(
        model, tokenizer, [prompt_tokens], n, max_tokens, sampler, stop_strings, logits_processors, stats
    )[0]


def _prefill(model, prompt_tokens: Sequence[int]):
    """(cache, logits of the next token) for one prompt, in chunks of PREFILL_CHUNK tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = mx.array(list(prompt_tokens))[None]
    for i in range(0, prompt.shape[1] - 1, PREFILL_CHUNK):  # all but the last token
        model(prompt[:, i : min(i + PREFILL_CHUNK, prompt.shape[1] - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    return cache, model(prompt[:, -1:], cache=cache)[:, -1, :]


def _merge_rows(caches: list[list], n: int) -> list:
    """One batch cache per layer holding `n` copies of each prompt's cache (left-padded)."""
    from mlx_lm.models.cache import KVCache

    if len(caches) == 1:
        import mlx.core as mx

        cache = caches[0]
        if n > 1:
            _map_cache(cache, lambda a: mx.repeat(a, n, axis=0))
        return cache
    if not all(type(c) is KVCache for layer in caches for c in layer):
        raise _Unmergeable
    return [KVCache.merge([caches[p][i] for p in range(len(caches)) for _ in range(n)]) for i in range(len(caches[0]))]


class _Unmergeable(Exception):
    pass


def generate_groups(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    n: int,
    max_tokens: int = 256,
    sampler: Callable | None = None,
    stop_strings: Sequence[str] = (),
    logits_processors: Sequence[Callable] | None = None,
    stats: GroupStats | None = None,
    keys: Sequence[int] | None = None,
) -> list[list[Completion]]:
    """`n` completions of each prompt, all decoded as one batch: each prompt is prefilled once,
    its cache copied to `n` rows, the rows of different prompts left-padded into one batch cache
    (models whose caches cannot be merged decode one prompt group at a time). See generate_group."""
    for p in prompts:
        _check(n, max_tokens, p)
    from mlxpt import _blas

    _blas.activate()
    stats = stats if stats is not None else GroupStats()
    stats.prompt_tokens += sum(len(p) for p in prompts)
    t0 = time.perf_counter()
    prefilled = [_prefill(model, p) for p in prompts]
    stats.prefill_s += time.perf_counter() - t0
    states = [(cache, logits, list(p)) for (cache, logits), p in zip(prefilled, prompts, strict=True)]
    return generate_from(model, tokenizer, states, n, max_tokens, sampler, stop_strings, logits_processors, stats, keys)


def generate_from(
    model,
    tokenizer,
    states: Sequence[tuple],
    n: int,
    max_tokens: int | Sequence[int] = 256,
    sampler: Callable | None = None,
    stop_strings: Sequence[str] = (),
    logits_processors: Sequence[Callable] | None = None,
    stats: GroupStats | None = None,
    keys: Sequence[int] | None = None,
) -> list[list[Completion]]:
    """`n` completions of each already-prefilled state `(cache, next-token logits (1, V), history)`,
    all decoded as one batch; `history` is the token ids the cache holds (for the logits
    processors). The caches are consumed (copy them first to keep them). `max_tokens` may be one
    limit per state. Used by generate_groups (states = prompts) and step search (states = nodes).

    A keyed sampler (`sampling.make_keyed_sampler`) needs `keys`, one whole number per state:
    sample j's token t of state i draws from `row_key(keys[i], j, t)`, whatever else is in the
    batch (a ValueError without them: a caller's bug, not an input)."""
    # One function on purpose (~100 lines): cache copy and the decode loop share the per-row
    # caches, stop state and timing; split, each piece would need all of them passed back.
    import mlx.core as mx

    from mlxpt.decode.generate import add_stop_tokens
    from mlxpt.decode.sampling import row_key

    tok = add_stop_tokens(tokenizer)
    stop_ids = set(tok.eos_token_ids)
    if sampler is None:
        from mlxpt.decode.sampling import make_sampler

        sampler = make_sampler()
    keyed = getattr(sampler, "keyed", False)
    if keyed and (keys is None or len(keys) != len(states)):
        raise ValueError("a keyed sampler needs one key per state")
    stats = stats if stats is not None else GroupStats()
    limits = [max_tokens] * len(states) if isinstance(max_tokens, int) else list(max_tokens)
    t0 = time.perf_counter()
    try:
        cache = _merge_rows([c for c, _, _ in states], n)
    except _Unmergeable:
        one = [None] * len(states) if keys is None else [[k] for k in keys]
        return [
            generate_from(model, tokenizer, [s], n, [m], sampler, stop_strings, logits_processors, stats, k)[0]
            for s, m, k in zip(states, limits, one, strict=True)
        ]
    logits = mx.concatenate([mx.repeat(lg, n, axis=0) for _, lg, _ in states], axis=0)
    mx.eval(logits)
    t1 = time.perf_counter()
    stats.prefill_s += t1 - t0

    rows_total = n * len(states)
    owner = [list(states[i // n][2]) for i in range(rows_total)]  # the history of each sequence
    limit = [limits[i // n] for i in range(rows_total)]
    tokens: list[list[int]] = [[] for _ in range(rows_total)]
    logps: list[list[float]] = [[] for _ in range(rows_total)]
    texts: list[str | None] = [None] * rows_total
    reasons: list[str | None] = [None] * rows_total
    stops: list[int | None] = [None] * rows_total
    live = [i for i in range(rows_total) if limit[i] > 0]  # row r of the batch is sequence live[r]
    if len(live) < rows_total and live:
        cache, logits = _keep_rows(cache, logits, live)
    for _ in range(max(limits, default=0) if live else 0):
        logits = logits.astype(mx.float32)
        if logits_processors:
            rows = []
            for r, seq in enumerate(live):
                row = logits[r : r + 1]
                history = mx.array(owner[seq] + tokens[seq])
                for proc in logits_processors:
                    row = proc(history, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        base = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if keyed:
            chosen = sampler(base, [row_key(keys[seq // n], seq % n, len(tokens[seq])) for seq in live])
        else:
            chosen = sampler(base)
        chosen_logp = mx.take_along_axis(base, chosen[:, None], axis=-1)[:, 0]
        mx.eval(chosen, chosen_logp)
        ids, lps = chosen.tolist(), chosen_logp.tolist()
        keep = []
        for r, seq in enumerate(live):
            t = int(ids[r])
            if t in stop_ids:
                reasons[seq], stops[seq] = "stop", t
                continue
            tokens[seq].append(t)
            logps[seq].append(float(lps[r]))
            if stop_strings:
                text = tok.decode(tokens[seq])
                hit = min((text.find(s) for s in stop_strings if s in text), default=-1)
                if hit >= 0:
                    texts[seq], reasons[seq] = text[:hit], "stop"
                    continue
            if len(tokens[seq]) >= limit[seq]:
                reasons[seq] = "length"
                continue
            keep.append(r)
        if not keep:
            break
        if len(keep) < len(live):
            cache, chosen = _keep_rows(cache, chosen, keep)
            live = [live[r] for r in keep]
        logits = model(chosen[:, None], cache=cache)[:, -1, :]
    stats.decode_s += time.perf_counter() - t1
    stats.generated_tokens += sum(len(t) for t in tokens)
    done = [
        Completion(
            tokens[i],
            texts[i] if texts[i] is not None else tok.decode(tokens[i]),
            reasons[i] or "length",
            logps[i],
            stops[i],
        )
        for i in range(rows_total)
    ]
    return [done[i * n : (i + 1) * n] for i in range(len(states))]


def _keep_rows(cache: list, rows, keep: list[int]):
    """(cache, rows) with only batch rows `keep`; the cache is filtered in place."""
    import mlx.core as mx

    idx = mx.array(keep)
    for c in cache:
        if hasattr(c, "filter"):  # batch caches know their padding
            c.filter(idx)
        else:
            _map_cache([c], lambda a, idx=idx: a[idx])
    return cache, rows[idx]


def generate_many(
    model, tokenizer, prompts: Sequence[Sequence[int]], max_tokens: int = 256, sampler: Callable | None = None
) -> list[Completion]:
    """One completion for each of several different prompts, decoded as one batch (mlx-lm's
    continuous-batching `batch_generate`, left-padded prompts). For held-out evaluation: greedy by
    default. Stop tokens are not reported (`stop_token` is None)."""
    for p in prompts:
        _check(1, max_tokens, p)
    if not prompts:
        return []
    from mlxpt import _blas

    _blas.activate()
    from mlx_lm.generate import batch_generate

    from mlxpt.decode.generate import add_stop_tokens

    tok = add_stop_tokens(tokenizer)
    kw = {"sampler": sampler} if sampler is not None else {}
    r = batch_generate(
        model, tok, [list(p) for p in prompts], max_tokens=max_tokens, return_token_ids=True, return_logprobs=True, **kw
    )
    return [
        Completion(list(ids), text, "length" if len(ids) >= max_tokens else "stop", list(lps))
        for ids, text, lps in zip(r.token_ids, r.texts, r.logprobs, strict=True)
    ]
