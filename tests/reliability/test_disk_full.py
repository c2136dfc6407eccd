"""Disk full: ENOSPC injected at every write point of a resumed training step (each distinct
create/write/fsync/rename/replace/mkdir on the run's files, found by counting a clean run), and a
real `ulimit -f` run. Each time: exit 3 with one `error E301` line, the previous checkpoint intact
(same bytes, verifies), no temp files left, and a plain resume afterwards finishes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlxpt.runs import latest_checkpoint, list_checkpoints, sha256_file, verify_checkpoint
from reliability.harness import ROOT, error_lines, resume_args, temp_files, train_args

pytestmark = pytest.mark.reliability

# Not write points: a directory fsync is best effort by design (some filesystems refuse it), and the
# renames that hide an old checkpoint before deleting it free space (rotation ignores their errors).
SKIP = ("fsyncdir:", "rename:checkpoints/.tmp-deleted")


@pytest.fixture(scope="module")
def base_run(zygote, tiny_model, small_data, tmp_path_factory) -> Path:
    """A finished 1-step run with one checkpoint; each case resumes a copy of it to step 2."""
    child = zygote.run(train_args(tiny_model, small_data, tmp_path_factory.mktemp("base"), 1, name="disk"))
    assert child.code == 0, child.stderr()
    return Path(child.start()["run_dir"])


def fresh_copy(base: Path, dest: Path) -> Path:
    run = dest / base.name
    shutil.copytree(base, run)
    return run


def fingerprint(ck: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(ck.iterdir())}


def write_points(zygote, base_run: Path, tmp_path: Path) -> list[str]:
    run = fresh_copy(base_run, tmp_path / "count")
    counts = tmp_path / "counts.json"
    child = zygote.run(
        resume_args(run, steps=2), faults={"action": "count", "root": str(run), "count_file": str(counts)}
    )
    assert child.code == 0, child.stderr()
    order = json.loads(counts.read_text())["order"]
    return [s for s in dict.fromkeys(order) if not s.startswith(SKIP) and not s.startswith("rmtree:")]


def test_enospc_at_every_write_point(zygote, base_run, tmp_path, scoreboard):
    points = write_points(zygote, base_run, tmp_path)
    assert len(points) >= 15, points  # config, status, metrics, 4 checkpoint files, manifest, adapters...
    failures = []
    tally = {"points": 0, "exit3": 0, "intact": 0, "one_line": 0, "resumed": 0, "temp_left": 0}
    for i, sig in enumerate(points):
        run = fresh_copy(base_run, tmp_path / f"p{i}")
        ck = latest_checkpoint(run)
        before = fingerprint(ck)
        op = sig.split(":", 1)[0]
        child = zygote.run(
            resume_args(run, steps=2), faults={"action": "enospc", "op": op, "match": sig, "root": str(run)}
        )
        errors = error_lines(child.stderr())
        ok = {
            "exit3": child.code == 3,
            "one_line": len(errors) == 1
            and errors[0].startswith("error E301: disk full")
            and "Traceback" not in child.stderr(),
            "intact": verify_checkpoint(ck) and fingerprint(ck) == before,
        }
        left = temp_files(run)
        after = zygote.run(resume_args(run, steps=2))
        ok["resumed"] = after.code == 0 and latest_checkpoint(run).name == "step-00000002"
        tally["points"] += 1
        tally["temp_left"] += bool(left)
        for k, v in ok.items():
            tally[k] += v
        if not all(ok.values()) or left:
            failures.append((sig, ok, left, child.code, child.stderr()[-600:]))
    scoreboard.record("disk_full", **tally)
    assert not failures, failures


def test_real_ulimit_f(zygote, base_run, tmp_path, scoreboard):
    """A real file-size limit (smaller than one adapter file): Python ignores SIGXFSZ, so the write
    fails with EFBIG, which must read like a full disk: exit 3, one line, nothing lost."""
    import subprocess
    import sys

    run = fresh_copy(base_run, tmp_path)
    ck = latest_checkpoint(run)
    before = fingerprint(ck)
    cmd = f"ulimit -f 16; exec {sys.executable} -m mlxpt.cli train --resume {run} --steps 2 --events json"
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = error_lines(proc.stderr)
    ok = {
        "exit3": proc.returncode == 3,
        "one_line": len(errors) == 1 and "ulimit -f" in errors[0] and "Traceback" not in proc.stderr,
        "intact": verify_checkpoint(ck) and fingerprint(ck) == before and list_checkpoints(run) == [ck],
    }
    after = zygote.run(resume_args(run, steps=2))
    ok["resumed"] = after.code == 0 and latest_checkpoint(run).name == "step-00000002"
    scoreboard.record("disk_full", points=1, temp_left=0, **{k: int(v) for k, v in ok.items()})
    assert all(ok.values()), (ok, proc.returncode, proc.stderr[-1500:])
