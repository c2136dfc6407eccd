"""Reward model: Bradley–Terry loss values and gradients, training on the shared runner (every
trainable parameter moves), run layout, exact resume, scoring and bad inputs (tiny model, fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tiny
from test_train import StopAfter, _load_state
from tiny import run_config

from mlxpt import objectives as O
from mlxpt.config import DPOConfig, RMConfig
from mlxpt.errors import MlxptError

VALID = tiny.pref_rows(32)[24:]  # the valid split of conftest's pref_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.make_model(tmp_path_factory.mktemp("tiny"))


def make_cfg(tiny_dir, data_dir, tmp_path, **kw) -> RMConfig:
    return run_config(RMConfig, tiny_dir, data_dir, tmp_path, **{"max_seq_len": 512, **kw})  # no pair truncated


@pytest.fixture(scope="module")
def rm_run(tiny_dir, pref_dir, tmp_path_factory):
    """One finished 6-step rm run with evaluations at steps 0, 3, 6 over the whole valid split."""
    from mlxpt.train.rm import run_rm

    events: list[dict] = []
    cfg = make_cfg(tiny_dir, pref_dir, tmp_path_factory.mktemp("rm"), eval_every=3, eval_batches=-1)
    run_dir, outcome = run_rm(cfg, emit=events.append)
    assert outcome == "finished"
    return run_dir, events


# ---- the pure loss ---------------------------------------------------------------------------------


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_bt_loss_values_and_metrics():
    r = np.array([2.0, -1.0, 0.5, 0.5, 1.0, 0.5], np.float32)  # chosen 2, -1, .5; rejected .5, 1, .5
    loss, n, m = O.bt_objective(r)
    want = -math.log(_sig(1.5)) - math.log(_sig(-2.0)) + math.log(2)
    assert float(n) == 3 and float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["accuracy"]) == 1.5  # one right, one wrong, one tie (counts half)
    assert float(m["margin"]) == pytest.approx(1.5 - 2.0 + 0.0)
    assert float(m["rewards_chosen"]) == pytest.approx(1.5) and float(m["rewards_rejected"]) == pytest.approx(2.0)
    # the loss only sees differences; the centring term sees the sum
    assert float(O.bt_objective(r + 7.0)[0]) == pytest.approx(want, rel=1e-5)
    centred = float(O.bt_objective(r, center_coef=0.1)[0])
    assert centred == pytest.approx(want + 0.1 * (2.5**2 + 0.0**2 + 1.0**2), rel=1e-6)


def test_bt_closed_form_grad_matches_autodiff():
    import mlx.core as mx

    r = np.random.default_rng(0).normal(size=8).astype(np.float32)
    for coef in (0.0, 0.05):
        auto = mx.grad(lambda x, c=coef: O.bt_objective(x, center_coef=c)[0])(mx.array(r))
        closed = O.bt_grad(r, center_coef=coef)
        np.testing.assert_allclose(np.array(auto), closed, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.array(O.bt_grad(mx.array(r), center_coef=coef)), closed, rtol=1e-5, atol=1e-7)
    assert O.GRADS[O.bt_objective] is O.bt_grad


# ---- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_every_trainable_parameter_changes_and_no_frozen_one(kind, tiny_dir, pref_dir, tmp_path):
    """A few high-LR steps must move the head and every adapter weight, and nothing frozen."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters
    from mlxpt.train import rm
    from mlxpt.train.dpo import prepare_data

    cfg = make_cfg(tiny_dir, pref_dir, tmp_path, fine_tune_type=kind, num_layers=1)
    model, tok = load(str(tiny_dir))
    apply_adapters(model, cfg.adapter, seed=0)
    rm.add_reward_head(model, seed=0)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert "reward_head.weight" in trainable
    backend = MLXBackend(model, make_optimizer("adamw"), rm.make_objective(cfg), output="reward")
    train, _, _ = prepare_data(cfg, tok)
    batch = rm.collate_pairs(train[:4], 0)
    for _ in range(3):
        backend.accumulate(batch)
        loss, n, norm, aux = backend.reduce()
        assert norm > 0 and n == 4 and math.isfinite(loss) and 0 <= aux["accuracy"] <= 4
        backend.apply(1e-2, 1.0)
    mx.eval(model.parameters())
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == (k in trainable), f"{'trainable' if k in trainable else 'frozen'} {k}"


def test_rm_run_layout_metrics_and_scores_agree_with_validation(rm_run):
    from safetensors.numpy import load_file

    from mlxpt.decode.reward_model import load_reward_model
    from mlxpt.models.heads import HEAD_FILE

    run_dir, events = rm_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "status.json", "metrics.jsonl", "adapters.safetensors", "adapter_config.json"} <= names
    assert HEAD_FILE in names and (run_dir / "checkpoints").is_dir()
    assert set(load_file(str(run_dir / HEAD_FILE))) == {"reward_head.weight"}
    assert not any(k.startswith("reward_head") for k in load_file(str(run_dir / "adapters.safetensors")))
    assert json.loads((run_dir / "config.json").read_text())["method"] == "rm"
    steps = [e for e in events if e["event"] == "step"]
    assert all(math.isfinite(e[k]) for e in steps for k in ("loss", "accuracy", "margin", "rewards_chosen"))
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    # the scorer reproduces training's rewards: its pairwise accuracy is the final val_accuracy
    model = load_reward_model(run_dir)
    prompts = [r["prompt"] for r in VALID]
    chosen = model.score_batch(prompts, [r["chosen"] for r in VALID])
    rejected = model.score_batch(prompts, [r["rejected"] for r in VALID])
    acc = np.mean([1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)])
    assert acc == pytest.approx(evals[-1]["val_accuracy"], abs=1e-6)
    margin = np.mean(np.subtract(chosen, rejected))
    assert margin == pytest.approx(evals[-1]["val_margin"], abs=1e-4)
    # one at a time equals batched; a message-list prompt is the same conversation
    assert model.score(prompts[0], VALID[0]["chosen"]) == pytest.approx(chosen[0], abs=1e-5)
    msgs = [{"role": "user", "content": prompts[0]}]
    assert model.score(msgs, VALID[0]["chosen"]) == pytest.approx(chosen[0], abs=1e-5)


def test_rm_resume_equals_uninterrupted(tiny_dir, pref_dir, tmp_path):
    from mlxpt.train.rm import run_rm

    kw = {"steps": 8, "dropout": 0.1}
    straight_dir, _ = run_rm(make_cfg(tiny_dir, pref_dir, tmp_path / "a", **kw))
    cfg = make_cfg(tiny_dir, pref_dir, tmp_path / "b", **kw)
    part_dir, outcome = run_rm(cfg, stop=StopAfter(4 * 2 + 1))
    assert outcome == "interrupted" and _load_state(part_dir)[1]["loop"]["step"] == 4
    resumed_dir, outcome = run_rm(cfg, resume_dir=part_dir)
    assert outcome == "finished"
    a, sa = _load_state(straight_dir)
    b, sb = _load_state(resumed_dir)
    assert sa["loop"] == {**sb["loop"], "elapsed": sa["loop"]["elapsed"]}
    assert "reward_head.weight" in a["adapters"]
    for group in ("adapters", "optimizer", "rng"):
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


def test_cli_train_rm_events_and_resume(tiny_dir, pref_dir, tmp_path, capsys):
    from pathlib import Path

    from mlxpt.cli import main

    args = ["--model", str(tiny_dir), "--data", str(pref_dir), "--runs-dir", str(tmp_path / "runs")]
    args += ["--steps", "2", "--max-seq-len", "256", "--num-layers", "1", "--center-rewards-coefficient", "0.01"]
    assert main(["train", "rm", *args, "--events", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "start" and events[0]["method"] == "rm" and events[-1]["event"] == "done"
    assert {"accuracy", "margin", "rewards_chosen"} <= set(next(e for e in events if e["event"] == "step"))
    run_dir = Path(events[-1]["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["rm"]["center_rewards_coefficient"] == 0.01
    assert main(["train", "--resume", str(run_dir), "--steps", "3"]) == 0  # the method comes from the run
    out = capsys.readouterr().out
    assert "acc" in out and "reward model saved" in out
    assert json.loads((run_dir / "status.json").read_text())["step"] == 3
    # an rm-only flag on another method, and resuming an rm run as dpo: one-line errors
    assert main(["train", "dpo", "--model", str(tiny_dir), "--center-rewards-coefficient", "0.1"]) == 1
    assert capsys.readouterr().err.startswith("error E504")
    assert main(["train", "dpo", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error E510") and "rm run" in err and len(err.splitlines()) == 1


# ---- bad inputs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tiny_dir, pref_dir, tmp_path_factory):
    from mlxpt.train.dpo import run_dpo

    cfg = run_config(DPOConfig, tiny_dir, pref_dir, tmp_path_factory.mktemp("dpo"), steps=1)
    return run_dpo(cfg)[0]


def test_resuming_a_non_rm_run_as_rm_is_refused(dpo_run, tiny_dir, pref_dir, tmp_path, capsys):
    from mlxpt.cli import main
    from mlxpt.train.rm import run_rm

    with pytest.raises(MlxptError) as e:
        run_rm(make_cfg(tiny_dir, pref_dir, tmp_path), resume_dir=dpo_run)
    assert e.value.code == "E517" and "dpo run" in e.value.line()
    assert main(["train", "rm", "--resume", str(dpo_run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error E510") and len(err.splitlines()) == 1


def test_numpy_backend_refuses_rm_before_loading(tmp_path, pref_dir):
    from mlxpt.train.rm import run_rm

    cfg = make_cfg(tmp_path / "no-such-model", pref_dir, tmp_path, backend="numpy")
    with pytest.raises(MlxptError) as e:
        run_rm(cfg)
    assert e.value.code == "E516" and not (tmp_path / "runs").exists()


def test_loading_a_reward_model_from_a_bad_run_is_one_line(rm_run, dpo_run, tmp_path):
    import shutil

    from mlxpt.decode.reward_model import load_reward_model
    from mlxpt.models.heads import HEAD_FILE

    def code(path):
        with pytest.raises(MlxptError) as e:
            load_reward_model(path)
        assert "\n" not in e.value.line()
        return e.value.code, e.value.line()

    assert code(tmp_path / "nope")[0] == "E518"
    c, line = code(dpo_run)
    assert c == "E518" and "not a reward model" in line
    broken = tmp_path / "broken"
    shutil.copytree(rm_run[0], broken)
    (broken / HEAD_FILE).unlink()
    c, line = code(broken)
    assert c == "E518" and HEAD_FILE in line
    (broken / HEAD_FILE).write_bytes(b"\x80\x04\x95 not safetensors")  # a pickle header
    c, line = code(broken)
    assert c == "E518" and "not a valid safetensors" in line


def test_bad_scoring_inputs_are_one_line_errors(rm_run):
    from mlxpt.decode.reward_model import load_reward_model

    model = load_reward_model(rm_run[0])
    cases = [
        (lambda: model.score_batch(["a", "b"], ["x"]), "E197"),
        (lambda: model.score_batch("a", "x"), "E197"),
        (lambda: model.score("What is 2 + 2?", [{"role": "assistant", "content": " "}]), "E184"),
        (lambda: model.score("What is 2 + 2?", None), "E183"),
        (lambda: model.score("", "4"), "E182"),
        (lambda: model.score(42, "4"), "E181"),
        (lambda: model.score([{"role": "assistant", "content": "hi"}], "4"), "E188"),
    ]
    for call, want in cases:
        with pytest.raises(MlxptError) as e:
            call()
        assert e.value.code == want and "\n" not in e.value.line()
    assert model.score_batch([], []) == []
    assert math.isfinite(model.score("What is 2 + 2?", ""))  # an empty sample still gets a score


def test_center_coefficient_must_be_non_negative(tiny_dir, pref_dir, tmp_path):
    with pytest.raises(MlxptError) as e:
        make_cfg(tiny_dir, pref_dir, tmp_path, center_rewards_coefficient=-1)
    assert e.value.code == "E505"


def test_rm_learns_a_held_out_preference(tiny_dir, tmp_path):
    """Chosen replies end with an `Answer: n` line, rejected ones do not: after 20 steps the reward
    model ranks every held-out pair right, and its validation loss has fallen."""
    import random

    from mlxpt.train.rm import run_rm

    rng = random.Random(0)

    def row():
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        steps = f"{a} + {b} = {a + b}\n"
        return {
            "prompt": f"What is {a} + {b}?",
            "chosen": steps + f"Answer: {a + b}",
            "rejected": steps + f"So it is {a + b}.",
        }

    for split, n in (("train", 64), ("valid", 32)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
    cfg = make_cfg(tiny_dir, tmp_path, tmp_path, steps=20, eval_every=20, eval_batches=-1, warmup_steps=2)
    events = []
    run_rm(cfg, emit=events.append)
    first, last = (e for e in events if e["event"] == "eval")
    assert last["val_accuracy"] == 1.0 and last["val_loss"] < 0.5 * first["val_loss"], (first, last)
