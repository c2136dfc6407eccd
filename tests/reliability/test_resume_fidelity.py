"""Resume fidelity: a run stopped at several positions (during warm-up, inside an accumulation
window, in a window that straddles an epoch boundary, exactly at an epoch boundary) and resumed
equals the straight run: adapters, optimiser state, RNG, the metrics after the interruption and
the order in which micro-batches were trained."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny import StopAfter

from reliability.conftest import write_split
from reliability.harness import assert_arrays_close, checkpoint_arrays
from reliability.test_numerics import make_cfg

pytestmark = pytest.mark.reliability

# 10 rows, batch 2: 5 micro-batches per epoch. The loop reads the stop flag after each micro-batch
# and after each step, so with grad_accum A step k's reads are (A+1)(k-1)+1 ... (A+1)k.
CONFIGS = {
    "accum2": {"grad_accum": 2, "warmup_steps": 3, "steps": 7},
    "accum1": {"grad_accum": 1, "warmup_steps": 2, "steps": 8},
}
# (name, config, stop at read n, expected (step, epoch, batch_index) of the saved checkpoint)
POSITIONS = [
    ("warm-up, between steps", "accum2", 3, (1, 0, 2)),
    ("warm-up, inside a window", "accum2", 4, (1, 0, 2)),
    ("window straddling an epoch boundary", "accum2", 7, (2, 0, 4)),
    ("inside an accumulation window", "accum2", 14, (4, 1, 3)),
    ("exactly at an epoch boundary", "accum1", 10, (5, 0, 5)),
    ("first micro-batch of a new epoch", "accum1", 11, (5, 0, 5)),
]


def traced_run(monkeypatch, cfg, **kw):
    """run_sft, recording every micro-batch (epoch, index, example ids) the loop draws."""
    from mlxpt.train import loop
    from mlxpt.train.sft import run_sft

    drawn = []
    real = loop.iter_batches

    def iter_batches(*args):
        for item in real(*args):
            drawn.append((item[0], item[1], list(item[2])))
            yield item

    monkeypatch.setattr(loop, "iter_batches", iter_batches)
    run_dir, outcome = run_sft(cfg, **kw)
    monkeypatch.setattr(loop, "iter_batches", real)
    return run_dir, outcome, drawn


def metrics(run_dir) -> list[dict]:
    keep = ("step", "loss", "grad_norm", "lr", "tokens", "trained_tokens", "skipped", "epoch")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in keep} for r in rows]


def metrics_match(a: list[dict], b: list[dict]) -> bool:
    """Same steps, counts and flags; losses, norms and rates within 1e-6 (MLX CPU)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float):
                if not np.isclose(x[k], y[k], rtol=1e-6, atol=0):
                    return False
            elif x[k] != y[k]:
                return False
    return True


@pytest.fixture(scope="module")
def straight(tiny_model, small_data, tmp_path_factory):
    from _pytest.monkeypatch import MonkeyPatch

    out = {}
    for name, kw in CONFIGS.items():
        mp = MonkeyPatch()
        cfg = make_cfg(tiny_model, small_data, tmp_path_factory.mktemp(name), dropout=0.1, save_every=100, **kw)
        run_dir, outcome, drawn = traced_run(mp, cfg)
        mp.undo()
        assert outcome == "finished"
        out[name] = (run_dir, drawn)
    return out


@pytest.mark.parametrize("name,config,stop_at,position", POSITIONS, ids=[p[0] for p in POSITIONS])
def test_interrupted_and_resumed_equals_straight(
    name, config, stop_at, position, straight, tiny_model, small_data, tmp_path, monkeypatch, scoreboard
):
    from mlxpt.runs import latest_checkpoint, load_checkpoint

    kw = CONFIGS[config]
    cfg = make_cfg(tiny_model, small_data, tmp_path, dropout=0.1, save_every=100, **kw)
    part_dir, outcome, part = traced_run(monkeypatch, cfg, stop=StopAfter(stop_at))
    loop_state = load_checkpoint(latest_checkpoint(part_dir))[1]["loop"]
    at = (loop_state["step"], loop_state["epoch"], loop_state["batch_index"])
    resumed_dir, outcome2, rest = traced_run(monkeypatch, cfg, resume_dir=part_dir)
    ref_dir, ref_order = straight[config]
    done = loop_state["step"] * kw["grad_accum"]
    checks = {
        "position": at == position and outcome == "interrupted" and outcome2 == "finished",
        "data_order": part[:done] + rest == ref_order,
        "metrics": metrics_match(metrics(ref_dir), metrics(resumed_dir)),
    }
    try:
        assert_arrays_close(checkpoint_arrays(ref_dir), checkpoint_arrays(resumed_dir), atol=1e-6)
        checks["state"] = True
    except AssertionError:
        checks["state"] = False
    scoreboard.record("resume", positions=1, equal=int(all(checks.values())))
    assert checks["position"], (at, position)
    assert checks["data_order"], "micro-batches trained in a different order"
    assert checks["metrics"], (metrics(ref_dir), metrics(resumed_dir))
    assert checks["state"], "adapters/optimiser/RNG differ from the straight run"


@pytest.mark.parametrize("checkpoint", [True, False], ids=["step-0 checkpoint", "no checkpoint"])
def test_a_resume_before_step_1_logs_step_0s_validation_once(checkpoint, tiny_model, tmp_path):
    """A stop inside step 1's window saves step 0 (a Ctrl-C while GRPO samples step 1), and a run
    killed before its first checkpoint resumes at 0 too: the resumed run validates at step 0 again,
    so its metrics.jsonl must not keep the first one (once it held step 0's eval line twice)."""
    from mlxpt.train.sft import run_sft

    data = write_split(tmp_path / "data", 10, n_valid=4)
    kw = {"grad_accum": 2, "steps": 3, "eval_every": 1, "save_every": 100, "regression_data": "none"}
    ref_dir, _ = run_sft(make_cfg(tiny_model, data, tmp_path / "a", **kw))
    cfg = make_cfg(tiny_model, data, tmp_path / "b", **kw)
    part_dir, outcome = run_sft(cfg, stop=StopAfter(1))
    assert outcome == "interrupted" and (part_dir / "checkpoints/step-00000000").is_dir()
    if not checkpoint:
        shutil.rmtree(part_dir / "checkpoints")
    resumed_dir, outcome = run_sft(cfg, resume_dir=part_dir)
    assert outcome == "finished"
    events = [(m["event"], m["step"]) for m in metrics_rows(resumed_dir)]
    assert events == [(m["event"], m["step"]) for m in metrics_rows(ref_dir)]
    assert events[:2] == [("eval", 0), ("step", 1)]
    assert metrics_match(metrics(ref_dir), metrics(resumed_dir))


def metrics_rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
