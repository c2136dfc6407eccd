"""The backend protocol the training loop is written against.

A backend owns the model, its trainable parameters and the optimiser. The loop hands it
micro-batches as NumPy arrays `(inputs, targets, mask)`; losses are token *sums* so that
gradient accumulation over micro-batches equals one large batch exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


class TrainBackend(Protocol):
    name: str

    def accumulate(self, batch: Batch) -> None:
        """Add the gradient of this micro-batch's summed loss (may stay lazy)."""

    def reduce(self) -> tuple[float, float, float]:
        """Evaluate the accumulated window: (loss sum, trained tokens, grad norm of the mean)."""

    def apply(self, lr: float, clip: float) -> None:
        """Clip and apply the mean gradient with learning rate `lr`, then clear the window."""

    def discard(self, rewind: bool = False) -> None:
        """Drop the accumulated window without updating; `rewind` also restores the RNG to the
        window start (an interrupted window is replayed exactly on resume)."""

    def evaluate(self, batch: Batch) -> tuple[float, float]:
        """(loss sum, trained tokens) without gradients."""

    def get_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Everything exact resume needs as arrays: adapters, optimiser, RNG."""

    def set_state(self, arrays: dict[str, dict[str, np.ndarray]]) -> None: ...

    def peak_memory(self) -> int: ...
