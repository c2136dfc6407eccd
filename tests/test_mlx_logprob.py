"""token_logprob (one `exp` pass, a custom VJP): the same log-probs and gradients as autodiff of
MLX's cross-entropy, on rows and (B, L, V) blocks, with extreme logits, compiled and not."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("shape", [(5, 33), (2, 7, 50), (1, 1, 3)])
@pytest.mark.parametrize("scale", [1.0, 40.0])
@pytest.mark.parametrize("compile", [False, True])
def test_values_and_gradients_equal_autodiff(shape, scale, compile):
    import mlx.core as mx
    import mlx.nn as nn

    from mlxpt.backends.mlx_logprob import token_logprob

    rng = np.random.default_rng(sum(shape))
    logits = mx.array((scale * rng.standard_normal(shape)).astype(np.float32))
    targets = mx.array(rng.integers(0, shape[-1], shape[:-1]).astype(np.int32))
    weight = mx.array(rng.standard_normal(shape[:-1]).astype(np.float32))

    def reference(x):
        return (-nn.losses.cross_entropy(x, targets, reduction="none") * weight).sum()

    def ours(x):
        return (token_logprob(x, targets) * weight).sum()

    want = -nn.losses.cross_entropy(logits, targets, reduction="none")
    np.testing.assert_allclose(np.array(token_logprob(logits, targets)), np.array(want), rtol=1e-6, atol=1e-5)
    grad = mx.grad(ours)
    if compile:
        grad = mx.compile(grad)
    g_ref, g_ours = np.array(mx.grad(reference)(logits)), np.array(grad(logits))
    np.testing.assert_allclose(g_ours, g_ref, rtol=0, atol=1e-6)
    # the comparison can fail: another target gives other gradients
    shifted = (targets + 1) % shape[-1]
    moved = np.array(mx.grad(lambda x: (token_logprob(x, shifted) * weight).sum())(logits))
    assert np.abs(moved - g_ref).max() > 1e-3


def test_closed_form_gradient_is_onehot_minus_softmax():
    """Checked against NumPy, not MLX: d log p(t) / d logits = onehot(t) - softmax(logits)."""
    import mlx.core as mx

    from mlxpt.backends.mlx_logprob import token_logprob

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 9)).astype(np.float64)
    t = rng.integers(0, 9, 4)
    soft = np.exp(x - x.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    want = -soft
    want[np.arange(4), t] += 1.0
    got = np.array(mx.grad(lambda a: token_logprob(a, mx.array(t)).sum())(mx.array(x.astype(np.float32))))
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.array(token_logprob(mx.array(x.astype(np.float32)), mx.array(t))),
                               np.log(soft[np.arange(4), t]), atol=1e-5)  # fmt: skip
