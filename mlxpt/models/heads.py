"""Reward head: a bias-free Linear(hidden, 1) in float32 on a decoder's final (normed) hidden state,
how it is added to an mlx-lm model, and how it is saved and read (`reward_head.safetensors`
beside mlx-lm's adapter files). The head starts random (normal, std 1/sqrt(hidden)) from the run
seed, so the adapter gets gradient from step 1. Training is train/rm.py; scoring with a trained
one is decode/reward_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxpt.errors import ConfigError, ModelError
from mlxpt.models.adapters import ADAPTER_FILE, CONFIG_FILE, trainable
from mlxpt.runs import atomic_write_json, save_safetensors_atomic

HEAD_FILE = "reward_head.safetensors"
HEAD = "reward_head"  # the head's attribute on the model (and its key prefix)


def add_reward_head(model, seed: int = 0) -> None:
    """Attach a trainable bias-free Linear(hidden, 1) as `model.reward_head` (float32)."""
    import mlx.core as mx
    import mlx.nn as nn

    hidden = getattr(getattr(model, "args", None), "hidden_size", None)
    if not callable(getattr(model, "model", None)) or not hidden:
        raise ConfigError(
            "E519",
            f"{type(model).__module__} has no `model` backbone with a hidden_size",
            "model",
            "a reward model needs an mlx-lm decoder (llama, mistral, qwen2, ...)",
        )
    head = nn.Linear(hidden, 1, bias=False)
    head.weight = mx.random.normal((1, hidden), key=mx.random.key(seed + 1)) / hidden**0.5
    setattr(model, HEAD, head)


def save_reward_model(folder: str | Path, model, adapter_config: dict) -> None:
    """The head to `reward_head.safetensors`, the rest to mlx-lm's adapter files (each atomic)."""
    folder = Path(folder)
    arrays = {k: np.array(v) for k, v in trainable(model).items()}
    head = {k: v for k, v in arrays.items() if k.startswith(HEAD + ".")}
    save_safetensors_atomic(
        folder / HEAD_FILE, head, {"format": "mlx", "hidden_size": str(head[f"{HEAD}.weight"].shape[1])}
    )
    save_safetensors_atomic(
        folder / ADAPTER_FILE, {k: v for k, v in arrays.items() if k not in head}, {"format": "mlx"}
    )
    atomic_write_json(folder / CONFIG_FILE, adapter_config)


def head_rewards(model, inputs, last):
    """float32 scalar rewards: `model.reward_head` on the final (normed) hidden state at index
    `last` of each row, (B,) for `last` of shape (B,) (a reward model: one per row) and (B, S)
    for (B, S) (a process reward model: one per step end). Skips the vocabulary head entirely."""
    import mlx.core as mx

    h = model.model(inputs)  # (B, L, D)
    rows = mx.arange(h.shape[0])
    h = h[rows[:, None], last] if last.ndim == 2 else h[rows, last]  # (B, S, D) or (B, D)
    return model.reward_head(h.astype(mx.float32)).squeeze(-1)


def read_head(path: Path, code: str = "E518", method: str = "rm") -> dict[str, np.ndarray]:
    """The head's tensors; anything but a readable safetensors file is a one-line error (never
    unpickled), with the loader's `code` and the `method` that writes the file."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ModelError(
            code, f"{HEAD_FILE} is not a valid safetensors file ({str(e).splitlines()[0][:80]})", str(path),
            f"re-save the model with mlxpt train {method}",
        ) from None  # fmt: skip


def set_head(model, weights: dict[str, np.ndarray], path: Path, code: str = "E518") -> None:
    """Attach a head and load `weights` into it; a head of another shape is a one-line error."""
    import mlx.core as mx

    add_reward_head(model)
    w = weights.get(f"{HEAD}.weight")
    if w is None or tuple(w.shape) != tuple(model.reward_head.weight.shape):
        raise ModelError(
            code,
            f"{HEAD_FILE} does not fit this model (expected {HEAD}.weight of shape {tuple(model.reward_head.weight.shape)})",
            str(path),
            "load it with the model it was trained on",
        )
    model.reward_head.weight = mx.array(w.astype(np.float32))
