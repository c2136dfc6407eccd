"""Batch plans cover every row once per epoch, deterministically; collate pads untrained."""

import numpy as np
import pytest

from mlxpt.data.batching import batch_plan, collate
from mlxpt.data.encode import Example


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 31, 103, 256])
@pytest.mark.parametrize("bs", [1, 3, 4, 8, 16])
def test_every_index_exactly_once(n, bs):
    lengths = list(np.random.default_rng(n).integers(1, 300, n))
    plan = batch_plan(lengths, bs, seed=0, epoch=0)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= bs for b in plan)
    assert sum(len(b) < bs for b in plan) == (1 if n % bs else 0)  # remainder kept, not dropped


def test_deterministic_and_epochs_differ():
    lengths = [10] * 40 + [50] * 40 + list(range(1, 41))
    a = batch_plan(lengths, 8, seed=3, epoch=1)
    assert a == batch_plan(lengths, 8, seed=3, epoch=1)
    assert a != batch_plan(lengths, 8, seed=3, epoch=2)
    assert a != batch_plan(lengths, 8, seed=4, epoch=1)

    # equal-length examples are regrouped between epochs, not only the batch order
    def groups(p):
        return {frozenset(b) for b in p}

    assert groups(a) != groups(batch_plan(lengths, 8, seed=3, epoch=2))


def test_batches_group_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(1, 1000, 512))
    plan = batch_plan(lengths, 16, seed=0, epoch=0)
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in plan])
    assert spread < 60  # random batches would spread ~900


def test_collate_shift_pad_and_mask():
    a = Example(tokens=[5, 6, 7, 8], mask=[0, 0, 1, 1], where="a")
    b = Example(tokens=[9, 10], mask=[0, 1], where="b")
    x, y, m = collate([a, b], pad_id=2, pad_to=1)
    assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == np.float32
    assert x.tolist() == [[5, 6, 7], [9, 2, 2]]
    assert y.tolist() == [[6, 7, 8], [10, 2, 2]]
    assert m.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_collate_pad_to_multiple_and_eos_equals_pad():
    eos = 2
    a = Example(tokens=[1, 5, 6, eos], mask=[0, 1, 1, 1], where="a")  # pad id == eos id
    x, y, m = collate([a], pad_id=eos)
    assert x.shape == (1, 8)
    assert y[0, 2] == eos and m[0, 2] == 1.0  # the real EOS is trained
    assert m[0, 3:].sum() == 0  # the padding (same id) is not
