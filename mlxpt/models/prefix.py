"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190) on mlx-lm's Llama-family attention.

Each adapted layer gets P trained key and value vectors per KV head, put in front of the
attention's keys and values: every query attends to the P prefix positions plus its causal past.
The real tokens keep their positions (RoPE is applied to their keys as before); the prefix keys
are stored already "positioned" (no RoPE on them), so they mean the same at every offset.

The wrapper adds no code of its own to the attention: it hands mlx-lm's `Attention` a stand-in
cache whose `update_and_fetch` returns [prefix, real keys] (real keys from the model's own KV
cache when there is one, as mlx_packing.py does for packed rows) and widens the mask by P
always-visible columns. So training, prompt caches and batched decode all see the prefix.

Optional reparameterisation (`--prefix-projection H`, the paper's MLP): one shared MLP
(P, d) embedding -> Linear(d, H) -> tanh -> Linear(H, layers * 2 * KV * hd) makes every layer's
keys and values. The saved adapter holds the MLP (what training resumes from and `--from`
continues); loading it for inference computes its output once and keeps only that.

Departures from the paper: the prefix is initialised uniformly at random (not from real-word
activations), and "the adapter as created" (the reference of DPO/GRPO and the KL-to-base) is
this random prefix, since no prefix is a no-op.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxpt.errors import ConfigError, ModelError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def _shape(model) -> tuple[int, int, int]:
    """(KV heads, head dim, hidden size) of a Llama-family model."""
    args = model.args
    hd = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    kv = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    return kv, hd, args.hidden_size


class PrefixEncoder(nn.Module):
    """The reparameterisation MLP; `layer(j)` is the j-th adapted layer's (keys, values), each (KV, P, hd)."""

    def __init__(self, length: int, dim: int, hidden: int, layers: int, kv: int, hd: int):
        super().__init__()
        self.kv, self.hd = kv, hd
        self.embedding = mx.random.uniform(-1.0, 1.0, (length, dim))
        self.w1 = mx.random.uniform(-(dim**-0.5), dim**-0.5, (hidden, dim))
        self.b1 = mx.zeros((hidden,))
        self.w2 = mx.random.uniform(-(hidden**-0.5), hidden**-0.5, (layers * 2 * kv * hd, hidden))
        self.b2 = mx.zeros((layers * 2 * kv * hd,))

    def layer(self, j: int) -> tuple[mx.array, mx.array]:
        n = 2 * self.kv * self.hd
        h = mx.tanh(self.embedding @ self.w1.T + self.b1)  # (P, H)
        out = h @ self.w2[j * n : (j + 1) * n].T + self.b2[j * n : (j + 1) * n]  # (P, 2 * KV * hd)
        out = out.reshape(-1, 2, self.kv, self.hd).transpose(1, 2, 0, 3)  # (2, KV, P, hd)
        return out[0], out[1]


class _PrefixCache:
    """The stand-in cache one attention call sees: RoPE offset and real keys from the model's cache."""

    def __init__(self, inner, keys: mx.array, values: mx.array):
        if inner is not None and hasattr(inner, "bits"):
            raise ModelError(
                "E762", "prefix tuning does not work with a quantised KV cache", type(inner).__name__,
                "decode with the plain KV cache (leave KV-cache quantisation off)",
            )  # fmt: skip
        self.inner, self.keys, self.values = inner, keys, values

    @property
    def offset(self):
        return 0 if self.inner is None else self.inner.offset

    def update_and_fetch(self, keys, values):
        if self.inner is not None:
            keys, values = self.inner.update_and_fetch(keys, values)
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


def widen_mask(mask, P: int):
    """The mask with P always-visible key columns in front. "causal" stays as is: MLX aligns it
    to the bottom right, so with P more keys every query already sees the whole prefix."""
    if mask is None or isinstance(mask, str):
        return mask
    shape = (*mask.shape[:-1], P)
    front = mx.ones(shape, mx.bool_) if mask.dtype == mx.bool_ else mx.zeros(shape, mask.dtype)
    return mx.concatenate([front, mask], axis=-1)


class PrefixAttention(nn.Module):
    """mlx-lm attention with P trained key/value positions in front of the real ones."""

    def __init__(self, attn, kv: int, length: int, hd: int, encoder: PrefixEncoder | None = None, index: int = 0):
        super().__init__()
        self.attn = attn
        self.length = length
        if encoder is None:
            s = hd**-0.5
            self.prefix_keys = mx.random.uniform(-s, s, (kv, length, hd))
            self.prefix_values = mx.random.uniform(-s, s, (kv, length, hd))
        else:  # shared by every layer: held outside this module's parameters (a closure)
            self._encoder, self._index = (lambda: encoder), index

    def prefix(self) -> tuple[mx.array, mx.array]:
        if "prefix_keys" in self:
            return self.prefix_keys, self.prefix_values
        return self._encoder().layer(self._index)

    def __call__(self, x, mask=None, cache=None):
        k, v = self.prefix()
        B = x.shape[0]
        k = mx.broadcast_to(k[None], (B, *k.shape)).astype(x.dtype)  # (B, KV, P, hd)
        v = mx.broadcast_to(v[None], (B, *v.shape)).astype(x.dtype)
        return self.attn(x, mask=widen_mask(mask, self.length), cache=_PrefixCache(cache, k, v))


def check_supported(model) -> None:
    kind = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    attn = getattr(model.layers[0], "self_attn", None) if len(model.layers) else None
    if kind not in SUPPORTED or not hasattr(attn, "n_kv_heads"):
        raise ConfigError(
            "E760", f"prefix tuning does not support the {kind!r} model type", "--fine-tune-type prefix",
            f"supported: {', '.join(SUPPORTED)}; use --fine-tune-type lora or adapter for this model",
        )  # fmt: skip


def add_prefix(model, num: int, length: int, projection: int = 0) -> dict:
    """Wrap the attention of the last `num` layers; return the adapter config's `prefix_parameters`.
    Random draws, in order (the NumPy backend replays them): with a projection the encoder's
    embedding, w1, w2; without, each layer's keys then values, first adapted layer first."""
    check_supported(model)
    kv, hd, dim = _shape(model)
    layers = model.layers[len(model.layers) - num :]
    encoder = None
    if projection > 0:
        encoder = PrefixEncoder(length, dim, projection, num, kv, hd)
        model.prefix_encoder = encoder
    for j, layer in enumerate(layers):
        layer.self_attn = PrefixAttention(layer.self_attn, kv, length, hd, encoder, j)
    return {"length": length, "projection": projection}


def materialise(model) -> None:
    """For inference: each layer keeps its computed prefix; the MLP is dropped (same output)."""
    if "prefix_encoder" not in model:
        return
    for layer in model.layers:
        attn = layer.self_attn
        if isinstance(attn, PrefixAttention) and "prefix_keys" not in attn:
            attn.prefix_keys, attn.prefix_values = attn.prefix()
            del attn._encoder
    mx.eval(model.parameters())
    del model["prefix_encoder"]
