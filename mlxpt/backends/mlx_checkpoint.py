"""Gradient checkpointing of an mlx-lm model's transformer blocks (`--grad-checkpoint`).

Each block's forward runs inside `mx.checkpoint`: the backward pass recomputes the block's
activations from its input instead of keeping them, so a training pass holds one block's
activations plus the hidden states between blocks, for about one more forward pass of compute.

mlx-lm's tuner does this with `grad_checkpoint(layer)`, which replaces `__call__` of the block
class for the whole process and hands the checkpoint only the block's own parameters. Here:
- only this model's blocks change (each gets a subclass with a checkpointed `__call__`; the
  names of its parameters stay), from the first one with trainable parameters on (those below
  have no backward), and only in training mode: reference passes, generation and validation run
  as before;
- arrays a block reads from outside that need gradients go in as inputs: the prefix encoder that
  every layer shares (prefix tuning with a projection), and the float arrays a stand-in cache
  carries from one call to the next (shared_prefix.py keeps the prompts' keys/values in it).
  A cache's attributes are put back as they were before the backward recomputes the block;
- dropout draws the same masks when recomputed: inside the checkpoint the block's dropout layers
  split their keys from the global key as it was on entry (as the global generator does), and the
  global key then advances by as many draws, so the random stream is that of the plain pass.
So loss and gradients are those of the plain pass; `self_check` compares the two on the loaded
model once, and refuses (E781) a model where they differ.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxpt.errors import ConfigError

FLAG = "--grad-checkpoint"
_SUBCLASSES: dict[type, type] = {}


def _map(tree, fn):
    """`fn` on every leaf of nested lists, tuples and dicts (a module is a leaf)."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(t, fn) for t in tree)
    if isinstance(tree, dict) and not isinstance(tree, nn.Module):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def _is_float(a) -> bool:
    return isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)


def _floats(tree) -> list:
    """The floating-point arrays of `tree`: what may carry a gradient (masks and ids do not)."""
    found: list = []
    _map(tree, lambda a: found.append(a) if _is_float(a) else None)
    return found


def _fill(tree, arrays):
    """`tree` with its floating-point arrays replaced by `arrays`, in `_floats` order."""
    it = iter(arrays)
    return _map(tree, lambda a: next(it) if _is_float(a) else a)


def _holders(args, kwargs) -> list:
    """Stand-in caches among a block's arguments: plain objects whose attributes it reads and writes."""
    found = []
    for v in (*args, *kwargs.values()):
        if hasattr(v, "__dict__") and not callable(v) and not isinstance(v, (mx.array, nn.Module)):
            found.append(v)
    return found


def _set_state(obj, state: dict) -> None:
    obj.__dict__.clear()
    obj.__dict__.update(state)


class _KeyedDropout(nn.Dropout):
    """nn.Dropout with its keys from `_stream()` (a list holding a key and a count of draws),
    split as the global generator splits its own: the same masks in the forward and the recomputation."""

    def __call__(self, x):
        if self._p_1 == 1 or not self.training:
            return x
        stream = self._stream()
        stream[0], sub = mx.random.split(stream[0])
        stream[1] += 1
        mask = mx.random.bernoulli(self._p_1, x.shape, key=sub)
        return (mask * x) * (1 / self._p_1)


def set_rng(key) -> None:
    """Set the global generator to the (evaluated) key `key`: key(seed) == [seed >> 32, seed & 0xffffffff]."""
    hi, lo = (int(x) for x in np.array(key).tolist())
    mx.random.seed((hi << 32) | lo)


def _checkpointed_call(self, *args, **kwargs):
    plain = super(type(self), self).__call__
    if not (self.training and self._checkpointing):
        return plain(*args, **kwargs)
    holders = _holders(args, kwargs)
    before = [dict(vars(h)) for h in holders]
    shared = self._checkpoint_shared()
    drops = [m for _, m in self.named_modules() if type(m) is nn.Dropout and m._p_1 < 1]
    key = mx.random.state[0] if drops else None  # the global key on entry: a constant of the checkpoint
    forward: dict = {}  # the caches' state and the number of dropout draws after the forward call
    ran: list = []  # non-empty once the forward has run: later calls are the recomputation

    def inner(params, shared_params, floats):
        own, others = self.trainable_parameters(), [m.trainable_parameters() for m in shared]
        a, kw, states = _fill((args, kwargs, before), floats)
        for h, s in zip(holders, states, strict=True):
            _set_state(h, s)
        self.update(params)
        for m, p in zip(shared, shared_params, strict=True):
            m.update(p)
        stream = [key, 0]
        for d in drops:
            d.__class__, d._stream = _KeyedDropout, lambda: stream
        try:
            out = plain(*a, **kw)
            after = [dict(vars(h)) for h in holders]
            if not ran:  # the recomputation in the backward must not overwrite the forward's state
                forward.update(caches=after, draws=stream[1])
                ran.append(True)
            return out, _floats(after)
        finally:  # the traced arrays stay inside: the model leaves as it came
            for d in drops:
                d.__class__ = nn.Dropout
            self.update(own)
            for m, p in zip(shared, others, strict=True):
                m.update(p)

    params = [m.trainable_parameters() for m in shared]
    out, cache_floats = mx.checkpoint(inner)(self.trainable_parameters(), params, _floats((args, kwargs, before)))
    for h, s in zip(holders, _fill(forward.pop("caches"), cache_floats), strict=True):
        _set_state(h, s)
    for _ in range(forward.pop("draws")):  # the global key moves on as the plain pass's draws move it
        mx.random.uniform(shape=(1,))
    return out


def _subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": _checkpointed_call})
    return _SUBCLASSES[cls]


def blocks(model) -> list:
    """The model's transformer blocks (`model.layers`); E780 where it has none."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers or not all(isinstance(b, nn.Module) for b in layers):
        kind = getattr(model, "model_type", None) or type(model).__name__
        raise ConfigError(
            "E780", f"gradient checkpointing needs the model's transformer blocks (model.layers); the {kind!r} "
            "model has none", FLAG, "train without --grad-checkpoint (lower --batch-size or --max-seq-len if memory is short)",
        )  # fmt: skip
    return layers


def checkpoint_blocks(model, on: bool = True) -> None:
    """Recompute each block in the backward (`on`), or keep its activations again (`on=False`).
    Blocks before the first one with trainable parameters have no backward: they run as they are
    (a checkpoint there would only cost time). Modules every block reads from outside its own tree
    (the prefix encoder) go in as inputs."""
    shared = [model["prefix_encoder"]] if isinstance(model, dict) and "prefix_encoder" in model else []
    layers = blocks(model)
    trained = [i for i, b in enumerate(layers) if tree_flatten(b.trainable_parameters())]
    first = 0 if shared else min(trained, default=len(layers))
    for i, block in enumerate(layers):
        if type(block) not in _SUBCLASSES.values():
            block.__class__ = _subclass(type(block))
        block._checkpoint_shared = lambda shared=shared: shared  # a function: not a child module
        block._checkpointing = on and i >= first


def _loss_and_grads(model, x) -> tuple[float, dict]:
    def loss_fn(m):
        logits = m(x).astype(mx.float32)
        return (mx.logsumexp(logits, axis=-1) - logits[..., 0]).sum()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    mx.eval(loss, grads)
    return loss.item(), grads


def self_check(model, tol: float = 1e-4) -> tuple[bool, str]:
    """Do checkpointed blocks give this model's plain loss and gradients? One 8-token row in
    training mode, the same RNG key for both passes (the same dropout masks); the model's mode,
    parameters and the RNG are left as they were. (ok, what was found)."""
    layers, training, key = blocks(model), model.training, np.array(mx.random.state[0])
    chosen = [b._checkpointing for b in layers]
    params = model.trainable_parameters()
    x = mx.arange(8, dtype=mx.int32)[None]
    found = []
    try:
        model.train()
        for on in (False, True):
            for b, c in zip(layers, chosen, strict=True):
                b._checkpointing = on and c
            set_rng(key)
            found.append(_loss_and_grads(model, x))
            model.update(params)  # value_and_grad leaves its traced arrays in the model
    finally:
        for b, c in zip(layers, chosen, strict=True):
            b._checkpointing = c
        model.train(training)
        set_rng(key)
    (loss0, g0), (loss1, g1) = found
    worst = abs(loss0 - loss1) / (1 + abs(loss0))
    for k, g in g0.items():
        ref = float(mx.abs(g).max().item()) if g.size else 0.0
        diff = float(mx.abs(g - g1[k]).max().item()) if g.size else 0.0
        worst = max(worst, diff / (1 + ref))
    return worst <= tol, f"largest relative difference {worst:.2g} over the loss and {len(g0)} gradients"


def enable(model) -> None:
    """Checkpoint every block of `model` after checking it changes neither loss nor gradients (E781)."""
    checkpoint_blocks(model)
    ok, found = self_check(model)
    if not ok:
        checkpoint_blocks(model, on=False)
        raise ConfigError(
            "E781", f"gradient checkpointing changes this model's gradients ({found})", FLAG,
            "train without --grad-checkpoint (lower --batch-size or --max-seq-len if memory is short)",
        )  # fmt: skip
