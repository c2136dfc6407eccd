"""The vocabulary head at trained positions only (MLX, plain SFT): the same loss and LoRA gradients as
the full-logits path on rows and packed bins, compiled and not; frozen weights stay put; models
whose head cannot be split off, --kl-to-base and other objectives keep the full logits."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import make_model

from mlxpt.config import AdapterConfig
from mlxpt.data.batching import collate, collate_packed, trained_positions
from mlxpt.data.encode import Example
from mlxpt.objectives import dpo_objective, sft_objective

LENGTHS = (41, 5, 17, 3, 33, 9)


def examples(seed=0, V=272) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(3, V, n).tolist(), [0] * (n // 3) + [1] * (n - n // 3), f"r{n}") for n in LENGTHS]


# --- host side: the trained positions -------------------------------------------------------


def test_trained_positions_pad_to_a_multiple_with_weightless_dummies():
    mask = np.zeros((2, 5), np.float32)
    mask[0, 3:], mask[1, 1] = 1.0, 0.5
    index, weight = trained_positions(mask, multiple=4)
    assert index.dtype == np.int32 and weight.dtype == np.float32 and len(index) == 4
    assert index.tolist() == [3, 4, 6, 0] and weight.tolist() == [1.0, 1.0, 0.5, 0.0]
    logp = np.arange(10, dtype=np.float32).reshape(2, 5) - 20
    assert np.isclose((logp.reshape(-1)[index] * weight).sum(), (logp * mask).sum())
    assert weight.sum() == mask.sum()
    assert len(trained_positions(np.ones((3, 50)))[0]) == 192  # 150 -> three blocks of 64
    empty_index, empty_weight = trained_positions(np.zeros((1, 8)))
    assert len(empty_index) == 64 and not empty_weight.any()  # never a zero-size array
    with pytest.raises(ValueError, match="multiple"):
        trained_positions(mask, multiple=0)


# --- MLX: same loss and gradients as the full logits ----------------------------------------


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("untied"), seed=3, tie_word_embeddings=False)


def _model(path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from mlxpt.models.adapters import apply_adapters

    model = load_model(path)[0]
    apply_adapters(model, AdapterConfig(num_layers=2, rank=4, alpha=8.0), seed=0)
    rng = np.random.default_rng(1)
    moved = [(k, mx.array(0.05 * rng.standard_normal(v.shape).astype(np.float32)))
             for k, v in tree_flatten(model.trainable_parameters()) if k.endswith(".lora_b")]  # fmt: skip
    model.load_weights(moved, strict=False)
    return model


def _backend(model, compile=True, objective=sft_objective, **kw):
    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer

    return MLXBackend(model, make_optimizer("adamw"), objective, compile=compile, **kw)


def _grads(backend, batch):
    from mlx.utils import tree_flatten

    backend.accumulate(batch)
    loss, n, _, _ = backend.reduce()
    grads = {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    backend.discard()
    return loss, n, grads


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("layout", ["rows", "packed"])
@pytest.mark.parametrize("tied", [True, False])
def test_gathered_head_equals_full_logits(tiny_dir, untied_dir, compile, layout, tied):
    model = _model(tiny_dir if tied else untied_dir)
    gathered, full = _backend(model, compile), _backend(model, compile)
    full._head = None  # the full-logits path on the same weights
    assert gathered._head is not None
    ex = examples()
    batch = collate(ex, pad_id=0)
    if layout == "packed":
        for b in (gathered, full):
            assert b.pack_rows()[0]
            b.set_objective(sft_objective)
        batch = collate_packed(ex, pad_id=0, capacity=64)
    assert len(gathered._arrays(batch)) == len(batch) + 1  # (index, weight) replace the mask
    assert len(full._arrays(batch)) == len(batch)
    loss_g, n_g, g_g = _grads(gathered, batch)
    loss_f, n_f, g_f = _grads(full, batch)
    assert n_g == n_f == batch[-1].sum()
    assert abs(loss_g - loss_f) < 1e-5 * max(1.0, abs(loss_f))
    assert g_g.keys() == g_f.keys() and any(np.abs(g).max() > 1e-4 for g in g_f.values())
    for k in g_f:
        np.testing.assert_allclose(g_g[k], g_f[k], rtol=0, atol=1e-5, err_msg=k)
    assert abs(gathered.evaluate(batch)[0] - full.evaluate(batch)[0]) < 1e-5 * max(1.0, abs(loss_f))
    # the comparison can fail: positions one off give another loss
    index, weight = trained_positions(batch[-1])
    shifted = [*map(np.asarray, batch[:-1]), np.where(weight > 0, index + 1, 0).astype(np.int32), weight]
    import mlx.core as mx

    off = gathered._loss_only(*(mx.array(a) for a in shifted))[0].item()
    assert abs(off - loss_f) > 1e-3


def test_frozen_weights_stay_and_every_lora_weight_moves(tiny_dir):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = _model(tiny_dir)
    backend = _backend(model)
    assert backend._head is not None
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    backend.accumulate(collate(examples(), pad_id=0))
    backend.reduce()
    backend.apply(1e-2, 1.0)
    mx.eval(model.parameters())
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    for k in before:
        moved = not np.array_equal(before[k], after[k])
        assert moved == (k in trainable), k  # the tied head/embedding is frozen: never moves


def test_models_and_objectives_that_keep_the_full_logits(tiny_dir):
    import mlx.nn as nn

    from mlxpt.backends.mlx_backend import vocab_head

    model = _model(tiny_dir)
    assert _backend(model, objective=dpo_objective)._gathers(3) is False  # another objective
    kl = _backend(model, output="logp_kl", adapter_config={"fine_tune_type": "lora"})
    assert kl._head is not None and kl._gathers(3) is False  # --kl-to-base: full logits, both passes
    plain = _backend(model)
    assert plain._gathers(3) and not plain._gathers(5)  # a batch with other arrays: full logits
    assert vocab_head(nn.Linear(4, 4)) is None  # no backbone/head to tell apart

    class Scaled(type(model)):  # logits scaled after the head: the split would change them
        def __call__(self, *a, **k):
            return 2.0 * super().__call__(*a, **k)

    model.__class__ = Scaled
    scaled = _backend(model, compile=False)
    assert scaled._head is None and not scaled._gathers(3)
    batch = collate(examples()[:2], pad_id=0)
    assert len(scaled._arrays(batch)) == 3
    assert np.isfinite(_grads(scaled, batch)[0])
