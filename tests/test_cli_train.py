"""`mlxpt train` as a user runs it: errors, YAML, events, Ctrl-C and resume (tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxpt.cli import main

ROOT = Path(__file__).resolve().parent.parent


def mlxpt(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "mlxpt.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


def test_help_imports_neither_mlx_nor_textual():
    code = (
        "import sys, contextlib, io\n"
        "from mlxpt.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['data', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'textual', 'mlx_lm', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_data_fails_before_the_model_is_touched(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": 5}\n')
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(bad), "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err and all(line.startswith("error E1") for line in err), err
    assert f"{bad}:1" in err[0] and "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("2*")), "no run folder for rejected data"


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["--steps", "0"], "E505", "steps=0"),
        (["--steps", "ten"], "E502", "steps='ten'"),
        (["--learning-rate", "-1"], "E505", "learning_rate"),
        (["--targets", "nope_proj"], "E509", "nope_proj"),
    ],
)
def test_bad_settings_are_one_line_errors(args, code, fragment, tiny_dir, data_dir, tmp_path, capsys):
    rc = main(["train", "--model", str(tiny_dir), "--data", str(data_dir), "--runs-dir", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error {code}") and fragment in err


def test_bad_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--optimizer", "lion"])
    assert e.value.code == 2


def test_a_setting_name_shared_by_methods_takes_each_methods_choices(capsys):
    """DPO's and GRPO's loss_type share a flag: GRPO's choices alone once parsed it, so every
    `mlxpt train dpo --loss-type ipo` (and the TUI's DPO form) failed as a usage error."""
    import argparse

    from mlxpt.commands.train import config_from_args, register
    from mlxpt.errors import ConfigError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for method, loss in (("dpo", "ipo"), ("simpo", "simpo"), ("orpo", "orpo"), ("grpo", "dr_grpo")):
        _, cfg = config_from_args(parser.parse_args(["train", method, "--loss-type", loss]))
        section = cfg.grpo if method == "grpo" else cfg.pref
        assert section.loss_type == loss
    with pytest.raises(ConfigError) as e:  # another method's choice: the method's own one-line error
        config_from_args(parser.parse_args(["train", "grpo", "--loss-type", "ipo"]))
    assert e.value.code == "E503" and "grpo, dr_grpo" in e.value.line()


def test_yaml_config_and_cli_precedence(tiny_dir, data_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata: {data_dir}\ntrain:\n  steps: 2\n  learning_rate: 0.001\nrank: 4\n")
    rc = main(["train", "--config", str(cfg), "--steps", "3", "--runs-dir", str(tmp_path / "runs"), "--events", "json"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    saved = json.loads((Path(events[-1]["run_dir"]) / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["learning_rate"] == 0.001
    assert saved["adapter"]["rank"] == 4


@pytest.mark.parametrize(
    "text,code",
    [("steps: [1, 2\n", "E507"), ("stepz: 3\n", "E504"), ("- 1\n- 2\n", "E508"), ("steps: 2.5\n", "E502")],
)
def test_bad_yaml(text, code, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error {code}") and str(cfg) in err and len(err.splitlines()) == 1


def test_ctrl_c_checkpoints_exits_130_and_resume_finishes(tiny_dir, data_dir, tmp_path):
    runs = tmp_path / "runs"
    args = ["train", "--model", str(tiny_dir), "--data", str(data_dir), "--runs-dir", str(runs)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxpt.cli", *args, "--steps", "100000", "--save-every", "3", "--events", "json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "checkpoint":
                break
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert time.time() - t0 < 30
    assert "Resume with: mlxpt train --resume" in err
    run_dir = next(runs.iterdir())
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted"
    step = status["step"]
    # resume: changing the model is refused, extending steps is allowed
    bad = mlxpt("train", "--resume", str(run_dir), "--batch-size", "2")
    assert bad.returncode == 1 and bad.stderr.startswith("error E510")
    done = mlxpt("train", "--resume", str(run_dir), "--steps", str(step + 2))
    assert done.returncode == 0, done.stderr
    assert f"resuming at step {step}" in done.stdout
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("saved", [False, True])
def test_interrupted_message_says_whether_a_checkpoint_was_saved(saved, tmp_path, monkeypatch, capsys):
    """A stop during DPO's reference pass ends before step 1: the CLI must not claim a checkpoint."""
    from mlxpt.train import methods

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ("step-00000002" if saved else "")).mkdir(parents=True)
    if saved:
        monkeypatch.setattr("mlxpt.runs.latest_checkpoint", lambda d: Path(d) / "checkpoints" / "step-00000002")
    monkeypatch.setattr(methods, "run_method", lambda name, cfg, **kw: (run_dir, "interrupted"))
    assert main(["train", "dpo", "--steps", "2"]) == 130
    err = capsys.readouterr().err
    assert f"Resume with: mlxpt train --resume {run_dir}" in err
    assert ("checkpoint saved" in err) == saved and ("nothing to save" in err) == (not saved)
