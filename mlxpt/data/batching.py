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


def trained_positions(mask: np.ndarray, multiple: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight): the flat positions of `mask` (any shape, read in C order) that are
    trained (nonzero), int32, and their mask values, float32, padded up to a multiple of
    `multiple` (at least one) with index 0 and weight 0, so a compiled step sees few shapes.
    The vocabulary head runs only at these (backends/mlx_backend.py); -sum(weight * logp[index])
    and weight.sum() are the loss sum and weight of -sum(mask * logp) and mask.sum()."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    flat = np.asarray(mask, dtype=np.float32).reshape(-1)
    where = np.flatnonzero(flat)
    size = max(-(-len(where) // multiple), 1) * multiple
    index = np.zeros(size, dtype=np.int32)
    weight = np.zeros(size, dtype=np.float32)
    index[: len(where)], weight[: len(where)] = where, flat[where]
    return index, weight


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: indices into `lengths` grouped in bins of at most `capacity` tokens.

    Longest first (ties by index), each into the fullest bin it still fits, else a new bin; a
    row longer than `capacity` gets a bin of its own. A pure function of its arguments, so the
    bins of a micro-batch are fixed by the data plan (exact resume)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _round(n: int, pad_to: int | None) -> int:
    step = pad_to if pad_to and pad_to > 1 else 1
    return -(-max(n, 1) // step) * step


def choose_bins(sizes: list[int], capacity: int, pad_to: int | None = 8) -> list[list[int]]:
    """The bins of one micro-batch: every bin is padded to the fullest one, so after
    best-fit-decreasing (the fewest bins, k) the rows are also spread longest-first onto the
    emptiest of k, k + 1, ... bins, up to one row per bin (padded rows); the layout with the fewest
    computed positions (bins x fullest bin) wins, ties keep fewer bins. Deterministic."""
    best = pack_bins(sizes, capacity)
    cost = len(best) * _round(max([sum(sizes[i] for i in b) for b in best] + [0]), pad_to)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    for k in range(len(best), len(sizes) + 1):
        bins: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        for i in order:
            b = min(range(k), key=lambda b: (load[b], b))
            bins[b].append(i)
            load[b] += sizes[i]
        if max(load) > capacity and max(sizes) <= capacity:
            continue
        c = k * _round(max(load), pad_to)
        if c < cost:
            best, cost = bins, c
    return best


def collate_packed(
    examples: list[Example], pad_id: int, capacity: int, pad_to: int | None = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, segments, mask): the rows of `collate` packed into bins of `capacity`
    positions (`choose_bins`), each row's inputs/targets/mask laid end to end in its bin.

    segments[b, t] is the row (0, 1, ...) that position t of bin b belongs to, -1 for padding:
    attention is causal inside a segment only, so no token sees another row. Positions run on
    across a bin; with RoPE only relative positions inside a row matter (backends check this)."""
    sizes = [max(len(e.tokens) - 1, 0) for e in examples]
    bins = choose_bins(sizes, capacity, pad_to)
    L = _round(max([sum(sizes[i] for i in b) for b in bins] + [1]), pad_to)
    n = max(len(bins), 1)
    inputs = np.full((n, L), pad_id, dtype=np.int32)
    targets = np.full((n, L), pad_id, dtype=np.int32)
    segments = np.full((n, L), -1, dtype=np.int32)
    mask = np.zeros((n, L), dtype=np.float32)
    for b, rows in enumerate(bins):
        at = 0
        for s, i in enumerate(rows):
            k = sizes[i]
            if k == 0:
                continue
            t = np.asarray(examples[i].tokens, dtype=np.int32)
            inputs[b, at : at + k], targets[b, at : at + k] = t[:-1], t[1:]
            segments[b, at : at + k] = s
            mask[b, at : at + k] = np.asarray(examples[i].mask[1:], dtype=np.float32)
            at += k
    return inputs, targets, segments, mask


def packing_efficiency(
    lengths: list[int], batch_size: int, capacity: int, seed: int = 0, pad_to: int | None = 8
) -> dict:
    """Real tokens / computed positions over one epoch of the data plan, padded rows vs packed
    bins. `lengths` are token counts per row (inputs are one shorter)."""
    real = padded = packed = 0
    for idx in batch_plan(lengths, batch_size, seed, 0):
        sizes = [max(lengths[i] - 1, 0) for i in idx]
        real += sum(sizes)
        padded += len(sizes) * _round(max(sizes), pad_to)
        bins = choose_bins(sizes, capacity, pad_to)
        packed += len(bins) * _round(max(sum(sizes[i] for i in b) for b in bins), pad_to)
    return {
        "real_tokens": real,
        "padded_positions": padded,
        "packed_positions": packed,
        "padded_efficiency": real / max(padded, 1),
        "packed_efficiency": real / max(packed, 1),
    }
