"""An adversarial pass (issue 26): the CLI used as a careless or hostile user would: odd paths
(FIFOs, sockets, names too long, spaces and unicode, another working directory), edited run
folders, pipes, environment variables, signals and two processes at once. Each case is one line
of outcome; the xfail-strict ones are bugs outside this suite's files, with the fix named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import make_model

from mlxpt.cli import main
from reliability.conftest import write_split
from reliability.harness import ROOT, error_lines

pytestmark = pytest.mark.reliability

TRAIN = ["--steps", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "1", "--warmup-steps", "0",
         "--regression-data", "none"]  # fmt: skip


def run_main(argv, capsys) -> tuple[int, list[str], str]:
    """(exit code, error lines, stderr) of one in-process command."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, error_lines(err), err


def one_line(code, errors, err, want: str, exit_code: int = 1) -> bool:
    return code == exit_code and len(errors) == 1 and errors[0].startswith(f"error {want}") and "Traceback" not in err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a model, data and one finished 2-step run trained with relative paths from
    inside it (as `cd project && mlxpt train --model model --data data` would)."""
    root = tmp_path_factory.mktemp("adversarial") / "wörld with spaces"
    make_model(root / "model")
    write_split(root / "data", 10)
    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--model", "model", "--data", "data", "--runs-dir", "runs", *TRAIN]) == 0
    finally:
        os.chdir(here)
    (run,) = (root / "runs").iterdir()
    return root, run


@pytest.fixture
def run_copy(world, tmp_path):
    """A fresh copy of the world's finished run, to edit."""
    return Path(shutil.copytree(world[1], tmp_path / "runs" / world[1].name))


def record(scoreboard, ok: bool) -> None:
    scoreboard.record("adversarial", tried=1, ok=int(ok))


# ---- odd paths ------------------------------------------------------------------------------


def _special(kind: str, folder: Path) -> Path:
    path = folder / kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    return path


@pytest.mark.parametrize(
    "argv,kind,code",
    [
        (["eval", "--model", "{model}", "--data", "{data}", "--limit", "1", "--out", "{out}"], "fifo", "E619"),
        (["eval", "--model", "{model}", "--data", "{data}", "--limit", "1", "--out", "{out}"], "socket", "E619"),
        (["eval", "--model", "{model}", "--data", "{data}", "--limit", "1", "--out", "{tmp}/r.json", "--plot", "{out}"],
         "fifo", "E619"),
        (["data", "self-answers", "--model", "{model}", "--prompts", "{data}", "--out", "{out}"], "fifo", "E619"),
        (["fuse", "{run}", "--out", "{out}"], "fifo", "E611"),
        (["train", "--model", "{model}", "--data", "{train}", "--runs-dir", "{out}", *TRAIN], "fifo", "E619"),
        (["generate", "--model", "{model}", "--adapter", "{out}", "--prompt", "hi"], "fifo", "E221"),
    ],
    ids=["eval-out-fifo", "eval-out-socket", "eval-plot-fifo", "self-answers-out-fifo", "fuse-out-fifo",
         "runs-dir-fifo", "adapter-fifo"],
)  # fmt: skip
def test_a_fifo_or_socket_is_never_an_output(argv, kind, code, world, tmp_path, capsys, scoreboard):
    """An output that is a FIFO or socket (or a device: /dev/full was replaced by a regular file
    once) is refused before any work, and left as it was."""
    root, run = world
    out = _special(kind, tmp_path)
    data = ROOT / "assets/sft/test.jsonl"
    fill = {"model": root / "model", "data": data, "out": out, "tmp": tmp_path, "run": run, "train": root / "data"}
    got = run_main([a.format(**fill) for a in argv], capsys)
    ok = one_line(*got, code) and not out.is_file() and not out.is_dir()
    record(scoreboard, ok)
    assert ok, got


def test_a_path_too_long_is_one_line(world, tmp_path, capsys, scoreboard):
    root, _ = world
    runs = tmp_path / ("x" * 300)
    got = run_main(["train", "--model", root / "model", "--data", root / "data", "--runs-dir", runs, *TRAIN], capsys)
    record(scoreboard, one_line(*got, "E619"))
    assert one_line(*got, "E619"), got


def test_an_empty_data_path_is_one_line(world, tmp_path, capsys, monkeypatch, scoreboard):
    monkeypatch.chdir(tmp_path)
    got = run_main(["train", "--model", world[0] / "model", "--data", "", "--runs-dir", "runs", *TRAIN], capsys)
    record(scoreboard, one_line(*got, "E160") and not (tmp_path / "runs").exists())
    assert one_line(*got, "E160"), got


@pytest.mark.parametrize("command", ["resume", "generate", "fuse"])
def test_a_run_with_relative_paths_works_from_any_folder(command, world, run_copy, tmp_path, capsys, monkeypatch,
                                                         scoreboard):  # fmt: skip
    """A run trained as `mlxpt train --model model --data data` is resumed, generated from and
    fused from another working directory (its paths were saved relative to the first one)."""
    monkeypatch.chdir(tmp_path)
    argv = {
        "resume": ["train", "--resume", run_copy, "--steps", "3"],
        "generate": ["generate", "--adapter", run_copy, "--prompt", "hi", "--max-tokens", "2"],
        "fuse": ["fuse", run_copy, "--out", tmp_path / "fused"],
    }[command]
    code, errors, err = run_main(argv, capsys)
    record(scoreboard, code == 0)
    assert code == 0 and not errors, err


def test_an_old_run_with_relative_paths_is_anchored_where_it_was_started(world, tmp_path, capsys, monkeypatch,
                                                                          scoreboard):  # fmt: skip
    """config.json files written before paths were saved absolute: the run's runs folder tells
    where it was started, so `generate --adapter` still finds its model from elsewhere."""
    root, run = world
    runs = root / "runs-old"
    old = Path(shutil.copytree(run, runs / run.name))
    try:
        cfg = json.loads((old / "config.json").read_text())
        cfg["model"]["model"] = cfg["model_path"] = "model"
        cfg["data"]["data"], cfg["train"]["runs_dir"] = "data", "runs-old"
        (old / "config.json").write_text(json.dumps(cfg))
        monkeypatch.chdir(tmp_path)
        code, errors, err = run_main(["generate", "--adapter", old, "--prompt", "hi", "--max-tokens", "2"], capsys)
    finally:
        shutil.rmtree(runs)
    record(scoreboard, code == 0)
    assert code == 0 and not errors, err


# ---- edited run folders ---------------------------------------------------------------------


def _edit_config(run: Path, change) -> None:
    cfg = json.loads((run / "config.json").read_text())
    change(cfg)
    (run / "config.json").write_text(json.dumps(cfg))


EDITS = {  # name: (edit of the run folder, expected error code or None for a good resume)
    "status.json garbage": (lambda r: (r / "status.json").write_text("{{{ not json"), None),
    "status.json a folder": (lambda r: ((r / "status.json").unlink(), (r / "status.json").mkdir()), "E630"),
    "metrics.jsonl cut mid-line": (lambda r: open(r / "metrics.jsonl", "a").write('{"event": "step", "st'), None),
    "config steps a string": (lambda r: _edit_config(r, lambda c: c["train"].update(steps="abc")), "E502"),
    "config learning_rate true": (lambda r: _edit_config(r, lambda c: c["train"].update(learning_rate=True)), "E502"),
    "config a list": (lambda r: (r / "config.json").write_text("[1, 2]"), "E304"),
    "config a folder": (lambda r: ((r / "config.json").unlink(), (r / "config.json").mkdir()), "E304"),
    "config without model": (lambda r: _edit_config(r, lambda c: c.pop("model")), "E304"),
    "config without data": (lambda r: _edit_config(r, lambda c: c.pop("data")), "E304"),
    "config unknown method": (lambda r: _edit_config(r, lambda c: c.update(method="../evil")), "E304"),
    "checkpoints a file": (lambda r: (shutil.rmtree(r / "checkpoints"), (r / "checkpoints").write_text("x")), "E522"),
    "checkpoints deleted": (lambda r: shutil.rmtree(r / "checkpoints"), "E522"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_run_folder_resumes_or_is_one_line(edit, run_copy, capsys, scoreboard):
    change, want = EDITS[edit]
    change(run_copy)
    code, errors, err = run_main(["train", "--resume", run_copy, "--steps", "3"], capsys)
    if want is None:
        ok = code == 0 and not errors
        bad = []
        for line in (run_copy / "metrics.jsonl").read_text().splitlines():
            try:
                json.loads(line)
            except ValueError:
                bad.append(line)
        ok = ok and not bad  # the cut line is trimmed, never glued to the next record
    else:
        ok = one_line(code, errors, err, want)
    record(scoreboard, ok)
    assert ok, (code, err)


def test_a_config_edited_to_another_model_shape_is_refused(run_copy, tmp_path, capsys):
    other = make_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    _edit_config(run_copy, lambda c: c["model"].update(model=str(other)))
    got = run_main(["train", "--resume", run_copy, "--steps", "3"], capsys)
    assert got[0] == 1 and len(got[1]) == 1 and got[1][0].startswith("error E524"), got


def test_a_config_edited_to_a_deeper_model_is_refused(run_copy, tmp_path, capsys):
    other = make_model(tmp_path / "deeper", num_hidden_layers=3)
    _edit_config(run_copy, lambda c: c["model"].update(model=str(other)))
    got = run_main(["train", "--resume", run_copy, "--steps", "3"], capsys)
    assert got[0] == 1 and len(got[1]) == 1 and got[1][0].startswith("error E524"), got


def test_an_adapter_folder_without_its_config_is_one_line(run_copy, capsys, scoreboard):
    (run_copy / "adapter_config.json").unlink()
    got = run_main(["generate", "--adapter", run_copy, "--prompt", "hi", "--max-tokens", "2"], capsys)
    record(scoreboard, one_line(*got, "E221"))
    assert one_line(*got, "E221"), got


# ---- starting fresh from a run's settings -------------------------------------------------------


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("given", ["config.json", "folder"])
def test_a_run_config_starts_a_new_run_with_the_same_settings(given, run_copy, tmp_path, capsys):
    """`mlxpt train --config RUN` (or RUN/config.json) is the explicit fresh start E522 names: a
    new folder with the run's settings and method, the old one byte-identical; the saved
    trust_remote_code is not taken (trust comes from the person)."""
    _edit_config(run_copy, lambda c: c["model"].update(trust_remote_code=True))
    before = _tree(run_copy)
    runs = tmp_path / "fresh-runs"
    src = run_copy / "config.json" if given == "config.json" else run_copy
    code, errors, err = run_main(["train", "--config", src, "--runs-dir", runs], capsys)
    assert _tree(run_copy) == before
    assert code == 0 and not errors, err
    (new,) = list(runs.iterdir())
    old, fresh = json.loads((run_copy / "config.json").read_text()), json.loads((new / "config.json").read_text())
    assert fresh["method"] == old["method"] and fresh["train"]["steps"] == old["train"]["steps"]
    assert fresh["adapter"] == old["adapter"] and fresh["model"]["trust_remote_code"] is False


def test_a_run_config_of_another_method_is_one_line(run_copy, capsys):
    code, errors, err = run_main(["train", "dpo", "--config", run_copy], capsys)
    assert code == 1 and len(errors) == 1 and errors[0].startswith("error E585"), err


# ---- environment ------------------------------------------------------------------------------


@pytest.mark.parametrize("home", ["relative", "missing", "fifo"])
def test_mlxpt_home_odd_values(home, tmp_path, capsys, monkeypatch, scoreboard):
    """MLXPT_HOME relative or not yet made: doctor works; a FIFO: one line (E229)."""
    monkeypatch.chdir(tmp_path)
    value = {"relative": "rel-home", "missing": str(tmp_path / "no/such/home"), "fifo": str(_special("fifo", tmp_path))}
    monkeypatch.setenv("MLXPT_HOME", value[home])
    code, errors, err = run_main(["doctor"], capsys)
    ok = code == 0 if home != "fifo" else any(e.startswith("error E229") for e in errors) and "Traceback" not in err
    record(scoreboard, ok)
    assert ok, (code, err)


def test_an_unwritable_mlxpt_home_is_one_line(tmp_path, capsys, monkeypatch, scoreboard):
    """The default model is converted into MLXPT_HOME; a home that cannot be written is E229."""
    monkeypatch.setenv("MLXPT_HOME", "/proc/self/mlxpt-home")
    got = run_main(["generate", "--model", "smollm2-135m", "--prompt", "hi", "--max-tokens", "1"], capsys)
    record(scoreboard, one_line(*got, "E229"))
    assert one_line(*got, "E229"), got


# ---- pipes, signals, two processes ----------------------------------------------------------------


def _cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlxpt.cli", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        **kw,
    )


@pytest.mark.parametrize("command", ["generate", "eval", "data check"])
def test_a_reader_that_goes_away_ends_quietly(command, world, tmp_path, scoreboard):
    """`... | head -c 1`: the command exits 0 with no traceback; eval still writes its results."""
    root, run = world
    argv = {
        "generate": ["generate", "--adapter", run, "--prompt", "count to ten", "--max-tokens", "40"],
        "eval": ["eval", "--model", root / "model", "--data", ROOT / "assets/sft/test.jsonl", "--limit", "2",
                 "--max-tokens", "4", "--out", tmp_path / "r.json"],
        "data check": ["data", "check", root / "data"],
    }[command]  # fmt: skip
    proc = _cli(*argv)
    proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    ok = proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err
    if command == "eval":
        ok = ok and (tmp_path / "r.json").is_file()
    record(scoreboard, ok)
    assert ok, (proc.returncode, err[-2000:])


def test_chat_with_no_input_ends_quietly(world, scoreboard):
    proc = _cli("chat", "--model", world[0] / "model", "--max-tokens", "2", stdin=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=120)
    record(scoreboard, proc.returncode == 0 and b"Traceback" not in err)
    assert proc.returncode == 0 and b"Traceback" not in err, err


def test_sigterm_during_eval_leaves_no_output(world, tmp_path, scoreboard):
    """A killed evaluation writes nothing at --out (no half file, no temp file beside it)."""
    out = tmp_path / "r.json"
    proc = _cli("eval", "--model", world[0] / "model", "--data", ROOT / "assets/sft/test.jsonl", "--limit", "40",
                "--max-tokens", "200", "--out", out)  # fmt: skip
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    ok = proc.returncode != 0 and not list(tmp_path.iterdir())
    record(scoreboard, ok)
    assert ok, (proc.returncode, list(tmp_path.iterdir()))


def test_two_fuses_to_one_out_leave_one_complete_model(world, tmp_path, scoreboard):
    """Two `mlxpt fuse RUN --out X` at once: whatever each exits with, X is one complete fused
    model that loads, and no temp folder is left."""
    from mlxpt.models.loader import load

    root, run = world
    out = tmp_path / "fused"
    procs = [_cli("fuse", run, "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(c for c, _ in results)
    load(str(out), quantize="none")  # raises if incomplete
    ok = codes[0] == 0 and all(b"Traceback" not in e for _, e in results)
    ok = ok and [p.name for p in tmp_path.iterdir()] == ["fused"]
    record(scoreboard, ok)
    assert ok, results


# ---- a run folder deleted under a running run ---------------------------------------------------


def test_a_run_folder_deleted_while_it_trains_is_one_line(world, tmp_path, scoreboard):
    """`rm -rf runs/<run>` (or a move) while the run trains: a one-line E305 that says nothing more
    can be saved, not a traceback reported as a bug in mlxpt (found when a session deleted the
    runs of processes it had just signalled)."""
    from mlxpt.config import SFTConfig, build_config
    from mlxpt.errors import MlxptError
    from mlxpt.train.sft import run_sft

    root, _ = world
    cfg = build_config("sft", {"model": str(root / "model"), "data": str(root / "data"), "runs_dir": str(tmp_path),
                               "steps": 4, "batch_size": 2, "eval_every": 0, "save_every": 1, "warmup_steps": 0,
                               "regression_data": "none"})  # fmt: skip
    assert isinstance(cfg, SFTConfig)

    def emit(e):
        if e["event"] == "step" and e["step"] == 2:
            shutil.rmtree(e.get("run_dir") or next(tmp_path.iterdir()))

    with pytest.raises(MlxptError) as got:
        run_sft(cfg, emit=emit)
    ok = got.value.code == "E305" and "removed or moved while the run was going" in got.value.line()
    record(scoreboard, ok)
    assert ok, got.value.line()
    assert not list(tmp_path.iterdir())  # nothing written back in its place


def test_a_temporary_folder_that_does_not_exist_is_one_line_and_writes_nothing(world, tmp_path, scoreboard):
    """TEMP (or TMPDIR, TMP, TEMPDIR) naming a missing folder: MLX's CPU backend compiles its kernels
    there and failed at the first computation with a C++ `temp_directory_path` error, reported as
    a bug (E001) after the run folder was made. Now: E306 naming the variable, before any output;
    `data check` (no model) still works."""
    root, run = world
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TEMP": str(tmp_path / "gone")}
    env.pop("TMPDIR", None), env.pop("TMP", None)
    runs = tmp_path / "runs"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlxpt.cli", *map(str, args)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    got = [
        cli("generate", "--adapter", run, "--prompt", "hi", "--max-tokens", "2"),
        cli("train", "--model", root / "model", "--data", root / "data", "--runs-dir", runs, *TRAIN),
    ]
    ok = all(
        g.returncode == 1 and g.stderr.startswith("error E306") and g.stderr.count("\n") == 1 and "TEMP=" in g.stderr
        for g in got
    )
    ok = ok and not runs.exists() and cli("data", "check", root / "data").returncode == 0
    record(scoreboard, ok)
    assert ok, [(g.returncode, g.stderr[-500:]) for g in got]


def test_the_temp_folder_error_from_mlx_is_translated_wherever_it_comes_from(monkeypatch):
    from mlxpt.cli import temp_dir_error

    monkeypatch.setenv("TMPDIR", "/nonexistent/mlxpt")
    e = temp_dir_error(RuntimeError("filesystem error: temp_directory_path: No such file or directory"))
    assert e.code == "E306" and "TMPDIR='/nonexistent/mlxpt'" in e.line()
    assert temp_dir_error(RuntimeError("something else")) is None
    monkeypatch.setenv("TMPDIR", "")  # set but empty: the C++ library takes it and fails, so the preflight refuses it
    assert sys.platform == "darwin" or "TMPDIR=''" in temp_dir_error().line()
    monkeypatch.setenv("TMPDIR", "/")
    assert temp_dir_error() is None
