"""Beam search over sequences, for comparison with sampling-based test-time scaling.

The prompt is prefilled once and its KV cache copied to `width` rows; each step scores every
(beam, next token) pair by summed log-prob, keeps the best `width` unfinished beams and reorders
the cache rows to their parents. A beam that emits EOS / end of turn is finished and ranked by
`votes.length_penalty` (sum of log-probs / length**alpha, as in Hugging Face's `length_penalty`).
Search stops when `width` beams are finished and no live beam scores better than the worst of
them (the usual heuristic: a live beam could still improve with alpha > 0), or at max_tokens.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mlxpt.decode.votes import length_penalty
from mlxpt.errors import ConfigError


@dataclass
class Beam:
    tokens: list[int]  # generated ids, the stop token excluded
    text: str
    sum_logprob: float  # includes the stop token's log-prob when finish_reason is "stop"
    score: float  # length-penalised, what beams are ranked by
    finish_reason: str  # "stop" | "length"


def check_beam(width: int, alpha: float) -> None:
    if not isinstance(width, int) or width < 1:
        raise ConfigError("E625", f"beam width {width!r} is out of range", "--n", "use a whole number >= 1")
    if not isinstance(alpha, (int, float)) or not -10 <= alpha <= 10:
        raise ConfigError("E625", f"length penalty {alpha!r} is out of range", "--length-penalty", "use 0 (off) to 2")


def _reorder(cache: list, idx) -> None:
    """Keep cache rows `idx` (batch is axis 0) in every layer, in place."""
    for c in cache:
        if getattr(c, "keys", None) is not None and not callable(c.keys):
            c.keys, c.values = c.keys[idx], c.values[idx]
        elif hasattr(c, "cache"):
            c.cache = [a[idx] if a is not None else a for a in c.cache]
        else:
            raise ConfigError(
                "E625", f"beam search does not support the {type(c).__name__} cache of this model", "decode"
            )


def beam_search(
    model,
    tokenizer,
    prompt_tokens: Sequence[int],
    width: int = 4,
    max_tokens: int = 256,
    alpha: float = 1.0,
    stats: dict | None = None,
) -> list[Beam]:
    """The `width` best finished beams for `prompt_tokens`, best first (see the module doc)."""
    # One loop on purpose (~80 lines): the beams, their caches and the finished heap change
    # together at every step; split, each piece would need all of them passed back.
    check_beam(width, alpha)
    if max_tokens < 1:
        raise ConfigError("E604", f"max-tokens={max_tokens} is out of range", "--max-tokens", "use a whole number >= 1")
    if not prompt_tokens:
        raise ConfigError("E602", "the prompt is empty", "prompt", "give a non-empty prompt")
    from mlxpt import _blas

    _blas.activate()
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    from mlxpt.decode.generate import add_stop_tokens

    tok = add_stop_tokens(tokenizer)
    stop_ids = set(tok.eos_token_ids)
    t0 = time.perf_counter()
    cache = make_prompt_cache(model)
    prompt = mx.array(list(prompt_tokens))[None]
    logits = model(prompt, cache=cache)[:, -1, :]

    live: list[tuple[list[int], float]] = [([], 0.0)]  # (tokens, summed log-prob) per cache row
    finished: list[Beam] = []
    steps = computed = 0
    for step in range(max_tokens):
        steps, computed = steps + 1, computed + len(live)
        logits = logits.astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total = logp + mx.array([s for _, s in live])[:, None]  # (B, V)
        V = total.shape[-1]
        k = min(2 * width + len(stop_ids), total.size)
        flat = total.reshape(-1)
        top = mx.argpartition(-flat, kth=k - 1)[:k]
        mx.eval(top, flat)
        top_np = np.array(top)
        vals = np.array(flat[top]).astype(np.float64)
        order = np.argsort(-vals, kind="stable")
        parents, next_live = [], []
        for j in order:
            flat_i, value = int(top_np[j]), float(vals[j])
            row, t = divmod(flat_i, V)
            toks = live[row][0]
            if t in stop_ids:
                finished.append(Beam(list(toks), "", value, length_penalty(value, len(toks) + 1, alpha), "stop"))
                continue
            if len(next_live) < width:
                parents.append(row)
                next_live.append((toks + [t], value))
        last = step == max_tokens - 1
        if last or not next_live:
            for toks, s in next_live if last else []:
                finished.append(Beam(toks, "", s, length_penalty(s, len(toks), alpha), "length"))
            break
        if len(finished) >= width:
            worst_kept = heapq.nlargest(width, (b.score for b in finished))[-1]
            best_live = max(length_penalty(s, len(t), alpha) for t, s in next_live)
            if best_live <= worst_kept:
                break
        _reorder(cache, mx.array(parents))
        live = next_live
        logits = model(mx.array([[t[-1]] for t, _ in live]), cache=cache)[:, -1, :]
    best = heapq.nlargest(width, finished, key=lambda b: b.score)
    for b in best:
        b.text = tok.decode(b.tokens)
    if stats is not None:
        stats["seconds"] = time.perf_counter() - t0
        stats["steps"] = steps
        stats["generated_tokens"] = computed  # tokens decoded over all live rows
    return best
