"""Training loop, adapters, SFT runs and resume on a tiny random Llama (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny import StopAfter, run_config

from mlxpt.config import SFTConfig
from mlxpt.errors import NumericsError
from mlxpt.train.loop import lr_at


def make_cfg(tiny_dir, data_dir, tmp_path, **kw) -> SFTConfig:
    return run_config(SFTConfig, tiny_dir, data_dir, tmp_path, **kw)


def _load_state(run_dir):
    from mlxpt.runs import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))


def test_lr_schedule_warmup_and_cosine():
    cfg = SFTConfig().train
    cfg.steps, cfg.warmup_steps, cfg.learning_rate, cfg.min_lr_ratio = 110, 10, 1.0, 0.1
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    cfg.schedule = "linear"
    assert lr_at(60, cfg) == pytest.approx(0.55)
    cfg.schedule = "constant"
    assert lr_at(100, cfg) == 1.0


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_every_trainable_parameter_changes_and_no_frozen_one(kind, tiny_dir, data_dir, tmp_path):
    """The check that would have caught the zero-gradient preference bugs of other MLX trainers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.data import collate, encode_all, load_splits
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters

    cfg = make_cfg(tiny_dir, data_dir, tmp_path, fine_tune_type=kind, num_layers=1)
    model, tok = load(str(tiny_dir))
    apply_adapters(model, cfg.adapter, seed=0)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable, "nothing is trainable"
    backend = MLXBackend(model, make_optimizer("adamw"))
    rows, _ = load_splits(str(data_dir))
    ex, _ = encode_all(rows, tok, max_len=256)
    batch = collate(ex[:4], 0)
    for _ in range(3):
        backend.accumulate(batch)
        backend.reduce()
        backend.apply(1e-2, 1.0)
    mx.eval(model.parameters())
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        if k in trainable:
            assert changed, f"trainable {k} did not change"
        else:
            assert not changed, f"frozen {k} changed"
    if kind == "full":
        assert all(".layers.1." in k for k in trainable)


def test_loss_on_one_repeated_batch_falls(tiny_dir, data_dir, tmp_path):
    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.data import collate, encode_all, load_splits
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters

    cfg = make_cfg(tiny_dir, data_dir, tmp_path)
    model, tok = load(str(tiny_dir))
    apply_adapters(model, cfg.adapter, seed=0)
    backend = MLXBackend(model, make_optimizer("adamw"))
    ex, _ = encode_all(load_splits(str(data_dir))[0], tok, max_len=256)
    batch = collate(ex[:4], 0)
    losses = []
    for _ in range(15):
        backend.accumulate(batch)
        loss, ntok, _, _ = backend.reduce()
        backend.apply(3e-3, 1.0)
        losses.append(loss / ntok)
    assert losses[-1] < 0.7 * losses[0], losses


def test_accumulation_equals_one_big_batch(tiny_dir, data_dir, tmp_path):
    """Token-sum losses make 2 micro-batches of 2 identical to one batch of 4."""
    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.data import collate, encode_all, load_splits
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters, trainable

    cfg = make_cfg(tiny_dir, data_dir, tmp_path)
    results = []
    for split in (False, True):
        model, tok = load(str(tiny_dir))
        apply_adapters(model, cfg.adapter, seed=0)
        backend = MLXBackend(model, make_optimizer("adamw"), compile=False)
        ex, _ = encode_all(load_splits(str(data_dir))[0], tok, max_len=256)
        for _ in range(2):
            if split:
                backend.accumulate(collate(ex[:2], 0, pad_to=None))
                backend.accumulate(collate(ex[2:4], 0, pad_to=None))
            else:
                backend.accumulate(collate(ex[:4], 0, pad_to=None))
            loss, ntok, norm, _ = backend.reduce()
            backend.apply(1e-2, 0.0)
        results.append(({k: np.array(v) for k, v in trainable(model).items()}, loss / ntok, norm))
    (a, la, na), (b, lb, nb) = results
    assert la == pytest.approx(lb, rel=1e-5) and na == pytest.approx(nb, rel=1e-4)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_sft_run_layout_metrics_and_val_loss(tiny_dir, data_dir, tmp_path):
    from mlxpt.runs import list_checkpoints, read_status, verify_checkpoint
    from mlxpt.train.sft import run_sft

    cfg = make_cfg(tiny_dir, data_dir, tmp_path, steps=8, eval_every=4, save_every=4, learning_rate=3e-3)
    events = []
    run_dir, outcome = run_sft(cfg, emit=events.append)
    assert outcome == "finished"
    assert {"config.json", "status.json", "metrics.jsonl", "adapters.safetensors", "adapter_config.json"} <= {
        p.name for p in run_dir.iterdir()
    }
    cks = list_checkpoints(run_dir)
    assert [c.name for c in cks] == ["step-00000004", "step-00000008"] and all(map(verify_checkpoint, cks))
    assert read_status(run_dir)["status"] == "finished"
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert all(math.isfinite(e["loss"]) and e["tokens_per_s"] > 0 for e in steps)
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 11
    # the adapter folder is mlx-lm compatible
    from mlx_lm import load as mlx_load

    mlx_load(str(tiny_dir), adapter_path=str(run_dir))


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_uninterrupted(accum, tiny_dir, data_dir, tmp_path):
    """Interrupt inside an accumulation window (and across an epoch boundary), resume, compare."""
    from mlxpt.train.sft import run_sft

    kw = {"steps": 9, "grad_accum": accum, "dropout": 0.1, "batch_size": 4}
    straight_dir, _ = run_sft(make_cfg(tiny_dir, data_dir, tmp_path / "a", **kw))
    cfg = make_cfg(tiny_dir, data_dir, tmp_path / "b", **kw)
    # reads per step: `accum` micro-batch checks + 1 after the step; stop in step 5's window
    stop = StopAfter(4 * (accum + 1) + 1)
    part_dir, outcome = run_sft(cfg, stop=stop)
    assert outcome == "interrupted"
    _, st = _load_state(part_dir)
    assert st["loop"]["step"] == 4
    resumed_dir, outcome = run_sft(cfg, resume_dir=part_dir)
    assert outcome == "finished"
    a, sa = _load_state(straight_dir)
    b, sb = _load_state(resumed_dir)
    assert sa["loop"]["step"] == sb["loop"]["step"] == 9
    assert (sa["loop"]["epoch"], sa["loop"]["batch_index"]) == (sb["loop"]["epoch"], sb["loop"]["batch_index"])
    for group in ("adapters", "optimizer", "rng"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")

    def losses(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows]

    la, lb = losses(straight_dir), losses(resumed_dir)
    assert [s for s, _ in la] == [s for s, _ in lb]
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=1e-5)


def test_non_finite_steps_are_skipped_then_stop(tiny_dir, data_dir, tmp_path, monkeypatch):
    from mlxpt.backends.mlx_backend import MLXBackend
    from mlxpt.runs import latest_checkpoint, load_checkpoint
    from mlxpt.train.sft import run_sft

    real_reduce = MLXBackend.reduce
    calls = {"n": 0}

    def faulty(self):
        calls["n"] += 1
        loss, ntok, norm, aux = real_reduce(self)
        return (loss, ntok, float("nan"), aux) if calls["n"] in (2, 4, 5, 6) else (loss, ntok, norm, aux)

    monkeypatch.setattr(MLXBackend, "reduce", faulty)
    cfg = make_cfg(tiny_dir, data_dir, tmp_path, steps=10, max_bad_steps=3)
    events = []
    with pytest.raises(NumericsError) as err:
        run_sft(cfg, emit=events.append)
    assert err.value.exit_code == 4
    steps = [e for e in events if e["event"] == "step"]
    assert [e["skipped"] for e in steps] == [False, True, False, True, True, True]
    arrays, state = load_checkpoint(latest_checkpoint(next((tmp_path / "runs").iterdir())))
    assert state["loop"]["bad_total"] == 4
    assert all(np.isfinite(v).all() for v in arrays["adapters"].values())


def test_memory_estimate_refuses_what_cannot_fit(tiny_dir, data_dir, tmp_path, monkeypatch):
    from mlxpt.errors import ResourceError
    from mlxpt.models import memory
    from mlxpt.train.sft import run_sft

    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)  # a 10 kB machine
    with pytest.raises(ResourceError) as e:
        run_sft(make_cfg(tiny_dir, data_dir, tmp_path))
    assert e.value.exit_code == 3 and "exceeds" in e.value.line() and "--batch-size" in e.value.line()
    assert not (tmp_path / "runs").exists(), "refused before a run folder is made"


def test_low_memory_during_training_checkpoints_and_stops(tiny_dir, data_dir, tmp_path, monkeypatch):
    from mlxpt.errors import ResourceError
    from mlxpt.runs import latest_checkpoint
    from mlxpt.train import loop
    from mlxpt.train.sft import run_sft

    calls = {"n": 0}

    def low():
        calls["n"] += 1
        return calls["n"] >= 3

    monkeypatch.setattr(loop, "low_memory", low)
    with pytest.raises(ResourceError) as e:
        run_sft(make_cfg(tiny_dir, data_dir, tmp_path, steps=10))
    assert e.value.exit_code == 3 and e.value.code == "E311"
    assert latest_checkpoint(next((tmp_path / "runs").iterdir())).name == "step-00000003"


def test_eval_batches_zero_means_no_validation(tiny_dir, data_dir, tmp_path):
    from mlxpt.train.sft import run_sft

    events = []
    run_sft(make_cfg(tiny_dir, data_dir, tmp_path, steps=2, eval_every=1, eval_batches=0), emit=events.append)
    assert not [e for e in events if e["event"] == "eval"]
    assert events[-1]["best_val_loss"] is None
