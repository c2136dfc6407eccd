"""Log-probability of target tokens under a softmax over the vocabulary, with one `exp` pass.

`-nn.losses.cross_entropy(logits, targets)` differentiated by autodiff runs the vocabulary's
`exp` twice: in the forward's log-sum-exp and again in the backward's softmax. On MLX's CPU
backend that `exp` is scalar (about 19 ns an element with mlx-cpu 0.32 on AVX2, plus a libm `fmaf`
call per polynomial step), and with the default model's 49,152-word vocabulary those two passes
were a quarter of an SFT step. `token_logprob` keeps the forward's exponentials for the backward
(a custom VJP): d logp / d logits = onehot(target) - e / sum(e), one multiply instead of a second
`exp`. The same values and gradients as autodiff of the log-softmax (tests/test_mlx_logprob.py).
"""

from __future__ import annotations

import mlx.core as mx


@mx.custom_function
def _logprob_with_exp(logits, targets):
    """(log p(target), e = exp(logits - max), sum(e)): the last two are kept for the VJP."""
    top = logits.max(axis=-1, keepdims=True)
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (picked - top - mx.log(total))[..., 0], e, total


@_logprob_with_exp.vjp
def _logprob_vjp(primals, cotangents, outputs):
    _, targets = primals
    g = cotangents[0][..., None]
    _, e, total = outputs
    grad = (-g / total) * e  # -g * softmax
    at = targets[..., None]
    grad = mx.put_along_axis(grad, at, mx.take_along_axis(grad, at, axis=-1) + g, axis=-1)  # + g * onehot
    return grad, mx.zeros_like(targets)


def token_logprob(logits, targets):
    """log softmax(logits)[..., targets] over the last axis; logits (..., V) float, targets (...)
    int. Equal to `-nn.losses.cross_entropy(logits, targets, reduction="none")`."""
    return _logprob_with_exp(logits, targets)[0]
