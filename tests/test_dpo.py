"""Preference optimisation: loss values, closed-form gradients, DPO runs and resume (tiny model, fast)."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import tiny
from test_train import StopAfter, _load_state
from tiny import run_config

from mlxpt import objectives as O
from mlxpt.config import DPOConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.make_model(tmp_path_factory.mktemp("tiny"))


def make_cfg(tiny_dir, data_dir, tmp_path, **kw) -> DPOConfig:
    return run_config(DPOConfig, tiny_dir, data_dir, tmp_path, **kw)


# ---- pure losses: hand-computed values ---------------------------------------------------------


def _batch(pc, pr, n_c=(2,), n_r=(2,)):
    """logp/mask for B pairs where each response's log-prob is spread evenly over its tokens."""
    B, L = len(pc), max(*n_c, *n_r)
    logp, mask = np.zeros((2 * B, L), np.float32), np.zeros((2 * B, L), np.float32)
    for i in range(B):
        for row, total, n in ((i, pc[i], n_c[i % len(n_c)]), (B + i, pr[i], n_r[i % len(n_r)])):
            mask[row, :n] = 1
            logp[row, :n] = total / n
            logp[row, n:] = -7.0  # padding: must not count
    return logp, mask


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_sigmoid_values():
    logp, mask = _batch([-3.0, -5.0], [-4.0, -2.0])
    ref_c, ref_r = np.array([-3.5, -5.0], np.float32), np.array([-3.0, -2.5], np.float32)
    loss, n, m = O.dpo_objective(logp, mask, ref_c, ref_r, beta=0.5)
    h = np.array([(-3 + 3.5) - (-4 + 3), (-5 + 5) - (-2 + 2.5)])  # 1.5, -0.5
    want = sum(-math.log(_sig(0.5 * x)) for x in h)
    assert float(n) == 2 and float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["accuracy"]) == 1 and float(m["margin"]) == pytest.approx(0.5 * h.sum(), rel=1e-6)
    assert float(m["rewards_chosen"]) == pytest.approx(0.5 * (0.5 + 0.0))
    assert float(m["logp_chosen"]) == pytest.approx(-8.0) and float(m["logp_rejected"]) == pytest.approx(-6.0)
    # label smoothing: -(1-ε) log σ(z) - ε log σ(-z)
    loss_s, _, _ = O.dpo_objective(logp, mask, ref_c, ref_r, beta=0.5, label_smoothing=0.2)
    want_s = sum(-0.8 * math.log(_sig(0.5 * x)) - 0.2 * math.log(_sig(-0.5 * x)) for x in h)
    assert float(loss_s) == pytest.approx(want_s, rel=1e-6)


def test_dpo_known_limits():
    """Equal log-probs (or equal ratios) give ln 2 per pair; beta -> 0 gives ln 2 for any input."""
    logp, mask = _batch([-3.0, -1.0], [-3.0, -9.0])
    same_c, same_r = np.array([-3.0, -1.0], np.float32), np.array([-3.0, -9.0], np.float32)
    loss, n, m = O.dpo_objective(logp, mask, same_c, same_r)
    assert float(loss) / float(n) == pytest.approx(math.log(2), rel=1e-6)
    assert float(m["accuracy"]) == 1.0  # ties count half
    ref = np.array([-6.0, 0.0], np.float32)
    loss0, n0, _ = O.dpo_objective(logp, mask, ref, ref, beta=1e-7)
    assert float(loss0) / float(n0) == pytest.approx(math.log(2), rel=1e-5)


def test_ipo_hinge_simpo_orpo_values():
    logp, mask = _batch([-2.0], [-6.0], n_c=(2,), n_r=(4,))
    rc, rr = np.array([-3.0], np.float32), np.array([-5.0], np.float32)
    h = (-2 + 3) - (-6 + 5)  # 2
    assert float(O.dpo_objective(logp, mask, rc, rr, "ipo", beta=0.25)[0]) == pytest.approx((h - 2) ** 2 + 0.0)
    assert float(O.dpo_objective(logp, mask, rc, rr, "ipo", beta=1.0)[0]) == pytest.approx((h - 0.5) ** 2)
    assert float(O.dpo_objective(logp, mask, rc, rr, "hinge", beta=0.1)[0]) == pytest.approx(1 - 0.2)
    assert float(O.dpo_objective(logp, mask, rc, rr, "hinge", beta=1.0)[0]) == 0.0
    # SimPO: mean log-probs -1 and -1.5, z = 2 * 0.5 - 0.5
    simpo = float(O.simpo_objective(logp, mask, rc, rr, beta=2.0, gamma=0.5)[0])
    assert simpo == pytest.approx(-math.log(_sig(0.5)), rel=1e-6)
    # ORPO: -a - λ log σ(log odds a - log odds b)
    a, b = -1.0, -1.5
    odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
    orpo = float(O.orpo_objective(logp, mask, rc, rr, orpo_lambda=0.3)[0])
    assert orpo == pytest.approx(1.0 - 0.3 * math.log(_sig(odds)), rel=1e-6)


LOSSES = [
    (O.dpo_objective, O.dpo_grad, {"loss_type": "sigmoid", "beta": 0.3, "label_smoothing": 0.1}),
    (O.dpo_objective, O.dpo_grad, {"loss_type": "ipo", "beta": 0.2}),
    (O.dpo_objective, O.dpo_grad, {"loss_type": "hinge", "beta": 0.2}),
    (O.simpo_objective, O.simpo_grad, {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1}),
    (O.orpo_objective, O.orpo_grad, {"orpo_lambda": 0.2}),
]


@pytest.mark.parametrize("loss,grad,kw", LOSSES, ids=["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_closed_form_grad_matches_autodiff(loss, grad, kw):
    import mlx.core as mx

    rng = np.random.default_rng(0)
    B, L = 3, 6
    logp = -rng.uniform(0.1, 2.0, (2 * B, L)).astype(np.float32)
    mask = (rng.uniform(size=(2 * B, L)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    rc, rr = (-rng.uniform(1, 6, B).astype(np.float32) for _ in range(2))
    f = partial(loss, **kw)
    auto = mx.grad(lambda lp: f(lp, mx.array(mask), mx.array(rc), mx.array(rr))[0])(mx.array(logp))
    closed_np = grad(logp, mask, rc, rr, **kw)  # NumPy in, NumPy out
    closed_mx = grad(mx.array(logp), mx.array(mask), mx.array(rc), mx.array(rr), **kw)
    np.testing.assert_allclose(np.array(auto), closed_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(closed_mx), closed_np, rtol=1e-4, atol=1e-6)
    assert not np.any(closed_np[mask == 0]), "padding must get no gradient"
    # numpy and mlx agree on the loss too
    ln = float(f(logp, mask, rc, rr)[0])
    assert float(f(mx.array(logp), mx.array(mask), mx.array(rc), mx.array(rr))[0]) == pytest.approx(ln, rel=1e-5)


# ---- training with the tiny model --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_every_trainable_parameter_changes_and_no_frozen_one(kind, tiny_dir, pref_dir, tmp_path):
    """A few high-LR DPO steps must move every trainable parameter (the zero-gradient DPO bug)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters
    from mlxpt.train import dpo

    cfg = make_cfg(tiny_dir, pref_dir, tmp_path, fine_tune_type=kind, num_layers=1)
    model, tok = load(str(tiny_dir))
    apply_adapters(model, cfg.adapter, seed=0)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    backend = MLXBackend(model, make_optimizer("adamw"), dpo.make_objective(cfg))
    train, _, _ = dpo.prepare_data(cfg, tok)
    c, r = dpo.reference_logps(backend, train[:4], 4, 0)
    for p, a, b in zip(train[:4], c, r, strict=True):
        p.ref_chosen, p.ref_rejected = float(a), float(b)
    batch = dpo.collate_pairs(train[:4], 0)
    losses = []
    for _ in range(3):
        backend.accumulate(batch)
        loss, n, norm, _ = backend.reduce()
        assert norm > 0
        losses.append(loss / n)
        backend.apply(1e-2, 1.0)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4), "policy == reference at step 0"
    mx.eval(model.parameters())
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == (k in trainable), f"{'trainable' if k in trainable else 'frozen'} {k}"


def test_dpo_run_layout_reference_cache_and_metrics(tiny_dir, pref_dir, tmp_path):
    from mlxpt.runs import read_status
    from mlxpt.train.dpo import REFERENCE_FILE, run_dpo

    cfg = make_cfg(tiny_dir, pref_dir, tmp_path, steps=6, eval_every=3, learning_rate=5e-3)
    events = []
    run_dir, outcome = run_dpo(cfg, emit=events.append)
    assert outcome == "finished" and read_status(run_dir)["status"] == "finished"
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "status.json", "metrics.jsonl", "adapters.safetensors", REFERENCE_FILE} <= names
    ref = [e for e in events if e["event"] == "reference"]
    assert [e["status"] for e in ref] == ["computing"] * (len(ref) - 1) + ["computed"]
    done = [e["done"] for e in ref[:-1]]  # progress: rising, every 10 % at most, ending at every pair
    assert len(done) >= 2 and done == sorted(set(done)) and done[-1] == ref[-1]["pairs"] == ref[0]["pairs"]
    kinds = [e["event"] for e in events]
    assert kinds.index("start") < kinds.index("reference")  # the run is announced before the long pass
    steps = [e for e in events if e["event"] == "step"]
    keys = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected")
    assert all(all(math.isfinite(e[k]) for k in keys) for e in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6] and all(0 <= e["val_accuracy"] <= 1 for e in evals)
    assert json.loads((run_dir / "config.json").read_text())["pref"]["loss_type"] == "sigmoid"


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_shared_prompt_and_plain_scoring_train_the_same(tiny_dir, pref_dir, tmp_path, loss_type):
    """Each prompt once per pair (responses interleaved, reordered for the loss) trains like
    whole rows: same reference log-probs, losses and adapters after a few steps with dropout."""
    from safetensors.numpy import load_file

    from mlxpt.train.dpo import REFERENCE_FILE, run_dpo

    # SGD: Adam turns a gradient that is ~0 into a step of about +-lr, so float noise would show
    kw = {"steps": 4, "optimizer": "sgd", "learning_rate": 0.5, "eval_every": 2, "loss_type": loss_type}
    runs = []
    for name, plain in (("shared", False), ("plain", True)):
        events = []
        run_dir, _ = run_dpo(
            make_cfg(tiny_dir, pref_dir, tmp_path / name, plain_scoring=plain, **kw), emit=events.append
        )
        assert not [e for e in events if e["event"] == "warning" and "scoring" in e["message"]]
        losses = [e["loss"] for e in events if e["event"] == "step"] + [
            e["val_loss"] for e in events if e["event"] == "eval"
        ]
        ref = load_file(str(run_dir / REFERENCE_FILE)) if (run_dir / REFERENCE_FILE).exists() else {}
        runs.append((_load_state(run_dir)[0]["adapters"], losses, ref))
    (a, la, ra), (b, lb, rb) = runs
    np.testing.assert_allclose(la, lb, atol=2e-5)
    assert ra.keys() == rb.keys() and (loss_type == "orpo") == (not ra)
    for k in ra:
        np.testing.assert_allclose(ra[k], rb[k], atol=2e-4, err_msg=k)
    assert max(np.abs(v).max() for k, v in a.items() if k.endswith("lora_b")) > 1e-4  # they trained
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)


def test_shared_prompt_layout_and_interleaved_objective():
    from mlxpt.data.preference import PrefExample
    from mlxpt.train import dpo

    pairs = [PrefExample([5, 6, 7], [8, 9], [10], "a"), PrefExample([5], [11, 12, 13], [14, 15], "b")]
    prompts, left_pad, comps, mask, _, _ = dpo.collate_pairs(pairs, 0, grouped=True)
    assert prompts.tolist()[0][-3:] == [5, 6, 7] and left_pad.tolist() == [prompts.shape[1] - 3, prompts.shape[1] - 1]
    assert [row[: int(m.sum())] for row, m in zip(comps.tolist(), mask, strict=True)] == [
        [8, 9],
        [10],
        [11, 12, 13],
        [14, 15],
    ]
    seen = {}

    def objective(logp, mask, *rest):
        seen["logp"], seen["mask"] = logp, mask
        return 0.0

    logp = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    dpo.interleaved(objective)(logp, mask)
    assert seen["logp"][:, 0].tolist() == [0, 6, 3, 9]  # c0, c1, r0, r1
    assert seen["mask"].sum(axis=1).tolist() == [2, 3, 1, 2]


def test_signal_during_the_reference_pass_stops_before_step_1_and_resume_recomputes(
    tiny_dir, pref_dir, tmp_path, capfd
):
    import os
    import signal

    from mlxpt.runs import latest_checkpoint, read_status
    from mlxpt.train.dpo import REFERENCE_FILE, run_dpo

    cfg = make_cfg(tiny_dir, pref_dir, tmp_path, steps=2)
    events = []

    def emit(e):  # a Ctrl-C while the first batches are scored
        events.append(e)
        if e["event"] == "reference" and e["status"] == "computing" and len(events) < 10:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir, outcome = run_dpo(cfg, emit=emit)
    assert outcome == "interrupted" and read_status(run_dir)["status"] == "interrupted"
    assert not (run_dir / REFERENCE_FILE).exists() and latest_checkpoint(run_dir) is None
    assert [e["event"] for e in events if e["event"] in ("step", "done")] == ["done"]
    assert "SIGINT received" in capfd.readouterr().err  # written with os.write: capfd, not capsys
    events.clear()
    resumed, outcome = run_dpo(cfg, resume_dir=run_dir, emit=events.append)
    assert outcome == "finished" and resumed == run_dir
    assert [e["status"] for e in events if e["event"] == "reference"][-1] == "computed"
    assert (run_dir / REFERENCE_FILE).exists()


def test_dpo_resume_equals_uninterrupted_and_reuses_the_cache(tiny_dir, pref_dir, tmp_path):
    from mlxpt.train.dpo import run_dpo

    kw = {"steps": 8, "dropout": 0.1}
    straight_dir, _ = run_dpo(make_cfg(tiny_dir, pref_dir, tmp_path / "a", **kw))
    cfg = make_cfg(tiny_dir, pref_dir, tmp_path / "b", **kw)
    part_dir, outcome = run_dpo(cfg, stop=StopAfter(4 * 2 + 1))
    assert outcome == "interrupted" and _load_state(part_dir)[1]["loop"]["step"] == 4
    events = []
    resumed_dir, outcome = run_dpo(cfg, resume_dir=part_dir, emit=events.append)
    assert outcome == "finished"
    assert [e["status"] for e in events if e["event"] == "reference"] == ["loaded"]
    a, sa = _load_state(straight_dir)
    b, sb = _load_state(resumed_dir)
    assert sa["loop"] == {**sb["loop"], "elapsed": sa["loop"]["elapsed"]}
    for group in ("adapters", "optimizer", "rng"):
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


def test_resume_refuses_a_reference_cache_that_does_not_match(tiny_dir, pref_dir, tmp_path):
    from mlxpt.errors import MlxptError
    from mlxpt.train.dpo import REFERENCE_FILE, run_dpo

    cfg = make_cfg(tiny_dir, pref_dir, tmp_path, steps=2)
    run_dir, _ = run_dpo(cfg)
    cfg.data.max_seq_len = 200  # different encoding -> different pairs
    cfg.train.steps = 3
    with pytest.raises(MlxptError) as e:
        run_dpo(cfg, resume_dir=run_dir)
    assert e.value.code == "E195"
    (run_dir / REFERENCE_FILE).unlink()
    cfg.data.max_seq_len = 256
    with pytest.raises(MlxptError) as e:  # trained weights: the reference cannot be recomputed
        run_dpo(cfg, resume_dir=run_dir)
    assert e.value.code == "E196"


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo", "orpo"])
def test_other_losses_train(loss_type, tiny_dir, pref_dir, tmp_path):
    from mlxpt.train.dpo import REFERENCE_FILE, run_dpo

    events = []
    cfg = make_cfg(tiny_dir, pref_dir, tmp_path, steps=3, loss_type=loss_type)
    run_dir, outcome = run_dpo(cfg, emit=events.append, name=loss_type)
    assert outcome == "finished"
    assert all(math.isfinite(e["loss"]) for e in events if e["event"] == "step")
    assert (run_dir / REFERENCE_FILE).exists() == (loss_type in ("ipo", "hinge"))


def test_cli_train_dpo_json_events_and_run_layout(tiny_dir, pref_dir, tmp_path, capsys):
    from pathlib import Path

    from mlxpt.cli import main
    from mlxpt.train.dpo import REFERENCE_FILE

    args = ["--model", str(tiny_dir), "--data", str(pref_dir), "--runs-dir", str(tmp_path / "runs")]
    args += ["--steps", "2", "--max-seq-len", "256", "--num-layers", "1", "--events", "json", "--beta", "0.2"]
    assert main(["train", "dpo", *args]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"  # the reference pass runs after "start", before step 1
    assert kinds.index("reference") < kinds.index("step")
    assert events[0]["method"] == "dpo" and {"accuracy", "margin"} <= set(events[kinds.index("step")])
    run_dir = Path(events[-1]["run_dir"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "status.json", "metrics.jsonl", "adapters.safetensors", "adapter_config.json"} <= names
    assert REFERENCE_FILE in names and (run_dir / "checkpoints").is_dir()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["method"] == "dpo" and saved["pref"]["beta"] == 0.2
    # resume picks the method from the run; simpo is dpo with its loss; sft rejects preference flags
    assert main(["train", "--resume", str(run_dir), "--steps", "3", "--events", "json"]) == 0
    assert json.loads((run_dir / "status.json").read_text())["step"] == 3
    capsys.readouterr()
    assert main(["train", "simpo", *args[:-2]]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    saved = json.loads((Path(events[-1]["run_dir"]) / "config.json").read_text())
    assert saved["method"] == "simpo" and saved["pref"]["loss_type"] == "simpo" and saved["pref"]["beta"] == 2.0
    assert main(["train", "--model", str(tiny_dir), "--beta", "0.2"]) == 1
    assert capsys.readouterr().err.startswith("error E504")


def test_cli_bad_preference_data_fails_before_the_model(tmp_path, capsys):
    from mlxpt.cli import main

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": ""}\n')
    rc = main(["train", "dpo", "--model", str(tmp_path / "nope"), "--data", str(bad), "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error E184") and f"{bad}:1" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("2*"))
