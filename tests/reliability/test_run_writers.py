"""A run folder has one writer, a resume never silently starts over, and trust comes only from
the person (issue 26's contracts 2-4): checked on the tiny model, in-process and across processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import make_cfg

from mlxpt.config import build_config
from mlxpt.errors import ConfigError, MlxptError
from mlxpt.runs.guards import RunLock, lock_holder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.reliability


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished_run(tiny_dir, data_dir, tmp_path):
    from mlxpt.train.sft import run_sft

    cfg = make_cfg(tiny_dir, data_dir, tmp_path, steps=4, save_every=2, keep=2)
    run_dir, outcome = run_sft(cfg)
    assert outcome == "finished"
    return cfg, run_dir


@pytest.mark.parametrize("damage", ["truncate a file", "delete the manifest", "edit the state", "no checkpoints"])
def test_resume_without_a_valid_checkpoint_is_refused_and_touches_nothing(finished_run, damage, scoreboard):
    from mlxpt.train.sft import run_sft

    cfg, run_dir = finished_run
    cks = sorted((run_dir / "checkpoints").iterdir())
    assert len(cks) == 2
    for ck in cks:
        if damage == "truncate a file":
            f = ck / "adapters.safetensors"
            f.write_bytes(f.read_bytes()[:100])
        elif damage == "delete the manifest":
            (ck / "manifest.json").unlink()
        elif damage == "edit the state":
            (ck / "state.json").write_text((ck / "state.json").read_text().replace('"step"', '"step" ', 1))
        else:
            import shutil

            shutil.rmtree(ck)
    before = _hashes(run_dir)
    with pytest.raises(MlxptError) as e:
        run_sft(cfg, resume_dir=run_dir)
    ok = e.value.code == "E522" and _hashes(run_dir) == before
    scoreboard.record("writers", resumes_tried=1, resumes_refused=int(ok))
    assert e.value.code == "E522" and "start over" in e.value.line()
    assert f"mlxpt train --config {run_dir}" in e.value.line()  # the explicit fresh start, named
    if damage != "no checkpoints":
        assert all(ck.name in e.value.line() for ck in cks)  # each one is named, with its reason
    assert _hashes(run_dir) == before


def test_a_run_stopped_before_its_first_step_may_still_resume_from_zero(tmp_path):
    from mlxpt.train.runner import check_resumable

    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text('{"status": "interrupted", "step": 0}')
    check_resumable(run)  # nothing was trained: starting at 0 loses nothing


def test_a_second_writer_is_refused_with_the_pid(finished_run, scoreboard):
    from mlxpt.train.sft import run_sft

    cfg, run_dir = finished_run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mlxpt.runs.guards import RunLock\n"
         f"RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(run_dir) == holder.pid
        before = _hashes(run_dir)
        with pytest.raises(ConfigError) as e:
            run_sft(cfg, resume_dir=run_dir)
        ok = e.value.code == "E521" and str(holder.pid) in e.value.line() and _hashes(run_dir) == before
        scoreboard.record("writers", second_tried=1, second_refused=int(ok))
        assert e.value.code == "E521" and str(holder.pid) in e.value.line()
        assert _hashes(run_dir) == before
        holder.send_signal(signal.SIGKILL)  # a dead writer's lock goes with it
        holder.wait(10)
        deadline = time.time() + 5
        while lock_holder(run_dir) is not None and time.time() < deadline:
            time.sleep(0.05)
        assert lock_holder(run_dir) is None
        cfg.train.steps = 5
        _, outcome = run_sft(cfg, resume_dir=run_dir)
        assert outcome == "finished"
    finally:
        if holder.poll() is None:
            holder.kill()


def test_the_lock_is_released_when_training_ends_or_fails(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        assert lock_holder(run) == os.getpid()
        with pytest.raises(ConfigError):  # the same process cannot take it twice either
            RunLock(run).acquire()
    assert lock_holder(run) is None
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path / "missing").acquire()
    assert e.value.code == "E523"


def test_trust_on_resume_comes_from_the_command_line_not_the_run(tmp_path, scoreboard):
    saved = build_config("sft", {"trust_remote_code": True}).to_dict()
    saved["method"] = "sft"
    assert saved["model"]["trust_remote_code"] is True  # what a run folder from anyone may say
    cfg = build_config(None, {}, resume=str(tmp_path), resume_config=saved)
    scoreboard.record("writers", trust_tried=1, trust_refused=int(cfg.model.trust_remote_code is False))
    assert cfg.model.trust_remote_code is False
    cfg = build_config(None, {"trust_remote_code": True}, resume=str(tmp_path), resume_config=saved)
    assert cfg.model.trust_remote_code is True


def test_max_seq_len_beyond_the_models_context_is_warned(tiny_dir, data_dir, tmp_path):
    from mlxpt.train.sft import run_sft

    events = []
    cfg = make_cfg(tiny_dir, data_dir, tmp_path, steps=1, max_seq_len=4096)  # the tiny model has 512
    run_sft(cfg, emit=events.append)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("beyond the model's context (512" in w for w in warnings), warnings


def test_a_checkpoint_used_as_an_adapter_must_match_its_manifest(finished_run, capsys):
    from mlxpt.cli import main

    _, run_dir = finished_run
    ck = sorted((run_dir / "checkpoints").iterdir())[-1]
    state = ck / "state.json"
    state.write_text(state.read_text() + " ")  # an edit the manifest's sha256 catches
    code = main(["generate", "--adapter", str(ck), "--prompt", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error E224") and "does not verify" in err[0], err


def test_a_run_killed_before_its_first_checkpoint_completed_resumes_from_zero(tmp_path):
    """Killed after step 1's metrics line but inside its first checkpoint (only a temp folder left):
    no checkpoint was ever saved, so a resume starts at 0 and loses nothing (found by the crash
    chain of test_crash_safety once the step-0 evaluation shifted its timings)."""
    from mlxpt.train.runner import check_resumable

    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-00000001-abcd").mkdir(parents=True)
    (run / "status.json").write_text('{"status": "running", "step": 0}')
    (run / "metrics.jsonl").write_text('{"event": "step", "step": 1, "loss": 0.7}\n')
    assert check_resumable(run) is None
