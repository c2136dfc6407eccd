"""Deterministic length-bucketed batches and padding (NumPy only).

Unlike mlx-lm, the remainder batch is kept (every row is trained every epoch) and padding
positions are never trained. The plan is a pure function of (lengths, batch_size, seed, epoch),
so resume restores the data position from (epoch, batch index) alone.
"""

from __future__ import annotations

import numpy as np

from mlxpt.data.encode import Example


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int = 8) -> list[list[int]]:
    """Batches of example indices: every index exactly once, similar lengths together.

    Lengths are grouped into buckets of `bucket` tokens; order inside a bucket and the order
    of batches are shuffled with an RNG derived from (seed, epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x6D6C7870])
    keys = np.asarray(lengths, dtype=np.int64) // max(1, bucket)
    order = np.lexsort((rng.permutation(n), keys))  # by bucket, random inside a bucket
    batches = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], pad_id: int, pad_to: int | None = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask): (B, L) int32, int32, float32, right-padded, padding untrained.

    inputs = tokens[:, :-1], targets = tokens[:, 1:], mask = mask[:, 1:]; L is rounded up to a
    multiple of `pad_to` (None or 1: no rounding) so fewer distinct shapes get compiled.
    """
    B = len(examples)
    L = max((len(e.tokens) - 1 for e in examples), default=0)
    L = max(L, 1)
    if pad_to and pad_to > 1:
        L = -(-L // pad_to) * pad_to
    inputs = np.full((B, L), pad_id, dtype=np.int32)
    targets = np.full((B, L), pad_id, dtype=np.int32)
    mask = np.zeros((B, L), dtype=np.float32)
    for b, e in enumerate(examples):
        n = len(e.tokens) - 1
        if n <= 0:
            continue
        t = np.asarray(e.tokens, dtype=np.int32)
        inputs[b, :n] = t[:-1]
        targets[b, :n] = t[1:]
        mask[b, :n] = np.asarray(e.mask[1:], dtype=np.float32)
    return inputs, targets, mask
