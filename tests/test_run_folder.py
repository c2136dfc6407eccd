"""train/runner.RunFolder: every write of a run goes through it. Rank 0 writes, with the world
size in every status; any other rank writes nothing (the same state, one writer a folder)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mlxpt.runs import latest_checkpoint, read_status
from mlxpt.train import distributed
from mlxpt.train.loop import LoopState, Task
from mlxpt.train.runner import RunFolder


class FakeBackend:
    adapter_config = {"fine_tune_type": "lora"}

    def get_state(self) -> dict:
        return {"adapters": {"a": np.zeros(2, np.float32)}}

    def save_adapter(self, folder) -> None:
        (folder / "adapters.safetensors").write_bytes(b"")


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_zero_alone_writes_and_every_status_carries_the_world_size(monkeypatch, tmp_path, rank):
    monkeypatch.setattr(distributed, "WORLD", distributed.World(rank=rank, size=3))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 4}\n')
    cfg = SimpleNamespace(train=SimpleNamespace(keep=2, steps=5))
    folder = RunFolder([])
    assert folder.reopen(run) == run and folder.writes == (rank == 0)
    folder.lock(run)
    try:
        folder.status("running", step=0, steps=5)
        folder.trim_logs(1)  # the line of step 4 came after the checkpoint resumed from
        folder.metrics({"event": "step", "step": 2})
        path = folder.checkpoint(LoopState(step=2), FakeBackend(), Task(batches=None, evaluate=None), cfg)
        running = read_status(run)
        folder.status("failed", step=2, error="E999 boom")
    finally:
        for lock in folder.locks:
            lock.release()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    if rank:  # nothing at all: no lock, status, trim, metric line or checkpoint
        assert path is None and folder.locks == [] and read_status(run) is None
        assert steps == [1, 4] and not (run / "checkpoints").exists()
        return
    assert len(folder.locks) == 1 and steps == [1, 2]
    assert path == latest_checkpoint(run) and (run / "adapters.safetensors").exists()
    assert running == {**running, "status": "running", "step": 2, "steps": 5, "world_size": 3}
    failed = read_status(run)
    assert failed["status"] == "failed" and failed["world_size"] == 3 and failed["error"] == "E999 boom"


def test_reward_files_scorer_runs_and_teachers_are_saved_absolute(tmp_path, monkeypatch):
    """rft's `--rewards f.py:fn` and `--scorer prm:RUN` (rm:, prm+verifier:, reward:f.py:fn) and
    distill's `--teacher PATH` are saved absolute, so a resume from another folder reads the same
    files; names that are no path here (built-ins, hub ids, an alias) stay as given."""
    from mlxpt.models.loader import ALIASES
    from mlxpt.runs import write_config

    for name in ("rw.py", "runs/prm", "runs/rm", "models/big", next(iter(ALIASES))):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).mkdir() if not name.endswith(".py") else (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)
    cases = [
        ("rft", "rewards", "accuracy, rw.py:one", f"accuracy,{tmp_path}/rw.py:one"),
        ("rft", "scorer", "prm:runs/prm", f"prm:{tmp_path}/runs/prm"),
        ("rft", "scorer", "prm+verifier:runs/prm", f"prm+verifier:{tmp_path}/runs/prm"),
        ("rft", "scorer", "rm:runs/rm", f"rm:{tmp_path}/runs/rm"),
        ("rft", "scorer", "reward:rw.py:one", f"reward:{tmp_path}/rw.py:one"),
        ("rft", "scorer", "verifier", "verifier"),
        ("rft", "scorer", "prm:runs/missing", "prm:runs/missing"),
        ("distill", "teacher", "models/big", f"{tmp_path}/models/big"),
        ("distill", "teacher", "owner/hub-model", "owner/hub-model"),
        ("distill", "teacher", next(iter(ALIASES)), next(iter(ALIASES))),
    ]
    for i, (section, key, given, saved) in enumerate(cases):
        run = tmp_path / "out" / str(i)
        run.mkdir(parents=True)
        write_config(run, {"method": section, section: {key: given}})
        assert json.loads((run / "config.json").read_text())[section][key] == saved, (section, key, given)


def test_the_config_knows_every_model_alias_the_loader_resolves():
    """config/paths.py keeps an alias (never a path) by the config's MODEL_ALIASES: it may not
    import the loader (a higher layer), so the two lists are checked against each other here."""
    from mlxpt.config.sections import MODEL_ALIASES
    from mlxpt.models.loader import ALIASES

    assert set(MODEL_ALIASES) == set(ALIASES)
