"""Padding-free packing: rows of a micro-batch packed into bins with block-diagonal attention give
the same loss and gradients as padded rows (NumPy and MLX), bins are a pure function of the data,
models where packing would change the log-probs fall back, and resume stays exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import StopAfter, run_config

from mlxpt.config import AdapterConfig, SFTConfig
from mlxpt.data.batching import choose_bins, collate, collate_packed, pack_bins, packing_efficiency
from mlxpt.data.encode import Example
from mlxpt.objectives import sft_objective

LENGTHS = (41, 5, 17, 3, 33, 9)  # short and long rows in one micro-batch


def examples(lengths=LENGTHS, seed=0, V=272) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # a prompt, then trained tokens
        out.append(Example(rng.integers(3, V, n).tolist(), mask, f"row{n}"))
    return out


# --- bins and layout ------------------------------------------------------------------------


def test_best_fit_decreasing_bins():
    bins = pack_bins([5, 9, 3, 7, 2], 10)
    assert bins == [[1], [3, 2], [0, 4]]  # 9 | 7+3 | 5+2: each into the fullest bin it fits
    assert pack_bins([12, 4], 10) == [[0], [1]]  # a row over capacity gets its own bin
    assert pack_bins([], 10) == []
    with pytest.raises(ValueError):
        pack_bins([1], 0)


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, 23).tolist()
    bins = pack_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(23))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert bins == pack_bins(lengths, 64)  # a pure function: resume lands on the same bins


@pytest.mark.parametrize("seed", range(5))
def test_chosen_bins_never_compute_more_than_padded_rows(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 120, 8).tolist()
    bins = choose_bins(sizes, 256, pad_to=1)
    assert sorted(i for b in bins for i in b) == list(range(8))
    load = [sum(sizes[i] for i in b) for b in bins]
    assert max(load) <= 256
    bfd = pack_bins(sizes, 256)
    bfd_cost = len(bfd) * max(sum(sizes[i] for i in b) for b in bfd)
    assert len(bins) * max(load) <= min(bfd_cost, 8 * max(sizes))  # never worse than either
    # BFD alone would pad [80, 80, 80, 80] to 2 bins of 240; balanced: 2 x 160
    assert sorted(map(len, choose_bins([80, 80, 80, 80], 256, pad_to=1))) == [2, 2]


def test_packed_layout_keeps_every_trained_token_and_separates_rows():
    ex = examples()
    inputs, targets, segments, mask = collate_packed(ex, pad_id=0, capacity=64)
    _, _, pmask = collate(ex, pad_id=0)
    assert mask.sum() == pmask.sum()  # the same trained tokens
    assert inputs.shape[1] <= 64 and inputs.shape[1] % 8 == 0
    assert inputs.size < pmask.size  # fewer computed positions than padded rows
    for b in range(len(inputs)):
        real = segments[b] >= 0
        assert (mask[b][~real] == 0).all() and (targets[b][~real] == 0).all()
        # each row's inputs follow the previous row's, in order; its targets are the inputs shifted
        for s in np.unique(segments[b][real]):
            pos = np.flatnonzero(segments[b] == s)
            assert (np.diff(pos) == 1).all()
            assert (inputs[b, pos[1:]] == targets[b, pos[:-1]]).all()


def test_packing_efficiency_counts_real_tokens_over_computed_positions():
    eff = packing_efficiency([30, 40, 100, 120, 7, 300], batch_size=4, capacity=512)
    assert eff["real_tokens"] == sum(n - 1 for n in [30, 40, 100, 120, 7, 300])
    assert eff["packed_efficiency"] > 0.95 > eff["padded_efficiency"]
    assert eff["packed_positions"] < eff["padded_positions"]


# --- packed == padded: loss and gradients -----------------------------------------------------


def _grads_numpy(backend, batch):
    backend.accumulate(batch)
    loss, n, _, _ = backend.reduce()
    grads = {k: v / n for k, v in backend._grads.items()}
    backend.discard()
    return loss / n, grads


def test_numpy_packed_loss_and_gradients_equal_padded_rows(tiny_dir):
    from mlxpt.backends.numpy_backend import AdamW, NumpyBackend, grad_of
    from mlxpt.backends.numpy_model import Model

    model = Model.load(tiny_dir)
    model.add_adapters("lora", 2, 4, 2.0, 0.0, None, seed=0)
    rng = np.random.default_rng(1)
    model.params.update({k: 0.05 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.params.items()
                         if k.endswith(".lora_b")})  # fmt: skip
    backend = NumpyBackend(model, sft_objective, grad_of(sft_objective), AdamW("adamw"))
    ex = examples()
    loss_rows, g_rows = _grads_numpy(backend, collate(ex, pad_id=0))
    ok, found = backend.pack_rows()
    assert ok and backend.output == "packed", found
    loss_packed, g_packed = _grads_numpy(backend, collate_packed(ex, pad_id=0, capacity=64))
    assert abs(loss_rows - loss_packed) < 1e-5
    assert any(np.abs(g).max() > 1e-4 for g in g_rows.values())  # the comparison means something
    for k in g_rows:
        np.testing.assert_allclose(g_packed[k], g_rows[k], rtol=0, atol=1e-5, err_msg=k)
    # without the block-diagonal mask the rows would see each other: the test can fail
    backend.output = "logp"
    inputs, targets, _, mask = collate_packed(ex, pad_id=0, capacity=64)
    leaked, _ = _grads_numpy(backend, (inputs, targets, mask))
    assert abs(leaked - loss_rows) > 1e-3


def _mlx_backend(path, compile=True):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models.adapters import apply_adapters

    model = load_model(path)[0]
    apply_adapters(model, AdapterConfig(num_layers=2, rank=4, alpha=8.0), seed=0)
    rng = np.random.default_rng(1)
    moved = [(k, mx.array(0.05 * rng.standard_normal(v.shape).astype(np.float32)))
             for k, v in tree_flatten(model.trainable_parameters()) if k.endswith(".lora_b")]  # fmt: skip
    model.load_weights(moved, strict=False)
    return MLXBackend(model, make_optimizer("adamw"), sft_objective, compile=compile)


def _grads_mlx(backend, batch):
    from mlx.utils import tree_flatten

    backend.accumulate(batch)
    loss, n, _, _ = backend.reduce()
    grads = {k: np.array(v) / n for k, v in tree_flatten(backend._grads)}
    backend.discard()
    return loss / n, grads


@pytest.mark.parametrize("compile", [True, False])
def test_mlx_packed_loss_and_gradients_equal_padded_rows(tiny_dir, compile):
    backend = _mlx_backend(tiny_dir, compile)
    ex = examples()
    loss_rows, g_rows = _grads_mlx(backend, collate(ex, pad_id=0))
    ok, found = backend.pack_rows()
    assert ok and backend.output == "packed", found
    backend.set_objective(sft_objective)  # as the runner does after choosing the layout
    loss_packed, g_packed = _grads_mlx(backend, collate_packed(ex, pad_id=0, capacity=64))
    assert abs(loss_rows - loss_packed) < 1e-5
    assert any(np.abs(g).max() > 1e-4 for g in g_rows.values())
    for k in g_rows:
        np.testing.assert_allclose(g_packed[k], g_rows[k], rtol=0, atol=1e-5, err_msg=k)
    # whole-row scoring (the forgetting monitor) still works on a packed backend
    inputs, targets, _ = collate(ex[:2], pad_id=0)
    assert backend.token_logps(inputs, targets).shape == inputs.shape


def test_absolute_position_model_falls_back(tmp_path):
    """GPT-2 adds learned absolute position embeddings: a row packed after another sees other
    positions, so its log-probs change and packing must be refused."""
    import mlx.core as mx
    from mlx_lm.models import gpt2

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.train.runner import choose_layout

    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=128, n_embd=32, n_head=4, n_layer=2, n_positions=128,
                          layer_norm_epsilon=1e-5, vocab_size=64)  # fmt: skip
    mx.random.seed(0)
    model = gpt2.Model(args)
    model.freeze()
    backend = MLXBackend(model, make_optimizer("adamw"), sft_objective, compile=False, adapter_config={})
    events = []
    assert choose_layout(backend, False, events.append, packs=True) == "rows"
    assert backend.output == "logp"
    assert events and "packing off" in events[0]["message"]


# --- runs -------------------------------------------------------------------------------------


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "step"]


def test_packed_and_padded_runs_follow_the_same_curve(tiny_dir, data_dir, tmp_path):
    from mlxpt.train.sft import run_sft

    events = {True: [], False: []}
    dirs = {}
    for packing in (True, False):
        cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path / str(packing), steps=4, packing=packing)
        dirs[packing], _ = run_sft(cfg, emit=events[packing].append)
    start = {p: next(e for e in events[p] if e["event"] == "start") for p in events}
    assert start[True]["layout"] == "packed" and start[False]["layout"] == "rows"
    eff = start[True]["data"]["packing"]
    assert 0 < eff["padded_efficiency"] <= eff["packed_efficiency"] <= 1
    assert "packing" not in start[False]["data"]
    np.testing.assert_allclose(_losses(dirs[True]), _losses(dirs[False]), rtol=1e-4)
    steps = [[e["trained_tokens"] for e in events[p] if e["event"] == "step"] for p in (True, False)]
    assert steps[0] == steps[1]  # per trained token, the same rows per step


def test_packed_resume_equals_uninterrupted(tiny_dir, data_dir, tmp_path):
    from mlxpt.runs import latest_checkpoint, load_checkpoint
    from mlxpt.train.sft import run_sft

    kw = {"steps": 6, "grad_accum": 2, "batch_size": 4}
    straight, _ = run_sft(run_config(SFTConfig, tiny_dir, data_dir, tmp_path / "a", **kw))
    cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path / "b", **kw)
    part, outcome = run_sft(cfg, stop=StopAfter(3 * 3 + 1))  # inside step 4's window
    assert outcome == "interrupted"
    events = []
    resumed, outcome = run_sft(cfg, resume_dir=part, emit=events.append)
    assert outcome == "finished"
    assert next(e for e in events if e["event"] == "start")["layout"] == "packed"
    a, _ = load_checkpoint(latest_checkpoint(straight))
    b, _ = load_checkpoint(latest_checkpoint(resumed))
    for k in a["adapters"]:
        np.testing.assert_allclose(a["adapters"][k], b["adapters"][k], rtol=0, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(_losses(straight), _losses(resumed), rtol=1e-5)


def test_kl_to_base_trains_whole_rows(tiny_dir, data_dir, tmp_path):
    from mlxpt.train.sft import packs

    cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path, kl_to_base=0.1)
    assert cfg.data.packing and not packs(cfg)
