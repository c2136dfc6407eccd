"""Run directories, atomic writes and checkpoints: round trips, corruption, rotation, disk full,
and SIGKILL at random and named points (RELIABILITY.md contract 2)."""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlxpt.errors import MlxptError, NumericsError, ResourceError
from mlxpt.runs import atomic, store
from mlxpt.runs.atomic import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    save_safetensors_atomic,
    sha256_file,
)
from mlxpt.runs.folder import clean_temp, new_run_dir, read_config, read_status, write_config, write_status
from mlxpt.runs.store import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def make_arrays(step: int, n: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Deterministic per step, so a loaded checkpoint can be checked against what was saved."""
    rng = np.random.default_rng(step)
    return {
        "adapters": {
            "model.layers.0.self_attn.q_proj.lora_a": rng.standard_normal((n, 8)).astype(np.float32),
            "model.layers.0.self_attn.q_proj.lora_b": rng.standard_normal((8, n)).astype(np.float16),
        },
        "optimizer": {
            "state.m.layers.0": rng.standard_normal((n, 8)).astype(np.float32),
            "step": np.array(step, dtype=np.uint32),
            "counts": np.arange(5, dtype=np.int64) * step,
        },
    }


def assert_arrays_equal(got, want) -> None:
    assert got.keys() == want.keys()
    for group in want:
        assert got[group].keys() == want[group].keys()
        for key, arr in want[group].items():
            assert got[group][key].dtype == arr.dtype, key
            assert got[group][key].shape == arr.shape, key
            np.testing.assert_array_equal(got[group][key], arr)


def tmp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".tmp-*")]


def steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run)]


# ---- atomic writes -------------------------------------------------------------------------


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"one")
    atomic_write_bytes(tmp_path / "a.bin", b"two")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": np.float32(0.5), "n": np.int64(3), "inf": 1e999})
    assert (tmp_path / "a.bin").read_bytes() == b"two"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {
        "x": 0.5,
        "n": 3,
        "inf": float("inf"),
    }
    assert tmp_leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_in", ["replace", "fsync", "write"])
def test_disk_full_keeps_previous_file_and_removes_temp(tmp_path, monkeypatch, fail_in):
    target = tmp_path / "adapters.safetensors"
    atomic_write_bytes(target, b"previous")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail_in, disk_full)
    with pytest.raises(ResourceError) as info:
        atomic_write_bytes(target, b"new content that will not fit")
    monkeypatch.undo()

    err = info.value
    assert err.exit_code == 3 and err.code == "E301"
    assert str(target) in str(err) and "(a run's previous checkpoint) is intact" in str(err)
    assert target.read_bytes() == b"previous"
    assert tmp_leftovers(tmp_path) == []


def test_other_os_errors_propagate_unchanged(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        atomic_write_bytes(tmp_path / "x", b"data")
    monkeypatch.undo()
    assert tmp_leftovers(tmp_path) == []


def test_safetensors_atomic_keeps_dtypes_and_refuses_nonfinite(tmp_path):
    from safetensors.numpy import load_file

    tensors = make_arrays(1)["adapters"] | make_arrays(1)["optimizer"]
    path = tmp_path / "adapters.safetensors"
    save_safetensors_atomic(path, tensors, metadata={"rank": "8"})
    loaded = load_file(str(path))
    for key, arr in tensors.items():
        assert loaded[key].dtype == arr.dtype
        np.testing.assert_array_equal(loaded[key], arr)
    assert len(sha256_file(path)) == 64

    before = path.read_bytes()
    bad = dict(tensors, nan=np.array([1.0, np.nan], np.float32))
    with pytest.raises(NumericsError) as info:
        save_safetensors_atomic(path, bad)
    assert info.value.exit_code == 4 and info.value.code == "E401"
    assert path.read_bytes() == before


def test_append_jsonl_survives_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 2.5})
    with open(path, "ab") as f:  # what SIGKILL mid-append leaves behind
        f.write(b'{"step": 2, "lo')
    append_jsonl(path, {"step": 3, "loss": np.float32(1.5)}, fsync=True)
    assert read_jsonl(path) == [{"step": 1, "loss": 2.5}, {"step": 3, "loss": 1.5}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_append_jsonl_disk_full_truncates_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    real_write = os.write

    def short_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(ResourceError):
        append_jsonl(path, {"step": 2, "loss": 1.0})
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


# ---- run directory -------------------------------------------------------------------------


def test_new_run_dir_config_and_status(tmp_path):
    a = new_run_dir(tmp_path / "runs", "lora.r8")
    b = new_run_dir(tmp_path / "runs", "lora.r8")
    c = new_run_dir(tmp_path / "runs")
    assert a.is_dir() and b.is_dir() and a != b
    assert a.name.endswith("-lora.r8") and c.name.endswith("-sft")
    assert len(a.name.split("-")[0]) == 8 and len(a.name.split("-")[1]) == 6

    for bad in ("../escape", "a/b", ".hidden", "", "x" * 65):
        if bad:
            with pytest.raises(MlxptError):
                new_run_dir(tmp_path / "runs", bad)
    assert not (tmp_path / "escape").exists()

    cfg = {"model": "tiny", "lr": 1e-4, "layers": [0, 1], "nested": {"rank": 8}}
    write_config(a, cfg)
    assert read_config(a) == cfg
    with pytest.raises(MlxptError) as info:
        read_config(c)
    assert info.value.code == "E304"

    write_status(a, "running", step=5)
    status = read_status(a)
    assert status["status"] == "running" and status["step"] == 5 and status["pid"] == os.getpid()
    with pytest.raises(ValueError):
        write_status(a, "exploded")
    assert read_status(c) is None
    assert tmp_leftovers(tmp_path) == []


# ---- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_dtypes_dotted_keys_and_state(tmp_path):
    rng = np.random.default_rng(7)
    rng.standard_normal(3)
    state = {
        "step": 12,
        "epoch": 1,
        "batch_index": 4,
        "rng": rng.bit_generator.state,  # PCG64: 128-bit ints
        "schedule": {"lr": 3.0000000000000004e-05},
        "best_loss": float("inf"),
        "skipped": np.int64(2),
        "order": np.arange(6),
    }
    ck = save_checkpoint(tmp_path, 12, make_arrays(12), state)
    assert ck == tmp_path / "checkpoints" / "step-00000012"
    assert verify_checkpoint(ck)
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["version"] == 1
    assert set(manifest["files"]) == {
        "adapters.safetensors",
        "optimizer.safetensors",
        "state.json",
    }

    arrays, loaded = load_checkpoint(ck)
    assert_arrays_equal(arrays, make_arrays(12))
    assert loaded["schedule"]["lr"] == 3.0000000000000004e-05
    assert loaded["best_loss"] == float("inf") and loaded["skipped"] == 2
    assert loaded["order"] == list(range(6))
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["rng"]
    np.testing.assert_array_equal(restored.standard_normal(4), rng.standard_normal(4))
    assert tmp_leftovers(tmp_path) == []


def test_flipped_byte_is_detected_and_latest_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, make_arrays(1), {"step": 1})
    ck2 = save_checkpoint(tmp_path, 2, make_arrays(2), {"step": 2})
    target = ck2 / "adapters.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    assert not verify_checkpoint(ck2)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000001"
    with pytest.raises(MlxptError) as info:
        load_checkpoint(ck2)
    assert info.value.code == "E302" and str(ck2) in str(info.value)
    assert "sha256" in str(info.value) and info.value.hint

    (ck2 / "state.json").unlink()  # a missing file is caught too
    assert not verify_checkpoint(ck2)


def test_garbage_in_checkpoints_dir_never_raises(tmp_path):
    good = save_checkpoint(tmp_path, 3, make_arrays(3), {"step": 3})
    ckdir = tmp_path / "checkpoints"
    (ckdir / "step-00000009").mkdir()  # no manifest: not listed
    (ckdir / "step-00000008").mkdir()
    (ckdir / "step-00000008" / "manifest.json").write_text("{not json")
    (ckdir / "step-00000007").mkdir()
    (ckdir / "step-00000007" / "manifest.json").write_text(
        json.dumps(
            {
                "format": "mlxpt-checkpoint",
                "version": 1,
                "step": 7,
                "files": {"../../etc/passwd": {"sha256": "0" * 64, "size": 1}},
            }
        )
    )
    (ckdir / "step-00000006").write_text("a file, not a dir")
    (ckdir / "step-00000005").symlink_to(good)  # symlinks are not followed
    (ckdir / "notes.txt").write_text("hello")

    assert steps(tmp_path) == [3, 7, 8]
    assert latest_checkpoint(tmp_path) == good
    for bad in (ckdir / "step-00000007", ckdir / "step-00000008", tmp_path / "nowhere"):
        assert not verify_checkpoint(bad)
        with pytest.raises(MlxptError):
            load_checkpoint(bad)
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert list_checkpoints(tmp_path / "nowhere") == []


def test_leftover_temp_dir_is_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, make_arrays(1), {"step": 1})
    torn = tmp_path / "checkpoints" / ".tmp-step-00000002-abcd1234"
    torn.mkdir()
    (torn / "adapters.safetensors").write_bytes(b"half a file")
    (torn / "manifest.json").write_text("{}")
    (tmp_path / ".tmp-config.json-1234").write_text("{")

    assert steps(tmp_path) == [1]
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    removed = clean_temp(tmp_path)
    assert len(removed) == 2 and tmp_leftovers(tmp_path) == []
    assert verify_checkpoint(latest_checkpoint(tmp_path))


def test_rotation_keeps_newest_and_counts_only_verified(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, make_arrays(step), {"step": step * 10}, keep=2)
    assert steps(tmp_path) == [40, 50]

    # A broken checkpoint does not count towards `keep`: step 40 (good) survives alongside it.
    (tmp_path / "checkpoints" / "step-00000050" / "state.json").write_text("{}")
    save_checkpoint(tmp_path, 60, make_arrays(6), {"step": 60}, keep=2)
    assert steps(tmp_path) == [40, 50, 60]
    save_checkpoint(tmp_path, 70, make_arrays(7), {"step": 70}, keep=2)
    assert steps(tmp_path) == [60, 70]
    assert tmp_leftovers(tmp_path) == []


def test_resaving_a_step_replaces_it_and_older_step_is_never_rotated_away(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, make_arrays(step), {"step": step}, keep=2)
    # Rerun after falling back: step 2 again, with new content.
    save_checkpoint(tmp_path, 2, make_arrays(22), {"step": 2, "rerun": True}, keep=2)
    assert steps(tmp_path) == [2, 3]
    arrays, state = load_checkpoint(tmp_path / "checkpoints" / "step-00000002")
    assert state["rerun"] is True
    assert_arrays_equal(arrays, make_arrays(22))
    # Saving an older step than the newest keeps the one just written.
    save_checkpoint(tmp_path, 1, make_arrays(1), {"step": 1}, keep=1)
    assert 1 in steps(tmp_path)
    assert tmp_leftovers(tmp_path) == []


def test_nonfinite_checkpoint_is_refused_and_nothing_written(tmp_path):
    ck1 = save_checkpoint(tmp_path, 1, make_arrays(1), {"step": 1})
    before = {p.name: p.read_bytes() for p in ck1.iterdir()}
    for bad_value in (np.nan, np.inf, -np.inf):
        arrays = make_arrays(2)
        arrays["optimizer"]["state.m.layers.0"][3, 1] = bad_value
        with pytest.raises(NumericsError) as info:
            save_checkpoint(tmp_path, 2, arrays, {"step": 2})
        assert info.value.exit_code == 4 and "state.m.layers.0" in str(info.value)
    arrays = make_arrays(2)
    arrays["adapters"]["model.layers.0.self_attn.q_proj.lora_b"][0, 0] = np.float16(np.inf)
    with pytest.raises(NumericsError):
        save_checkpoint(tmp_path, 2, arrays, {"step": 2})

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert {p.name: p.read_bytes() for p in ck1.iterdir()} == before


def test_disk_full_mid_checkpoint_keeps_previous_and_leaves_nothing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, make_arrays(1), {"step": 1})
    calls = []
    real = atomic.write_fsync

    def fill_disk(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(store, "write_fsync", fill_disk)
    with pytest.raises(ResourceError) as info:
        save_checkpoint(tmp_path, 2, make_arrays(2), {"step": 2})
    monkeypatch.undo()
    assert info.value.exit_code == 3 and "step-00000002" in str(info.value)
    assert steps(tmp_path) == [1] and tmp_leftovers(tmp_path) == []
    assert_arrays_equal(load_checkpoint(latest_checkpoint(tmp_path))[0], make_arrays(1))


def test_runs_layer_imports_neither_mlx_nor_textual():
    code = "import sys, mlxpt.runs; print(sorted(m for m in ('mlx', 'textual') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


# ---- SIGKILL at random and named points ----------------------------------------------------

CHILD_BODY = textwrap.dedent(
    """
    import os, signal, shutil, sys
    from mlxpt.runs import folder, store

    run, keep, point = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    saves = 0
    if point == "mid-file":  # half of the optimizer file is on disk
        real_write = store.write_fsync
        def write(path, data):
            if saves == 3 and path.name == "optimizer.safetensors":
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            return real_write(path, data)
        store.write_fsync = write
    elif point == "before-manifest":
        real_write = store.write_fsync
        def write(path, data):
            if saves == 3 and path.name == "manifest.json":
                die()
            return real_write(path, data)
        store.write_fsync = write
    elif point == "before-rename":
        real_publish = store._publish
        def publish(tmp, final):
            if saves == 3:
                die()
            return real_publish(tmp, final)
        store._publish = publish
    elif point == "after-rename":
        real_fsync_dir = store.fsync_dir
        def fsync_dir(path):
            if saves == 3 and str(path).endswith("checkpoints"):
                die()
            return real_fsync_dir(path)
        store.fsync_dir = fsync_dir
    elif point == "mid-rotation":
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            if ".tmp-deleted-" in str(path):
                die()
            return real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree

    sys.stdin.readline()  # imported; wait until the previous writer is dead
    os.makedirs(run, exist_ok=True)  # as the runner makes it: a checkpoint never makes its run folder
    folder.clean_temp(run)
    ck = store.latest_checkpoint(run)
    step = store.load_checkpoint(ck)[1]["step"] if ck else 0
    print("ready", step, flush=True)
    while True:
        step += 1
        store.save_checkpoint(run, step, make_arrays(step, 4096), {"step": step}, keep=keep)
        saves += 1
        print("saved", step, flush=True)
    """
)


def write_child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text("import numpy as np\n\n" + inspect.getsource(make_arrays) + CHILD_BODY)
    return script


def spawn_child(script: Path, run: Path, keep: int, point: str) -> subprocess.Popen:
    """Start a checkpointing child; it imports, then waits for `drive_child` to let it go, so
    the next child's start-up overlaps the current one's run."""
    return subprocess.Popen(
        [sys.executable, str(script), str(run), str(keep), point],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"},
    )


def drive_child(proc: subprocess.Popen, delay: float | None) -> tuple[int, list[int]]:
    """Let the child resume and save; SIGKILL it after `delay` (None: it kills itself at its
    named point). Returns (step it resumed from, steps it reported saved)."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    ready = proc.stdout.readline().split()
    if ready[:1] != ["ready"]:
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    if delay is not None:
        time.sleep(delay)
        proc.kill()
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == -9, err
    # the kill can cut the last report short ("saved" without its step): only whole lines count
    return int(ready[1]), [int(f[1]) for f in map(str.split, out.splitlines()) if len(f) == 2 and f[1].isdigit()]


def check_after_kill(run: Path, known: set[int], keep: int, newest_saved: int | None) -> int:
    """Invariants after a kill; returns the step a resume would start from."""
    listed = list_checkpoints(run)
    assert all(verify_checkpoint(ck) for ck in listed), "a torn checkpoint became visible"
    present = set(steps(run))
    for step in known - present:  # only rotation may remove a checkpoint, never a kill
        newer = [s for s in present if s > step]
        assert len(newer) >= keep, f"step {step} lost; present {sorted(present)}"
    ck = latest_checkpoint(run)
    if not known:
        return 0 if ck is None else int(ck.name.split("-")[1])
    assert ck is not None
    arrays, state = load_checkpoint(ck)
    assert_arrays_equal(arrays, make_arrays(state["step"], 4096))
    if newest_saved is not None:
        assert state["step"] >= newest_saved
    return state["step"]


def test_random_sigkills_never_lose_a_completed_checkpoint(tmp_path):
    script, run, keep = write_child(tmp_path), tmp_path / "run", 3
    rng = random.Random(1234)
    kills, known = 20, set()
    upcoming = spawn_child(script, run, keep, "none")
    for i in range(kills):
        proc = upcoming
        upcoming = spawn_child(script, run, keep, "none") if i + 1 < kills else None
        expected = max(steps(run), default=0)
        resumed_from, saved = drive_child(proc, rng.uniform(0.0, 0.2))
        assert resumed_from == expected  # resume picks up the newest complete checkpoint
        known |= set(saved)
        check_after_kill(run, known, keep, max(saved) if saved else None)
    assert max(known) > kills  # the kills landed across many saves, not just the first
    clean_temp(run)
    assert tmp_leftovers(run) == []


@pytest.mark.parametrize(
    "point",
    ["mid-file", "before-manifest", "before-rename", "after-rename", "mid-rotation"],
)
def test_sigkill_at_named_points(tmp_path, point):
    script, run, keep = write_child(tmp_path), tmp_path / "run", 2
    first = spawn_child(script, run, keep, point)
    second = spawn_child(script, run, keep, "none")
    _, saved = drive_child(first, delay=None)
    # The child dies while saving step 4 (or, mid-rotation, while step 3 deletes step 1).
    assert saved == ([1, 2] if point == "mid-rotation" else [1, 2, 3])
    resume = check_after_kill(run, set(saved), keep, max(saved))
    assert resume == (4 if point == "after-rename" else 3)
    assert bool(tmp_leftovers(run)) == (point != "after-rename")
    # The next run cleans up and continues from there.
    resumed_from, saved2 = drive_child(second, delay=0.1)
    assert resumed_from == resume
    check_after_kill(run, set(saved) | set(saved2), keep, max(saved2, default=None))
