"""The automatic OpenBLAS swap for the Linux mlx[cpu] wheel: on by default, off on request, correct."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "from mlxpt import _blas\n"
    "status = _blas.activate()\n"
    "import numpy as np, mlx.core as mx\n"
    "rng = np.random.default_rng(0)\n"
    "a = rng.standard_normal((300, 200), dtype=np.float32); b = rng.standard_normal((200, 100), dtype=np.float32)\n"
    "err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b).max())\n"
    "print(status); print(err)\n"
)


def probe(env: dict) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    status, err = out.stdout.strip().splitlines()
    return status, float(err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the swap only happens on Linux")
def test_openblas_is_active_by_default_and_correct(tmp_path):
    status, err = probe({"MLXPT_HOME": str(tmp_path)})
    assert status.startswith("OpenBLAS") and "/" not in status, status  # its source, not its path
    assert err < 1e-3


def test_opt_out_keeps_the_reference_blas(tmp_path):
    status, err = probe({"MLXPT_BLAS": "off", "MLXPT_HOME": str(tmp_path)})
    assert "reference" in status or "Accelerate" in status
    assert err < 1e-3


def test_too_late_is_reported_not_hidden(tmp_path):
    code = "import mlx.core\nfrom mlxpt import _blas\nprint(_blas.activate())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    if sys.platform.startswith("linux"):
        assert "imported before" in out.stdout


def test_version_names_the_blas():
    out = subprocess.run([sys.executable, "-m", "mlxpt.cli", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "BLAS:" in out.stdout


FAKE_BLAS = {
    # an illegal instruction on the first call, as a kernel built for a newer CPU does
    "trap": "void cblas_sgemm(void) { __builtin_trap(); }",
    # runs, but leaves C untouched: wrong results
    "wrong": "void cblas_sgemm(void) { }",
}


@pytest.mark.parametrize("kind", sorted(FAKE_BLAS))
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the swap only happens on Linux")
def test_a_blas_that_crashes_or_is_wrong_is_refused_not_loaded(kind, tmp_path, monkeypatch):
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / f"{kind}.c"
    src.write_text(FAKE_BLAS[kind] + "\n")
    lib = tmp_path / f"lib{kind}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    monkeypatch.setenv("MLXPT_HOME", str(tmp_path / "home"))
    from mlxpt import _blas

    ok, found = _blas.probe(str(lib))
    assert not ok
    assert ("signal" in found) if kind == "trap" else ("wrong" in found)
    assert _blas.probe(str(lib)) == (ok, found)  # cached verdict, same answer
    assert list((tmp_path / "home" / "blas").glob("probe-*.json"))


HEAP = (
    "import resource\n"
    "from mlxpt import _blas\n"
    "print(_blas.activate() and _blas.keep_heap())\n"
    "import mlx.core as mx\n"
    "def faults():\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "mx.eval((mx.ones((4096, 4096)) * 2).sum())  # a 64 MB array: glibc would mmap it\n"
    "before = faults()\n"
    "for _ in range(5):\n"
    "    mx.eval((mx.ones((4096, 4096)) * 2).sum())\n"
    "print(faults() - before)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_big_blocks_come_from_a_kept_heap_unless_opted_out():
    """keep_heap: the same 64 MB arrays again and again fault no fresh pages in (without it each
    is a new mmap the kernel zeroes: ~16,000 page faults an array); MLXPT_MALLOC=off keeps glibc's default."""

    def run(env):
        out = subprocess.run([sys.executable, "-c", HEAP], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, **env}, check=True)  # fmt: skip
        status, faults = out.stdout.strip().splitlines()
        return status, int(faults)

    status, kept = run({})
    assert status == "kept (no mmap per block)"
    off_status, fresh = run({"MLXPT_MALLOC": "off"})
    assert off_status == "glibc defaults (MLXPT_MALLOC=off)"
    assert kept < 2_000 and fresh > 20_000, (kept, fresh)
