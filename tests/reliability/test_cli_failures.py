"""Every failure is one line, and a closed stdout never costs a run (issue 26, contract 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxpt.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.reliability


def test_an_unexpected_exception_is_one_line_with_the_traceback_saved(monkeypatch, capsys, tmp_path):
    import mlxpt.commands.doctor as doctor

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(doctor, "run", broken)
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error E001: unexpected TypeError: unsupported operand"), err
    saved = Path(err[0].rsplit("traceback in ", 1)[1])
    assert saved.is_file() and "Traceback" in saved.read_text() and "broken" in saved.read_text()
    with pytest.raises(TypeError):  # --debug shows it
        main(["--debug", "doctor"])


def test_a_closed_stdout_ends_a_command_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxpt.cli", "doctor"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.read(1)
    proc.stdout.close()  # `| head -c 1`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_training_goes_on_when_its_reader_goes_away(tiny_dir, data_dir, tmp_path):
    runs = tmp_path / "runs"
    argv = [
        sys.executable, "-m", "mlxpt.cli", "train", "--model", str(tiny_dir), "--data", str(data_dir),
        "--runs-dir", str(runs), "--steps", "6", "--batch-size", "2", "--eval-every", "0", "--save-every", "3",
        "--num-layers", "-1", "--events", "json", "--regression-data", "none",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    first = json.loads(proc.stdout.readline())  # `| head -n 1`
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert first["event"] in ("start", "warning")
    assert proc.returncode == 0, err
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert b"Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--limit", "1", "--out", "{file}/results.json"],
        ["eval", "--limit", "1", "--out", "{folder}"],
        ["eval", "--limit", "1", "--plot", "{file}/chart.png"],
        ["train", "--steps", "1", "--runs-dir", "{file}"],
        ["train", "--steps", "1", "--runs-dir", "{file}/runs"],
    ],
    ids=[
        "eval-out-under-a-file",
        "eval-out-a-folder",
        "eval-plot-under-a-file",
        "runs-dir-a-file",
        "runs-under-a-file",
    ],
)
def test_an_unwritable_output_is_refused_before_any_work(argv, tmp_path, capsys, monkeypatch):
    import mlxpt.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(loader, "load", no_load)
    monkeypatch.setattr(loader, "load_tokenizer", no_load)
    file = tmp_path / "a-file"
    file.write_text("x")
    argv = [a.format(file=file, folder=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error E619"), err
    assert file.read_text() == "x"


def test_a_finished_evaluation_is_kept_when_its_output_fails(tmp_path, monkeypatch):
    from mlxpt.commands import eval as eval_cmd
    from mlxpt.errors import ResourceError

    def fail(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(ResourceError) as e:
        eval_cmd._save_results(tmp_path / "out.json", {"results": [1, 2]}, fail)
    import re

    spare = Path(re.search(r"saved in (\S+)", e.value.line()).group(1))
    assert json.loads(spare.read_text()) == {"results": [1, 2]}


def test_a_full_disk_for_the_spare_too_leaves_no_torn_spare_and_exits_3(tmp_path, monkeypatch):
    """The spare copy of a result that cannot be written went to the same full disk: a torn JSON
    was left in TMPDIR and the error was E001 (a bug), exit 1."""
    import builtins
    import tempfile

    from mlxpt.commands import eval as eval_cmd
    from mlxpt.errors import ResourceError

    def fail(path, obj):
        raise OSError(27, "File too large")

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    real_open = builtins.open

    def full_open(file, mode="r", *a, **kw):
        handle = real_open(file, mode, *a, **kw)
        if "w" in mode and isinstance(file, int):  # the spare's descriptor: writes fail part-way
            handle.write = lambda text: (_ for _ in ()).throw(OSError(27, "File too large"))
        return handle

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(ResourceError) as e:
        eval_cmd._save_results(tmp_path / "out.json", {"results": [1, 2]}, fail)
    monkeypatch.undo()
    assert e.value.exit_code == 3 and "nor a spare copy" in e.value.line()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("[write] Unable to write 35580 bytes to file."),  # mx.save_safetensors (fuse, export)
        RuntimeError("[Compile::eval_cpu] Failed to compile function ... ld: final link failed: File too large"),
        OSError(28, "No space left on device", "out.json"),
    ],
    ids=["mlx-write", "mlx-compile", "oserror"],
)
def test_a_full_disk_outside_our_writers_is_exit_3_not_a_bug(exc, capsys):
    """MLX's own writes and kernel compiles met a full disk or `ulimit -f` as E001 (a bug), exit 1."""
    from types import SimpleNamespace

    from mlxpt.cli import run_command

    def fails(args):
        raise exc

    args = SimpleNamespace(command="data", data_command="check", func=fails, debug=False)
    assert run_command(args) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error E301") and "bug" not in err and len(err.splitlines()) == 1, err
