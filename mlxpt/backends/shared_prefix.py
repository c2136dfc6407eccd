"""Per-token log-probs of G completions of one prompt with the prompt run once, not G times.

GRPO scores groups: every row of a group is the same prompt followed by a different completion.
A causal model's states at the prompt positions do not depend on what follows, so the prompt
needs one pass per group, not one per row. Here the prompt goes through the model once (its keys
and values kept per layer), those keys/values are repeated to the G rows, and only the completion
tokens go through the model again, attending to them. The vocabulary head runs only where a
completion token is predicted. Gradients flow through both passes (the prompt's keys/values
depend on the adapter), so this is the same function as the plain full-sequence pass, up to
float rounding; `self_check` compares the two on the loaded model before it is used.

With prompts of about 80 tokens and completions of about 27, a group of 8 runs 80 + 8 x 27 = 296
positions instead of 8 x 107 = 856.

Layout (all int32):
- `prompts` (n_groups, P): left-padded, so the last prompt token is at P - 1 in every row;
- `left_pad` (n_groups,): the padding of each prompt;
- `completions` (n_groups * G, C): right-padded, row g * G + j is completion j of prompt g.
Returns (n_groups * G, C) float32: log p(completions[:, t] | prompt, completions[:, :t]).

Left padding keeps RoPE positions as in the unpadded prompt (per-row offsets, as mlx-lm's
BatchKVCache does), and padded keys are masked. This works for mlx-lm models whose attention uses
`cache.offset`, `cache.update_and_fetch` and `create_attention_mask`: tested on llama, qwen2,
qwen3, phi3, gemma3 (sliding-window layers), olmo2 and starcoder2. `self_check` finds the ones
it does not fit (gemma2, whose attention cannot take a per-row mask) and GRPO then scores whole
rows.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxpt.backends.mlx_logprob import token_logprob


class _PrefixCache:
    """One layer's cache for a training pass in two stages: the prompts (one row per group),
    then the completions (G rows per group) attending to the prompts' keys/values."""

    def __init__(self, left_pad: mx.array):
        self.left_pad = left_pad
        self.offset = -left_pad  # RoPE position of each row's first stored key
        self.prefix: tuple[mx.array, mx.array] | None = None
        self.length = 0  # keys stored before the current call
        self.stage = 1
        self.G = 1

    def to_stage2(self, G: int, prompt_len: int) -> None:
        self.stage, self.G = 2, G
        self.left_pad = mx.repeat(self.left_pad, G, axis=0)
        self.offset = prompt_len - self.left_pad
        self.length = prompt_len

    def update_and_fetch(self, keys, values):
        if self.stage == 1:
            self.prefix = (keys, values)
            return keys, values
        if self.prefix is None:  # one-token prompts: nothing before the completions
            return keys, values
        pk, pv = (mx.repeat(a, self.G, axis=0) for a in self.prefix)
        return mx.concatenate([pk, keys], axis=2), mx.concatenate([pv, values], axis=2)

    def make_mask(self, N: int, return_array: bool = False, window_size=None, **kw):
        total = self.length + N
        q = mx.arange(self.length, total)[:, None]
        k = mx.arange(total)[None]
        mask = (q >= k) & (k >= self.left_pad[:, None, None, None])
        if window_size is not None:
            mask = mask & (q < k + window_size)
        if self.stage == 1:  # a padding query sees only itself: no row is all masked (no NaN)
            mask = mask | (q == k)
        return mask


def _body(model):
    """The model without its vocabulary head, where mlx-lm exposes it (`model.model`)."""
    inner = getattr(model, "model", None)
    return inner if callable(inner) and hasattr(inner, "layers") else model


def grouped_token_logp(model, prompts, left_pad, completions):
    """See the module docstring."""
    n_groups, P = prompts.shape
    G = completions.shape[0] // n_groups
    caches = [_PrefixCache(left_pad) for _ in model.layers]
    if P > 1:
        _body(model)(prompts[:, :-1], cache=caches)
    for c in caches:
        c.to_stage2(G, P - 1)
    last = mx.repeat(prompts[:, -1:], G, axis=0)
    inputs = mx.concatenate([last, completions[:, :-1]], axis=1)
    logits = model(inputs, cache=caches).astype(mx.float32)
    return token_logprob(logits, completions)


def layout(prompts: list[list[int]], completions: list[list[int]], pad: int, pad_to: int = 1) -> tuple[np.ndarray, ...]:
    """(prompts, left_pad, completions) arrays from token lists; `completions` holds G per prompt,
    grouped by prompt. Both lengths are rounded up to a multiple of `pad_to` (fewer shapes to
    compile)."""
    P = -(-max(len(p) for p in prompts) // pad_to) * pad_to
    C = -(-max(1, max(len(c) for c in completions)) // pad_to) * pad_to
    pr = np.full((len(prompts), P), pad, np.int32)
    lp = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):
        lp[i] = P - len(p)
        pr[i, lp[i] :] = p
    co = np.full((len(completions), C), pad, np.int32)
    for i, c in enumerate(completions):
        co[i, : len(c)] = c
    return pr, lp, co


def self_check(model, token_logp, tol: float = 0.05) -> tuple[bool, str]:
    """Does `grouped_token_logp` give the plain pass's log-probs on this model? Two prompts of
    different lengths, G = 2, random tokens, no gradient. (ok, what was found)."""
    rng = np.random.default_rng(0)
    vocab = 50  # below any real vocabulary size
    prompts = [rng.integers(1, vocab, 5).tolist(), rng.integers(1, vocab, 3).tolist()]
    comps = [rng.integers(1, vocab, n).tolist() for n in (4, 2, 3, 4)]
    try:
        pr, lp, co = layout(prompts, comps, 0)
        got = np.array(grouped_token_logp(model, mx.array(pr), mx.array(lp), mx.array(co)))
        worst = 0.0
        for i, c in enumerate(comps):
            seq = prompts[i // 2] + c
            ref = np.array(token_logp(model, mx.array([seq[:-1]]), mx.array([seq[1:]])))[0, -len(c) :]
            worst = max(worst, float(np.abs(ref - got[i, : len(c)]).max()))
    except Exception as e:  # noqa: BLE001 - an architecture this does not fit: score the plain way
        return False, f"{type(e).__name__}: {e}"
    return worst <= tol, f"max |difference| {worst:.2g} nats"
