"""Compute backends behind one protocol (base.py). `create_backend` builds the model, its
trainable adapters and the optimiser for a backend name; the runner and the loop only talk to
the returned object."""

from __future__ import annotations

from collections.abc import Callable

from mlxpt.errors import ConfigError

BACKENDS = ("mlx", "numpy")


def create_backend(
    name: str,
    model_cfg,
    adapter_cfg,
    train_cfg,
    objective=None,
    output: str = "logp",
    extend_model: Callable | None = None,
    save: Callable | None = None,
):
    """A ready-to-train backend: base weights loaded, adapters added, optimiser made.

    Backends know nothing of methods; a method shapes them through plain values and hooks:
    `objective` (may be set later with `set_objective`), `output` ("logp" per token, "reward" per
    row: see MLXBackend), `extend_model(model, seed)` after the adapters are added (e.g. a reward
    head) and `save(folder, model, adapter_config)` in place of the adapter save. MLX only for
    the hooks and "reward". `train_cfg.grad_checkpoint` recomputes each block in the backward on
    MLX; the NumPy backend always does (numpy_model.py), so there it changes nothing."""
    if (output == "reward" or extend_model or save) and name != "mlx":
        raise ConfigError("E516", f"the {name} backend cannot train a reward model", "backend", "use --backend mlx")
    if name == "mlx":
        from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
        from mlxpt.models.adapters import apply_adapters
        from mlxpt.models.loader import load

        model, _ = load(model_cfg.model, quantize=model_cfg.quantize, trust_remote_code=model_cfg.trust_remote_code)
        adapter_config = apply_adapters(model, adapter_cfg, seed=train_cfg.seed)
        if extend_model is not None:
            extend_model(model, seed=train_cfg.seed)
        optimizer = make_optimizer(train_cfg.optimizer, train_cfg.weight_decay)
        return MLXBackend(
            model, optimizer, objective, adapter_config=adapter_config, output=output, save=save,
            grad_checkpoint=train_cfg.grad_checkpoint,
        )  # fmt: skip
    if name == "numpy":
        from mlxpt.backends.numpy_backend import create_numpy_backend

        return create_numpy_backend(model_cfg, adapter_cfg, train_cfg, objective, output=output)
    raise ConfigError("E511", f"unknown backend {name!r}", "backend", f"choose one of {', '.join(BACKENDS)}")
