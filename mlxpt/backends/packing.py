"""Packed rows: several rows of a micro-batch laid end to end in one bin, attention block-diagonal.

`data/batching.collate_packed` lays rows out as (inputs, targets, segments, ...) with segments[b, t]
the row a position belongs to (-1: padding). Positions run on across a bin, so a row that starts
at position 40 is rotated by RoPE as if it started there; attention scores depend only on the
difference of two positions, so its logits equal those of the row alone. That holds for RoPE and
no-position-embedding models only: absolute position embeddings, ALiBi variants with their own
masks or unknown attention code break it. `self_check` therefore compares the packed pass with the
plain one on the loaded model before a run uses it (NumPy only here, both backends call it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def check_rows(vocab: int = 50) -> list[list[int]]:
    """Three random rows, long and short, each with its own first token (a BOS-like start)."""
    rng = np.random.default_rng(0)
    return [rng.integers(1, vocab, n).tolist() for n in (9, 3, 6)]


def self_check(plain: Callable, packed: Callable, tol: float = 0.05) -> tuple[bool, str]:
    """Do packed log-probs equal the plain per-row ones? `plain(inputs, targets)` and
    `packed(inputs, targets, segments)` return (B, L) log-probs as NumPy. (ok, what was found)."""
    rows = check_rows()
    try:
        L = sum(len(r) - 1 for r in rows)
        inputs, targets = np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
        segments = np.zeros((1, L), np.int32)
        at = 0
        for s, r in enumerate(rows):
            k = len(r) - 1
            inputs[0, at : at + k], targets[0, at : at + k], segments[0, at : at + k] = r[:-1], r[1:], s
            at += k
        got = np.asarray(packed(inputs, targets, segments))[0]
        worst, at = 0.0, 0
        for r in rows:
            k = len(r) - 1
            ref = np.asarray(plain(np.array([r[:-1]], np.int32), np.array([r[1:]], np.int32)))[0]
            worst = max(worst, float(np.abs(ref - got[at : at + k]).max()))
            at += k
    except Exception as e:  # noqa: BLE001 - an architecture this does not fit: train whole rows
        return False, f"{type(e).__name__}: {e}"
    return worst <= tol, f"max |difference| {worst:.2g} nats"
