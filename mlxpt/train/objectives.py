"""Training objectives as pure functions of per-token log-probs.

Every objective takes `logp` (B, L), the log-probability of each target token under the model,
plus the batch's other arrays, and returns `(loss_sum, weight, aux)`: the loss summed over its
units (tokens for SFT, pairs for preference losses), how many units, and a dict of metric sums.
Sums, not means, make gradient accumulation over micro-batches equal one big batch. The
functions use only operators and `.sum()`, so they run on mlx arrays (autodiff) and on NumPy
arrays alike; each comes with its closed-form dL/d(logp) for backends without autodiff.
"""

from __future__ import annotations


def sft_objective(logp, mask):
    """Negative log-likelihood of the trained tokens: loss = -sum(mask * logp) over `mask.sum()` tokens."""
    return -(logp * mask).sum(), mask.sum(), {}


def sft_grad(logp, mask):
    """d(loss_sum)/d(logp) for `sft_objective`."""
    return -mask
