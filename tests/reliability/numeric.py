"""NaN/Inf injection into the MLX backend, for in-process tests and forked CLI runs alike.

Token ids cannot be NaN, so "bad input" is one NaN/Inf element in a micro-batch's loss weights
(the mask), which flows through forward and backward like a bad feature would; "bad gradient" is
one gradient tensor of the accumulated window poisoned just before the finiteness check; "bad
loss" is the reduced loss replaced. `windows` are 1-based optimiser-step windows to poison.
"""

from __future__ import annotations

import numpy as np

KINDS = ("nan_input", "inf_input", "nan_grad", "inf_grad", "nan_loss", "inf_loss")


def inject(spec: dict) -> dict:
    """Patch MLXBackend for `spec = {"kind", "windows"}`; return a counter dict; `restore()` undoes."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlxpt.backends.mlx_backend import MLXBackend

    kind, windows = spec["kind"], set(spec["windows"])
    value = float("nan") if kind.startswith("nan") else float("inf")
    orig_acc, orig_red = MLXBackend.accumulate, MLXBackend.reduce
    state = {"reduces": 0, "fired": 0, "restore": None}

    def accumulate(self, batch):
        if kind.endswith("_input") and state["reduces"] + 1 in windows:
            # the loss mask: (inputs, targets, mask) padded rows, (inputs, targets, segments, mask) packed
            at = 3 if len(batch) == 4 and np.asarray(batch[2]).dtype.kind in "iu" else 2
            mask = np.array(batch[at], dtype=np.float32)
            b, t = np.argwhere(mask > 0)[0]
            mask[b, t] = value  # one element of one row
            batch = (*batch[:at], mask, *batch[at + 1 :])
        return orig_acc(self, batch)

    def reduce(self):
        state["reduces"] += 1
        hit = state["reduces"] in windows
        if hit and kind.endswith("_grad"):
            assert getattr(self, "_grads", None) is not None, "backend internals changed: update numeric.py"
            first = [True]

            def poison(g):
                if first[0]:
                    first[0] = False
                    return g + mx.array(value, dtype=g.dtype)
                return g

            self._grads = tree_map(poison, self._grads)
        out = orig_red(self)
        if hit and kind.endswith("_loss"):
            out = (value, *out[1:])
        state["fired"] += hit
        return out

    def restore():
        MLXBackend.accumulate, MLXBackend.reduce = orig_acc, orig_red

    MLXBackend.accumulate, MLXBackend.reduce = accumulate, reduce
    state["restore"] = restore
    return state
