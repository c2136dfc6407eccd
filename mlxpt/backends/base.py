"""The backend protocol the training loop is written against.

A backend owns the model, its trainable parameters and the optimiser. The loop hands it
micro-batches as NumPy arrays `(inputs, targets, *rest)`; the backend computes per-token
log-probs of `targets` and hands them with `rest` to the objective (mlxpt/objectives.py). Losses
are *sums* so that gradient accumulation over micro-batches equals one large batch exactly.

With output="logp_kl" it hands the objective `(logp, kl)`: kl[b, t] = KL(p_tuned || p_base) over
the vocabulary at each position, the base being the adapter as created (LoRA B = 0, DoRA m = ||W||)
swapped in for one extra pass, not a second copy of the weights. Full fine-tuning has no such base.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mlxpt.errors import ConfigError
from mlxpt.models.peft import SUFFIXES as PEFT_SUFFIXES

Batch = tuple[np.ndarray, ...]  # (inputs, targets, *objective arrays), e.g. (inputs, targets, mask)


class TrainBackend(Protocol):
    name: str
    adapter_config: dict

    def set_objective(self, objective) -> None:
        """The loss to train: `objective(outputs, *batch rest) -> (loss_sum, weight, aux)`."""

    def begin_window(self) -> None:
        """Mark the start of an accumulation window: `discard(rewind=True)` restores the RNG to here."""

    def accumulate(self, batch: Batch) -> None:
        """Add the gradient of this micro-batch's summed loss (may stay lazy)."""

    def reduce(self) -> tuple[float, float, float, dict]:
        """Evaluate the accumulated window: (loss sum, weight, grad norm of the mean, metric sums)."""

    def apply(self, lr: float, clip: float) -> None:
        """Clip and apply the mean gradient with learning rate `lr`, then clear the window."""

    def discard(self, rewind: bool = False) -> None:
        """Drop the accumulated window without updating; `rewind` also restores the RNG to the
        window start (an interrupted window is replayed exactly on resume)."""

    def evaluate(self, batch: Batch) -> tuple[float, float, dict]:
        """(loss sum, weight, metric sums) without gradients."""

    def get_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Everything exact resume needs as arrays: adapters, optimiser, RNG."""

    def set_state(self, arrays: dict[str, dict[str, np.ndarray]]) -> None: ...

    def peak_memory(self) -> int: ...

    def token_logps(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(B, L) log-probs of `targets`, eval mode, no gradient."""

    def kl_to_reference(self, inputs: np.ndarray) -> np.ndarray:
        """(B, L) float32 KL(p_tuned || p_base) over the vocabulary after each prefix of `inputs`,
        eval mode, no gradient; raises `no_base_error()` for full fine-tuning."""

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""

    def check_memory(self, shape) -> dict:
        """Estimate peak training memory of one pass (a train.memory.Shape); raise
        ResourceError (exit 3) if it cannot fit."""

    def save_adapter(self, folder) -> None:
        """Write the trainable weights and their config (mlx-lm's adapter format) atomically."""

    def start_from(self, arrays: dict[str, np.ndarray]) -> None:
        """Start from a saved LoRA/DoRA adapter (`--from`): `arrays` become the trainable adapter
        weights and the reference of `token_logps(reference=True)`; the base of the KL to base
        and of the forgetting monitor stays the adapter-off pass. E577 if they do not fit."""

    def at_start(self) -> bool:
        """Whether the adapter is still as the run started (DPO computes its reference only then)."""


def no_base_error(
    field: str = "fine_tune_type", hint: str = "use lora or dora", purpose: str = "the KL to the base"
) -> ConfigError:
    """E550: full fine-tuning changes the weights themselves, so there is no adapter-off base."""
    return ConfigError("E550", f"full fine-tuning has no adapter to switch off for {purpose}", field, hint)


ADAPTER_SUFFIXES = (".lora_a", ".lora_b", ".m")  # LoRA/DoRA weights in mlx-lm's names
ADAPTER_SUFFIXES += PEFT_SUFFIXES  # prefix tuning, bottleneck adapters (models/peft.py)


def check_adapter_fits(arrays: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
    """E577 unless `arrays` (a --from adapter) has exactly the adapter weights in `shapes`
    (name -> shape of this run's LoRA/DoRA arrays)."""
    mine = {k: tuple(v) for k, v in shapes.items() if k.endswith(ADAPTER_SUFFIXES)}
    problem = None
    missing, extra = sorted(set(mine) - set(arrays)), sorted(set(arrays) - set(mine))
    if missing:
        problem = f"it has no {missing[0]} ({len(missing)} weights missing)"
    elif extra:
        problem = f"this run has no {extra[0]} ({len(extra)} weights left over)"
    else:
        bad = [k for k in sorted(mine) if tuple(arrays[k].shape) != mine[k]]
        if bad:
            problem = f"{bad[0]} is {tuple(arrays[bad[0]].shape)}, this run's is {mine[bad[0]]}"
    if problem:
        raise ConfigError(
            "E577", f"the --from adapter does not fit this run's adapters: {problem}", "from_run",
            "use the model it was trained on and its rank, num_layers and targets (left at their defaults, they are taken from it)",
        )  # fmt: skip
