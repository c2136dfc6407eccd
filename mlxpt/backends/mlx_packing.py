"""MLX side of packed rows (see packing.py): the block-diagonal causal mask handed to an mlx-lm
model through its cache argument, as shared_prefix.py does for shared prompts.

mlx-lm attention asks `create_attention_mask(h, cache)`, which defers to `cache.make_mask`; RoPE
reads `cache.offset` (0: positions run on across the bin); `update_and_fetch` hands the keys and
values straight back. The mask is one boolean (B, 1, L, L) array per forward, which
`mx.fast.scaled_dot_product_attention` takes as is.
"""

from __future__ import annotations

import mlx.core as mx

from mlxpt.backends.mlx_logprob import token_logprob


class _SegmentCache:
    """One layer's stand-in cache for a training pass over packed bins: no state kept."""

    offset = 0

    def __init__(self, segments: mx.array):
        self.segments = segments  # (B, L) row of each position, -1 for padding

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size=None, **kw):
        q = mx.arange(N)[:, None]
        k = mx.arange(N)[None]
        mask = q >= k
        if window_size is not None:
            mask = mask & (q < k + window_size)
        same = self.segments[:, None, :, None] == self.segments[:, None, None, :]  # (B, 1, L, L)
        return mask & same  # a padding position sees earlier padding and itself: never all masked


def segment_caches(model, segments) -> list:
    """One stand-in cache per layer: attention confined to each position's row of a bin."""
    return [_SegmentCache(segments) for _ in model.layers]


def packed_token_logp(model, inputs, targets, segments):
    """(B, L) float32 log-probs of `targets` with attention confined to each position's row."""
    logits = model(inputs, cache=segment_caches(model, segments)).astype(mx.float32)
    return token_logprob(logits, targets)
