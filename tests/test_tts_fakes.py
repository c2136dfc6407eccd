"""Fake language models with known logits and the byte tokenizer of tests/tiny.py, for fast,
exact tests of sampling, batched generation, voting, beam search and `mlxpt eval` (no weights).

`FakeLM(tokenizer, fn)`: `fn(history: list[int]) -> list[float] | np.ndarray` gives the next-token
logits from the tokens so far (prompt + generated), so a test scripts any distribution. The model
keeps a real mlx-lm KV cache (one layer, dummy keys) so batched generation can copy, slice and
reorder cache rows exactly as it does on a real model; the history of each row is carried in the
cache's keys (one float per position) so rows stay independent.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tiny import make_tokenizer


def byte_tokenizer(tmp_path):
    """The byte-level tokenizer of tests/tiny.py (256 byte tokens + ChatML specials), mlx-lm wrapped."""
    from mlx_lm.utils import load_tokenizer

    path = make_tokenizer(tmp_path / "byte_tok")
    return load_tokenizer(path)


class FakeLM(nn.Module):
    def __init__(self, vocab_size: int, fn):
        super().__init__()
        self.vocab_size, self.fn = vocab_size, fn
        self.layers = [nn.Identity()]
        self.calls = 0  # forward passes (a batched decode step counts once)

    def make_cache(self):
        from mlx_lm.models.cache import KVCache

        return [KVCache()]

    def __call__(self, x, cache=None, **kw):
        self.calls += 1
        B, L = x.shape
        vals = x.astype(mx.float32).reshape(B, 1, L, 1)  # token ids ride in the cache as keys
        if cache is not None:
            keys, _ = cache[0].update_and_fetch(vals, vals)
            hist = np.array(keys[:, 0, :, 0]).astype(np.int64)
        else:
            hist = np.array(vals[:, 0, :, 0]).astype(np.int64)
        T = hist.shape[1]
        out = np.zeros((B, L, self.vocab_size), np.float32)
        for b in range(B):
            for i in range(L):
                out[b, i] = np.asarray(self.fn(hist[b, : T - L + i + 1].tolist()), np.float32)
        return mx.array(out)


def uniform(vocab_size: int):
    return lambda history: np.zeros(vocab_size, np.float32)


def scripted(tokenizer, prompt_len: int, texts_and_probs: list[tuple[str, float]], vocab_size: int):
    """A model that, after the prompt, picks one of the scripted `texts` with the given
    probability at the first step and then spells it out (near-deterministically), then EOS.

    The first token of each text must differ."""
    eos = tokenizer.eos_token_id
    scripts = [(list(tokenizer.encode(t)), p) for t, p in texts_and_probs]
    firsts = [s[0] for s, _ in scripts]
    assert len(set(firsts)) == len(firsts), "scripted texts must start with different tokens"

    def fn(history):
        gen = history[prompt_len:]
        logits = np.full(vocab_size, -30.0, np.float32)
        if not gen:
            for s, p in scripts:
                logits[s[0]] = np.log(p)
            return logits
        for s, _ in scripts:
            if gen[0] == s[0]:
                nxt = s[len(gen)] if len(gen) < len(s) else eos
                logits[nxt] = 30.0
                return logits
        logits[eos] = 30.0
        return logits

    return fn
