"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751) on mlx-lm models.

Houlsby placement: one adapter after the attention and one after the MLP of each adapted layer,
on the sublayer's output before it joins the residual stream. Each is
    y -> y + up(silu(down(y)))        down: d -> r, up: r -> d (with biases)
with `up` initialised to zero, so step 0 is the base model exactly. It wraps the sublayers' last
linear (`self_attn.o_proj`, `mlp.down_proj`), the way mlx-lm's LoRA layers wrap a linear, so it
needs no model code of its own.

Departures from the paper: SiLU instead of an unnamed nonlinearity, and the layer norms stay
frozen (Houlsby also trains them).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxpt.errors import ConfigError

SITES = ("self_attn.o_proj", "mlp.down_proj")


class BottleneckLinear(nn.Module):
    """A frozen linear followed by a residual bottleneck adapter on its output."""

    def __init__(self, linear, size: int):
        super().__init__()
        self.linear = linear
        d = linear.weight.shape[0]
        s = d**-0.5
        self.adapter_down = mx.random.uniform(-s, s, (d, size))  # the input side of nn.Linear(d, r)
        self.adapter_down_bias = mx.zeros((size,))
        self.adapter_up = mx.zeros((size, d))
        self.adapter_up_bias = mx.zeros((d,))

    def __call__(self, x):
        y = self.linear(x)
        h = nn.silu(y @ self.adapter_down + self.adapter_down_bias)  # (..., r)
        return y + (h @ self.adapter_up + self.adapter_up_bias).astype(y.dtype)


def _site(layer, path: str):
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part, None) if isinstance(mod, nn.Module) else None
    return mod


def add_bottlenecks(model, num: int, size: int) -> dict:
    """Wrap the attention output and MLP output linears of the last `num` layers; return the
    adapter config's `adapter_parameters`. Random draws: one per adapter, `down`, in layer order,
    attention before MLP (the NumPy backend replays them)."""
    for layer in model.layers[len(model.layers) - num :]:
        for path in SITES:
            lin = _site(layer, path)
            if not isinstance(lin, (nn.Linear, nn.QuantizedLinear)):
                kind = getattr(model, "model_type", "this")
                raise ConfigError(
                    "E763", f"bottleneck adapters need {' and '.join(SITES)} in every layer; the {kind!r} model "
                    f"has no {path}", "--fine-tune-type adapter", "use --fine-tune-type lora for this model",
                )  # fmt: skip
            parent, name = _site(layer, path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
            setattr(parent, name, BottleneckLinear(lin, size))
    return {"size": size, "placement": "houlsby", "activation": "silu"}
