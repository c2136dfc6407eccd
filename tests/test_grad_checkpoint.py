"""Gradient checkpointing (`--grad-checkpoint`): each block recomputed in the backward gives the
plain pass's loss and gradients (SFT rows and packed bins, DPO whole rows and shared prompts,
LoRA with dropout, DoRA, prefix tuning with its shared encoder, bottleneck adapters), really
recomputes, leaves runs and resumes unchanged, shrinks the memory estimate, and refuses what it
cannot do with one line (tiny model, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import StopAfter, _load_state
from tiny import run_config

from mlxpt.config import AdapterConfig, DPOConfig, build_config
from mlxpt.errors import ConfigError
from mlxpt.objectives import sft_objective

ADAPTERS = {
    "lora-dropout": {"dropout": 0.1},
    "dora": {"fine_tune_type": "dora"},
    "prefix-projection": {"fine_tune_type": "prefix", "prefix_length": 4, "prefix_projection": 8},
    "bottleneck": {"fine_tune_type": "adapter", "adapter_size": 8},
}


def _backend(path, grad_checkpoint: bool, objective=sft_objective, **adapter):
    """A tiny MLX backend, every trainable array moved off its initial value (no zero gradients)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models.adapters import apply_adapters

    model = load_model(path)[0]
    config = apply_adapters(model, AdapterConfig(**{"num_layers": 2, "rank": 4, "alpha": 8.0, **adapter}), seed=0)
    rng = np.random.default_rng(1)
    moved = [(k, v + mx.array(0.05 * rng.standard_normal(v.shape).astype(np.float32)))
             for k, v in tree_flatten(model.trainable_parameters())]  # fmt: skip
    model.load_weights(moved, strict=False)
    return MLXBackend(model, make_optimizer("adamw"), objective, adapter_config=config, grad_checkpoint=grad_checkpoint)


def _loss_and_grads(backend, batch):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.random.seed(3)  # the same dropout masks for both backends
    backend.accumulate(batch)
    loss, n, norm, _ = backend.reduce()
    grads = {k: np.array(v) / n for k, v in tree_flatten(backend._grads)}  # of the mean loss
    backend.discard()
    return loss / n, norm, grads, np.array(mx.random.state[0])


def _same(plain, ckpt):
    (l0, n0, g0, k0), (l1, n1, g1, k1) = plain, ckpt
    assert abs(l0 - l1) <= 1e-6 * (1 + abs(l0)) and abs(n0 - n1) <= 1e-6 * (1 + n0)
    assert (k0 == k1).all()  # the RNG advanced as without checkpointing
    assert g0.keys() == g1.keys() and sum(np.abs(g).max() > 1e-4 for g in g0.values()) > len(g0) // 2
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=0, atol=1e-6, err_msg=k)


def _sft_examples():
    from mlxpt.data.encode import Example

    rng = np.random.default_rng(0)
    return [
        Example(rng.integers(3, 272, n).tolist(), [0] * (n // 3) + [1] * (n - n // 3), f"r{n}") for n in (23, 9, 17)
    ]


@pytest.mark.parametrize("packed", [False, True])
def test_sft_loss_and_gradients_are_unchanged(tiny_dir, packed):
    from mlxpt.data.batching import collate, collate_packed

    found = []
    for on in (False, True):
        backend = _backend(tiny_dir, on)
        if packed:
            assert backend.pack_rows()[0]
            backend.set_objective(sft_objective)
        ex = _sft_examples()
        found.append(_loss_and_grads(backend, collate_packed(ex, 0, 64) if packed else collate(ex, 0)))
    _same(*found)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_every_adapter_type_keeps_its_gradients(tiny_dir, kind):
    from mlxpt.data.batching import collate

    batch = collate(_sft_examples(), 0)
    _same(*[_loss_and_grads(_backend(tiny_dir, on, **ADAPTERS[kind]), batch) for on in (False, True)])


def test_blocks_below_the_first_trained_one_run_as_they_are(tiny_dir):
    """Nothing below the first adapted block has a backward: no checkpoint (it would only cost time)."""
    from mlxpt.data.batching import collate

    backends = [_backend(tiny_dir, on, num_layers=1) for on in (False, True)]
    assert [b._checkpointing for b in backends[1].model.layers] == [False, True]
    _same(*[_loss_and_grads(b, collate(_sft_examples(), 0)) for b in backends])


@pytest.mark.parametrize("layout", ["rows", "grouped"])
def test_dpo_loss_and_gradients_are_unchanged(tiny_dir, layout):
    """The shared-prompt pass keeps the prompts' keys/values in its caches from one call of a block
    to the next: they must carry gradients through the checkpoint."""
    from mlxpt.data.preference import PrefExample
    from mlxpt.train.dpo import collate_pairs, make_objective

    rng = np.random.default_rng(2)
    pairs = [PrefExample(rng.integers(3, 272, p).tolist(), rng.integers(3, 272, c).tolist(),
                         rng.integers(3, 272, r).tolist(), "x", -20.0 + i, -21.0 - i)
             for i, (p, c, r) in enumerate([(11, 5, 7), (6, 9, 3)])]  # fmt: skip
    found = []
    for on in (False, True):
        backend = _backend(tiny_dir, on)
        if layout == "grouped":
            assert backend.share_prompts()[0]
        backend.set_objective(make_objective(DPOConfig(), layout))
        found.append(_loss_and_grads(backend, collate_pairs(pairs, 0, grouped=layout == "grouped")))
    _same(*found)


def test_each_block_is_really_recomputed(tiny_dir, monkeypatch):
    """Uncompiled, one gradient step calls each block twice with checkpointing (forward, then the
    recomputation in the backward), once without; evaluation never recomputes."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.data.batching import collate

    calls = []
    plain = llama.TransformerBlock.__call__
    monkeypatch.setattr(
        llama.TransformerBlock, "__call__", lambda self, *a, **k: calls.append(1) or plain(self, *a, **k)
    )
    batch = collate(_sft_examples(), 0)
    counts = []
    for on in (False, True):
        b = _backend(tiny_dir, on)
        b = MLXBackend(b.model, make_optimizer("adamw"), compile=False, adapter_config=b.adapter_config,
                       grad_checkpoint=on)  # fmt: skip
        calls.clear()
        b.accumulate(batch)
        b.reduce()
        counts.append(len(calls))
        calls.clear()
        b.evaluate(batch)
        counts.append(len(calls))
    assert counts == [2, 2, 4, 2]  # 2 blocks
    assert type(b.model.layers[0]).__name__ == "CheckpointedTransformerBlock"
    assert "self_attn.q_proj.lora_a" in dict(tree_flatten(b.model.layers[0].parameters()))  # names kept


def test_dpo_run_and_a_resume_with_it_equal_a_plain_run(tiny_dir, pref_dir, tmp_path):
    """A DPO run (shared prompts, LoRA dropout 0.1) with checkpointing equals one without, step for
    step; so does a run that stops after step 2 and resumes with checkpointing turned on."""
    from mlxpt.train.dpo import run_dpo

    kw = {"steps": 4, "dropout": 0.1, "batch_size": 2}
    runs = {}
    for name, on in (("plain", False), ("ckpt", True)):
        events = []
        run_dir, _ = run_dpo(run_config(DPOConfig, tiny_dir, pref_dir, tmp_path / name, grad_checkpoint=on, **kw),
                             emit=events.append)  # fmt: skip
        start = next(e for e in events if e["event"] == "start")
        runs[name] = run_dir, [e for e in events if e["event"] == "step"], start
    cfg = run_config(DPOConfig, tiny_dir, pref_dir, tmp_path / "resumed", **kw)
    part, outcome = run_dpo(cfg, stop=StopAfter(2 * 2 + 1))
    assert outcome == "interrupted" and _load_state(part)[1]["loop"]["step"] == 2
    saved = json.loads((part / "config.json").read_text())
    cfg = build_config(None, {"grad_checkpoint": "true"}, resume=str(part), resume_config=saved)  # allowed on resume
    assert cfg.train.grad_checkpoint is True
    resumed, outcome = run_dpo(cfg, resume_dir=part)
    assert outcome == "finished"
    (plain, steps0, start0), (ckpt, steps1, start1) = runs["plain"], runs["ckpt"]
    assert start0["layout"] == start1["layout"] == "grouped"
    assert start1["memory_estimate_mb"] < start0["memory_estimate_mb"]
    for a, b in zip(steps0, steps1, strict=True):
        for k in ("loss", "grad_norm", "margin"):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k)
    a, _ = _load_state(plain)
    for other in (ckpt, resumed):
        b, _ = _load_state(other)
        for group in ("adapters", "optimizer", "rng"):
            for k in a[group]:
                np.testing.assert_allclose(b[group][k], a[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


def test_memory_estimate_keeps_one_block(tiny_dir, monkeypatch):
    from dataclasses import replace

    from mlx_lm.utils import load_model

    from mlxpt.errors import ResourceError
    from mlxpt.models import memory

    model = load_model(tiny_dir)[0]
    shape = memory.Shape.rows(8, 256)
    plain, ckpt = (
        memory.estimate_bytes(model, shape),
        memory.estimate_bytes(model, replace(shape, grad_checkpoint=True)),
    )
    assert plain["weights"] == ckpt["weights"] and plain["optimizer"] == ckpt["optimizer"]
    args, tokens = model.args, 8 * 256
    per_block = tokens * (14 * args.hidden_size + 4 * args.intermediate_size) * 4 + 4 * tokens * 256 * 4 * 2
    boundary = tokens * args.hidden_size * 4 * 2
    assert plain["activations"] - ckpt["activations"] == 2 * per_block - (per_block + 2 * boundary)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    for s, hinted in ((shape, True), (replace(shape, grad_checkpoint=True), False)):
        with pytest.raises(ResourceError) as e:
            memory.check_fits(model, s)
        assert ("--grad-checkpoint" in e.value.hint) is hinted and "\n" not in e.value.line()


def test_the_tui_estimate_follows_the_setting():
    """The New run form's memory estimate is keyed on the shape: switching the field re-estimates."""
    from types import SimpleNamespace

    from app.screens.new_run import NewRunScreen

    for on in (False, True):
        cfg = build_config("dpo", {"grad_checkpoint": on})
        shape = NewRunScreen._batch_shape(SimpleNamespace(method="dpo"), cfg, 100)
        assert shape.grad_checkpoint is on and shape.tokens == 2 * 4 * 100


def test_numpy_backend_takes_it_as_it_is(tiny_dir):
    """The NumPy backend's backward always recomputes each layer from its input: nothing to change."""
    from mlxpt.backends import create_backend
    from mlxpt.config import SFTConfig

    cfg = build_config("sft", {"model": str(tiny_dir), "backend": "numpy", "grad_checkpoint": True})
    assert isinstance(cfg, SFTConfig) and cfg.train.grad_checkpoint
    backend = create_backend("numpy", cfg.model, cfg.adapter, cfg.train, sft_objective)
    assert backend.name == "numpy"


# ---- refusals: one line each ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["maybe", "2", ""])
def test_a_value_that_is_not_a_boolean_is_refused(tmp_path, capsys, value):
    from mlxpt.cli import main

    with pytest.raises(ConfigError) as e:
        build_config("sft", {"grad_checkpoint": value})
    assert e.value.code == "E502" and "grad_checkpoint" in e.value.line()
    path = tmp_path / "c.yaml"
    path.write_text(f"grad_checkpoint: '{value}'\nruns_dir: {tmp_path / 'runs'}\n")
    assert main(["train", "sft", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E502" in err[0] and not (tmp_path / "runs").exists()


def test_a_model_without_blocks_is_refused():
    import mlx.core as mx
    import mlx.nn as nn

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def __call__(self, x):
            return self.proj(mx.zeros((*x.shape, 4)))

    with pytest.raises(ConfigError) as e:
        MLXBackend(NoBlocks(), make_optimizer("adamw"), grad_checkpoint=True, adapter_config={})
    assert e.value.code == "E780" and "--grad-checkpoint" in e.value.line() and "\n" not in e.value.line()


def test_a_block_reading_trainable_arrays_it_does_not_pass_is_refused(tiny_dir):
    """The self-check catches a block that reads a trainable module from outside its own tree
    without handing it to the checkpoint (here: the prefix encoder under a name it does not know,
    in blocks with trainable norms of their own), which would train that module on zero gradients."""
    from mlx.utils import tree_flatten

    from mlxpt.backends import mlx_checkpoint

    backend = _backend(tiny_dir, False, **ADAPTERS["prefix-projection"])
    model = backend.model
    model["hidden_encoder"] = model.pop("prefix_encoder")
    for block in model.layers:
        block.input_layernorm.unfreeze()  # trainable blocks: checkpointed (blocks with nothing to train are not)
    before = dict(tree_flatten(model.trainable_parameters()))
    with pytest.raises(ConfigError) as e:
        mlx_checkpoint.enable(model)
    assert e.value.code == "E781" and "--grad-checkpoint" in e.value.line()
    after = dict(tree_flatten(model.trainable_parameters()))
    assert all((np.array(before[k]) == np.array(after[k])).all() for k in before)  # left as it was
    assert not any(b._checkpointing for b in model.layers)
