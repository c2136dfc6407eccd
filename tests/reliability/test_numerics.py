"""Numerics: NaN/Inf injected into an input element, one gradient tensor and the loss are caught
before the update (the step is skipped, adapters and optimiser state stay as they were), counted,
never written; repeated faults stop with exit 4; a checkpoint holding NaN is refused on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, load_file, save

from mlxpt.config import SFTConfig, apply_flat
from mlxpt.errors import NumericsError
from mlxpt.runs import list_checkpoints, load_checkpoint, sha256_file
from reliability import numeric
from reliability.harness import error_lines, train_args

pytestmark = pytest.mark.reliability


def make_cfg(model: Path, data: Path, runs: Path, **kw) -> SFTConfig:
    cfg = SFTConfig()
    base = {
        "model": str(model),
        "data": str(data),
        "runs_dir": str(runs),
        "steps": 5,
        "batch_size": 2,
        "eval_every": 0,
        "save_every": 1,
        "keep": 100,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "num_layers": -1,
        "rank": 4,
        "max_bad_steps": 3,
    }
    apply_flat(cfg, {**base, **kw}, source="test")
    return cfg


def non_finite_written(root: Path) -> int:
    """Non-finite floating tensors in every safetensors file, and non-finite numbers in metrics."""
    bad = 0
    for f in root.rglob("*.safetensors"):
        bad += sum(int(not np.isfinite(v).all()) for v in load_file(f).values() if v.dtype.kind == "f")
    for f in root.rglob("metrics.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            bad += sum(isinstance(v, float) and not math.isfinite(v) for v in row.values())
    return bad


def run_with_faults(cfg: SFTConfig, kind: str, windows: list[int]):
    from mlxpt.train.sft import run_sft

    events: list[dict] = []
    state = numeric.inject({"kind": kind, "windows": windows})
    try:
        try:
            run_dir, _ = run_sft(cfg, emit=events.append)
            error = None
        except NumericsError as e:
            run_dir, error = next(Path(cfg.train.runs_dir).iterdir()), e
    finally:
        state["restore"]()
    return run_dir, events, error, state["fired"]


@pytest.mark.parametrize("kind", numeric.KINDS)
def test_one_fault_is_skipped_before_the_update(kind, tiny_model, small_data, tmp_path, scoreboard):
    cfg = make_cfg(tiny_model, small_data, tmp_path / "runs")
    run_dir, events, error, fired = run_with_faults(cfg, kind, [3])
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    cks = {int(p.name[5:]): load_checkpoint(p)[0] for p in list_checkpoints(run_dir)}
    # caught before the update: step 3 was skipped and changed neither adapters nor optimiser
    unchanged = all(np.array_equal(cks[2][g][k], cks[3][g][k]) for g in ("adapters", "optimizer") for k in cks[2][g])
    moved = not all(np.array_equal(cks[3]["adapters"][k], cks[4]["adapters"][k]) for k in cks[3]["adapters"])
    caught = fired == 1 and steps[3]["skipped"] and unchanged and steps[3]["loss"] is None
    written = non_finite_written(run_dir)
    scoreboard.record("numerics", injected=fired, caught=int(caught), non_finite_written=written)
    assert error is None and fired == 1
    assert caught, steps[3]
    assert moved and not steps[4]["skipped"], "training goes on after a skipped step"
    assert [e["bad_steps"] for e in events if e["event"] == "step"] == [0, 0, 1, 1, 1]
    assert load_checkpoint(list_checkpoints(run_dir)[-1])[1]["loop"]["bad_total"] == 1
    assert written == 0


def test_repeated_faults_stop_with_exit_4(zygote, tiny_model, small_data, tmp_path, scoreboard):
    """Three non-finite steps in a row (max_bad_steps=3): a checkpoint of the last finite state,
    a one-line E402 and exit 4, from the real command line."""
    argv = train_args(tiny_model, small_data, tmp_path / "runs", 8, max_bad_steps=3, name="nan")
    child = zygote.run(argv, faults={"numeric": {"kind": "nan_grad", "windows": [3, 4, 5]}})
    steps = [e for e in child.events() if e["event"] == "step"]
    run_dir = Path(child.start()["run_dir"])
    errors = error_lines(child.stderr())
    newest = load_checkpoint(list_checkpoints(run_dir)[-1])
    caught = sum(e["skipped"] for e in steps)
    written = non_finite_written(run_dir)
    scoreboard.record("numerics", injected=3, caught=caught, non_finite_written=written, stops=1)
    assert child.code == 4, child.stderr()
    assert len(errors) == 1 and errors[0].startswith("error E402") and "Traceback" not in child.stderr()
    assert [e["skipped"] for e in steps] == [False, False, True, True, True]
    assert newest[1]["loop"]["step"] == 5 and newest[1]["loop"]["bad_total"] == 3
    assert written == 0


def craft_nan_checkpoint(ck: Path) -> None:
    """Put a NaN into a checkpoint's adapters and recompute its manifest, as a bug or a hand edit
    with a valid manifest would (save_checkpoint itself refuses to write NaN)."""
    f = ck / "adapters.safetensors"
    tensors = load(f.read_bytes())
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    f.write_bytes(save(tensors))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["adapters.safetensors"] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    (ck / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoint_with_nan_adapters_is_refused_on_resume(zygote, tiny_model, small_data, tmp_path, scoreboard):
    first = zygote.run(train_args(tiny_model, small_data, tmp_path / "runs", 2))
    assert first.code == 0, first.stderr()
    run_dir = Path(first.start()["run_dir"])
    ck = list_checkpoints(run_dir)[-1]
    craft_nan_checkpoint(ck)
    before = {p.name: sha256_file(p) for p in run_dir.rglob("*") if p.is_file()}
    child = zygote.run(["train", "--resume", run_dir, "--steps", "4", "--events", "json"])
    errors = error_lines(child.stderr())
    refused = child.code == 4 and len(errors) == 1 and "non-finite" in errors[0] and not child.start()
    scoreboard.record("numerics", injected=1, caught=int(refused), non_finite_written=0)
    assert refused, (child.code, child.stderr())
    assert "Traceback" not in child.stderr()
    after = {p.name: sha256_file(p) for p in run_dir.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k != "status.json"} == {
        k: v for k, v in before.items() if k != "status.json"
    }, "nothing was trained or written from the bad checkpoint"
