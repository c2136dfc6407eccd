"""No output is, contains or lies inside an input (issue 26, contract 1): every input of
`mlxpt fuse` given as its --out, with --force, is refused before anything is read, and hashing
the inputs before and after shows nothing changed."""

from __future__ import annotations

import pytest
from test_decode import make_adapter_run
from tiny import make_model

from mlxpt.cli import main

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("outputs") / "base")


def _tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["run", "runs root", "inside the run", "base model", "symlink to the run"])
def test_fuse_never_writes_over_its_inputs(base, tmp_path, capsys, target, scoreboard):
    """Every input (the run, the folder of runs, the base model; through a symlink too) given as
    --out, with --force, is refused before anything is read, and nothing under it changes."""
    runs = tmp_path / "runs"
    run = make_adapter_run(runs / "run", base)
    (run / "status.json").write_text('{"status": "finished"}')
    out = {
        "run": run,
        "runs root": runs,
        "inside the run": run / "fused",
        "base model": base,
        "symlink to the run": tmp_path / "link",
    }[target]
    if target == "symlink to the run":
        out.symlink_to(run, target_is_directory=True)
    before = {"runs": _tree(runs), "base": _tree(base)}
    code = main(["fuse", str(run), "--out", str(out), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    intact = {"runs": _tree(runs), "base": _tree(base)} == before
    scoreboard.record("outputs", tried=1, refused=int(code == 1 and "E617" in err[0]), intact=int(intact))
    assert code == 1 and len(err) == 1 and "E617" in err[0], err
    assert intact
