"""The PEFT types beside LoRA/DoRA/full: `prefix` (models/prefix.py) and `adapter` (bottleneck
adapters, models/bottleneck.py). Their adapter_config.json keeps mlx-lm's shape
(`fine_tune_type`, `num_layers`) with `prefix_parameters` or `adapter_parameters` in place of
`lora_parameters`; adapters.safetensors holds the trainable arrays by their model paths.
mlx-lm's own `--adapter-path` does not know these types; mlxpt's loaders do."""

from __future__ import annotations

from pathlib import Path

from mlxpt.errors import ConfigError

TYPES = ("prefix", "adapter")
PARAMS = {"prefix": "prefix_parameters", "adapter": "adapter_parameters"}
# the names of the trainable arrays (the end of each path), as --from checks an adapter's arrays
SUFFIXES = (".prefix_keys", ".prefix_values", ".adapter_down", ".adapter_down_bias", ".adapter_up", ".adapter_up_bias")
SUFFIXES += tuple(f"prefix_encoder.{name}" for name in ("embedding", "w1", "b1", "w2", "b2"))


def add_peft(model, kind: str, num: int, params: dict) -> dict:
    """Add `kind`'s trainable modules to the last `num` layers; return its parameters section."""
    if kind == "prefix":
        from mlxpt.models.prefix import add_prefix

        return add_prefix(model, num, int(params["length"]), int(params.get("projection", 0)))
    from mlxpt.models.bottleneck import add_bottlenecks

    return add_bottlenecks(model, num, int(params["size"]))


def parameters_of(cfg) -> dict:
    """An AdapterConfig's settings for `kind` in the saved form."""
    if cfg.fine_tune_type == "prefix":
        return {"length": cfg.prefix_length, "projection": cfg.prefix_projection}
    return {"size": cfg.adapter_size, "placement": "houlsby", "activation": "silu"}


def check_config(cfg: dict) -> None:
    """Raise ValueError when a prefix/adapter config lacks its parameters (read_adapter_config words it)."""
    params = cfg.get(PARAMS[cfg["fine_tune_type"]])
    need = ("length",) if cfg["fine_tune_type"] == "prefix" else ("size",)
    if not isinstance(params, dict) or any(not isinstance(params.get(k), int) or params[k] < 1 for k in need):
        raise ValueError(f"{PARAMS[cfg['fine_tune_type']]} needs {', '.join(need)} (integers >= 1)")


def load_peft(model, cfg: dict, weights: Path) -> None:
    """Rebuild the modules `cfg` describes on `model` and load their arrays from `weights`: every
    trainable array must be in the file with its shape (ValueError otherwise, worded E223 upstream)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    kind = cfg["fine_tune_type"]
    model.freeze()
    add_peft(model, kind, int(cfg["num_layers"]), cfg[PARAMS[kind]])
    want = dict(tree_flatten(model.trainable_parameters()))
    got = mx.load(str(weights))
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"missing {missing[0]} ({len(missing)} arrays missing)")
    for k, v in want.items():
        if got[k].shape != v.shape:
            raise ValueError(f"{k} has shape {tuple(got[k].shape)}, the model needs {tuple(v.shape)}")
    model.load_weights([(k, got[k]) for k in want], strict=False)
    if kind == "prefix":
        from mlxpt.models.prefix import materialise

        materialise(model)


def refuse_fuse(cfg: dict, where: str) -> None:
    """Fusing merges a low-rank update into existing weights; these types have none to merge."""
    kind = cfg.get("fine_tune_type")
    if kind == "prefix":
        raise ConfigError(
            "E764", "a prefix-tuned run cannot be fused: its prefix is extra attention positions, "
            "not a change to any weight", where, "use it as --adapter (generate, chat, eval, serve)",
        )  # fmt: skip
    if kind == "adapter":
        raise ConfigError(
            "E765", "a bottleneck-adapter run cannot be fused: its adapter is a nonlinear layer, "
            "not a change to any weight", where, "use it as --adapter (generate, chat, eval, serve)",
        )  # fmt: skip


def activation_bytes(model, tokens: int, heads: int) -> int:
    """Activations the prefix or the adapters add for `tokens` positions (memory.py's estimate):
    every query's scores over P more keys (scores and probabilities, float32); each adapter's
    bottleneck and output."""
    from mlxpt.models.bottleneck import SITES, BottleneckLinear, _site
    from mlxpt.models.prefix import PrefixAttention

    total = 0
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, PrefixAttention):
            total += heads * tokens * attn.length * 4 * 2
        for path in SITES:
            site = _site(layer, path)
            if isinstance(site, BottleneckLinear):
                r, d = site.adapter_up.shape
                total += tokens * (2 * r + d) * 4
    return total
