"""Compute backends behind one protocol (base.py). `create_backend` builds the model, its
trainable adapters and the optimiser for a backend name; the runner and the loop only talk to
the returned object."""

from __future__ import annotations

from mlxpt.errors import ConfigError

BACKENDS = ("mlx", "numpy")


def create_backend(name: str, model_cfg, adapter_cfg, train_cfg, objective, output: str = "logp"):
    """A ready-to-train backend: base weights loaded, adapters added, optimiser made.

    output="reward" trains a reward model (a scalar head on the final hidden state); MLX only."""
    if output == "reward" and name != "mlx":
        raise ConfigError("E516", f"the {name} backend cannot train a reward model", "backend", "use --backend mlx")
    if name == "mlx":
        from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
        from mlxpt.models.loader import load
        from mlxpt.train.adapters import apply_adapters

        model, _ = load(model_cfg.model, quantize=model_cfg.quantize, trust_remote_code=model_cfg.trust_remote_code)
        adapter_config = apply_adapters(model, adapter_cfg, seed=train_cfg.seed)
        if output == "reward":
            from mlxpt.train.rm import add_reward_head

            add_reward_head(model, seed=train_cfg.seed)
        optimizer = make_optimizer(train_cfg.optimizer, train_cfg.weight_decay)
        return MLXBackend(model, optimizer, objective, adapter_config=adapter_config, output=output)
    if name == "numpy":
        from mlxpt.backends.numpy_backend import create_numpy_backend

        return create_numpy_backend(model_cfg, adapter_cfg, train_cfg, objective)
    raise ConfigError("E511", f"unknown backend {name!r}", "backend", f"choose one of {', '.join(BACKENDS)}")
