"""Prefix tuning and bottleneck adapters for the NumPy reference model (numpy_model.py), forward
and analytic backward, with the parametrisation and initial draws of models/prefix.py and
models/bottleneck.py (same parameter names, the same MLX key sequence replayed by `MLXKeys`).

The model registers each in its `adapters` dict under a key that is no linear's path
(`<layer>.self_attn#prefix`, `<linear>#adapter`), so the backend sees trainable adapters (it keeps
the adapter as created as its reference) while `_lin` leaves them alone.
"""

from __future__ import annotations

import numpy as np

from mlxpt.backends.numpy_ops import MLXKeys

SITES = ("self_attn.o_proj", "mlp.down_proj")
ENCODER = "prefix_encoder."


class Prefix:
    """Layer `layer`'s prefix: its own arrays, or row block `index` of the shared encoder's output."""

    dropout = 0.0

    def __init__(self, layer: int, index: int, length: int, projected: bool):
        self.layer, self.index, self.length, self.projected = layer, index, length, projected


class Bottleneck:
    dropout = 0.0


def add(model, kind: str, first: int, params: dict, keys: MLXKeys) -> None:
    """Add `kind` ("prefix" or "adapter") to layers first.. of `model`, drawing as MLX does."""
    a, dt = model.args, model.dtype
    n = a.num_hidden_layers
    if kind == "adapter":
        r = int(params["size"])
        for i in range(first, n):
            for site in SITES:
                path = f"model.layers.{i}.{site}"
                d = model.w[path + ".weight"].shape[0]
                s = d**-0.5
                model.params[path + ".adapter_down"] = keys.uniform(-s, s, (d, r)).astype(dt)
                model.params[path + ".adapter_down_bias"] = np.zeros(r, dt)
                model.params[path + ".adapter_up"] = np.zeros((r, d), dt)
                model.params[path + ".adapter_up_bias"] = np.zeros(d, dt)
                model.adapters[path + "#adapter"] = Bottleneck()
        return
    P, H = int(params["length"]), int(params.get("projection", 0))
    KV, hd, D = a.num_key_value_heads, a.head_dim, a.hidden_size
    if H > 0:
        out = (n - first) * 2 * KV * hd
        model.params[ENCODER + "embedding"] = keys.uniform(-1.0, 1.0, (P, D)).astype(dt)
        model.params[ENCODER + "w1"] = keys.uniform(-(D**-0.5), D**-0.5, (H, D)).astype(dt)
        model.params[ENCODER + "b1"] = np.zeros(H, dt)
        model.params[ENCODER + "w2"] = keys.uniform(-(H**-0.5), H**-0.5, (out, H)).astype(dt)
        model.params[ENCODER + "b2"] = np.zeros(out, dt)
    for j, i in enumerate(range(first, n)):
        p = f"model.layers.{i}.self_attn"
        if H == 0:
            s = hd**-0.5
            model.params[p + ".prefix_keys"] = keys.uniform(-s, s, (KV, P, hd)).astype(dt)
            model.params[p + ".prefix_values"] = keys.uniform(-s, s, (KV, P, hd)).astype(dt)
        model.adapters[p + "#prefix"] = Prefix(i, j, P, H > 0)


# -- prefix --
def prefix_kv(model, pre: Prefix) -> tuple[np.ndarray, np.ndarray]:
    """(keys, values), each (KV, P, hd)."""
    if not pre.projected:
        p = f"model.layers.{pre.layer}.self_attn"
        return model.params[p + ".prefix_keys"], model.params[p + ".prefix_values"]
    w, a = model.params, model.args
    n = 2 * a.num_key_value_heads * a.head_dim
    h = np.tanh(w[ENCODER + "embedding"] @ w[ENCODER + "w1"].T + w[ENCODER + "b1"])  # (P, H)
    sl = slice(pre.index * n, (pre.index + 1) * n)
    out = h @ w[ENCODER + "w2"][sl].T + w[ENCODER + "b2"][sl]  # (P, 2 * KV * hd)
    out = out.reshape(pre.length, 2, a.num_key_value_heads, a.head_dim).transpose(1, 2, 0, 3)  # (2, KV, P, hd)
    return out[0], out[1]


def prefix_attend(model, pre: Prefix, k, v, mask):
    """Keys, values (B, KV, S, hd) and mask (.., S) with the P prefix positions in front."""
    pk, pv = prefix_kv(model, pre)
    B = k.shape[0]
    k = np.concatenate([np.broadcast_to(pk[None], (B, *pk.shape)), k], axis=2)
    v = np.concatenate([np.broadcast_to(pv[None], (B, *pv.shape)), v], axis=2)
    mask = np.concatenate([np.zeros((*mask.shape[:-1], pre.length), mask.dtype), mask], axis=-1)
    return k, v, mask


def prefix_bwd(model, pre: Prefix, dk, dv, grads):
    """Split dk, dv (B, KV, P + S, hd) into the prefix's gradient (accumulated) and the real keys'."""
    P = pre.length
    gk, gv = dk[:, :, :P].sum(0), dv[:, :, :P].sum(0)  # (KV, P, hd)
    if not pre.projected:
        p = f"model.layers.{pre.layer}.self_attn"
        _acc(grads, p + ".prefix_keys", gk)
        _acc(grads, p + ".prefix_values", gv)
        return dk[:, :, P:], dv[:, :, P:]
    w, a = model.params, model.args
    n = 2 * a.num_key_value_heads * a.head_dim
    E, W1, W2 = w[ENCODER + "embedding"], w[ENCODER + "w1"], w[ENCODER + "w2"]
    h = np.tanh(E @ W1.T + w[ENCODER + "b1"])
    sl = slice(pre.index * n, (pre.index + 1) * n)
    dout = np.stack([gk, gv]).transpose(2, 0, 1, 3).reshape(P, n)  # (P, 2 * KV * hd)
    for name, shape in (("w2", W2.shape), ("b2", (W2.shape[0],))):
        grads.setdefault(ENCODER + name, np.zeros(shape, W2.dtype))
    grads[ENCODER + "w2"][sl] += dout.T @ h
    grads[ENCODER + "b2"][sl] += dout.sum(0)
    dz = (dout @ W2[sl]) * (1 - h * h)  # (P, H)
    _acc(grads, ENCODER + "w1", dz.T @ E)
    _acc(grads, ENCODER + "b1", dz.sum(0))
    _acc(grads, ENCODER + "embedding", dz @ W1)
    return dk[:, :, P:], dv[:, :, P:]


# -- bottleneck adapters --
def bottleneck_fwd(params, path: str, y):
    """y (N, d) -> y + up(silu(down(y))); also what the backward needs."""
    z = y @ params[path + ".adapter_down"] + params[path + ".adapter_down_bias"]
    with np.errstate(over="ignore"):
        sig = 1 / (1 + np.exp(-z))
    act = z * sig
    return y + act @ params[path + ".adapter_up"] + params[path + ".adapter_up_bias"], (y, z, sig, act)


def bottleneck_bwd(params, path: str, g, st, grads):
    """The gradient reaching y from g = dL/d(output); the adapter's own gradients accumulated."""
    y, z, sig, act = st
    _acc(grads, path + ".adapter_up", act.T @ g)
    _acc(grads, path + ".adapter_up_bias", g.sum(0))
    dz = (g @ params[path + ".adapter_up"].T) * sig * (1 + z * (1 - sig))
    _acc(grads, path + ".adapter_down", y.T @ dz)
    _acc(grads, path + ".adapter_down_bias", dz.sum(0))
    return g + dz @ params[path + ".adapter_down"].T


def _acc(grads, name, g):
    grads[name] = grads[name] + g if name in grads else g
