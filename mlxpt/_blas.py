"""Swap the reference BLAS of the Linux `mlx[cpu]` wheel for OpenBLAS, before mlx is imported.

The wheel's libmlx links a bundled reference BLAS (~6 GFLOP/s on a 1024^2 matmul here).
Loading an OpenBLAS with RTLD_GLOBAL before `import mlx` makes libmlx bind `cblas_sgemm` to it
(10-30x faster). Sources, in order: a system libopenblas, then the `cmeel-openblas` wheel (its
libgfortran dependency is satisfied by a copy of the one bundled in the mlx wheel, renamed).
Opt out with MLXPT_BLAS=off (or choose MLXPT_BLAS=system|wheel). No-op on macOS (Accelerate).

The same call keeps glibc's malloc from handing big blocks back to the kernel (`keep_heap`): MLX's
CPU allocator mallocs and frees every array, glibc serves blocks over 32 MB with fresh mmaps, and
the kernel zeroes those pages on first touch each time (about 1 GB a default-model SFT step,
~250,000 page faults). Served from a heap that is kept, a step ran 1.2-1.3x faster
(docs/performance.md). Opt out with MLXPT_MALLOC=off. The cost: the process keeps its peak heap
until it exits.

Safety: a library is used only after a child process has run `cblas_sgemm` from it on small and
large shapes (all four transposes, beta 0 and 1) and matched NumPy. Builds exist whose kernels
use instructions this CPU lacks (cmeel-openblas 0.3.31's `sgemm_small_kernel_b0_nn` issues
AVX-512 on AVX2-only CPUs: SIGILL on the first small matmul); those are skipped, not crashed on.
The verdict is cached per library file and CPU.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

_status: str | None = None
_SYSTEM_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]


def _site_dirs(pkg: str) -> list[Path]:
    """Folders holding `pkg` (a namespace package such as mlx may have several)."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p).parent for p in spec.submodule_search_locations]


def _mlx_cpu_libs() -> Path | None:
    for site in _site_dirs("mlx"):
        if (site / "mlx_cpu.libs").is_dir():
            return site / "mlx_cpu.libs"
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("MLXPT_HOME") or Path.home() / ".cache" / "mlxpt") / "blas"  # empty: unset


def _gfortran_for_wheel(libs: Path) -> Path | None:
    """A copy of mlx's bundled libgfortran whose SONAME reads `libgfortran.so.5`."""
    found = sorted(glob.glob(str(libs / "libgfortran-*.so*")))
    if not found:
        return None
    src = Path(found[0])
    out = _cache_dir() / f"{src.name}.libgfortran.so.5"
    if not out.exists():
        data = bytearray(src.read_bytes())
        old = src.name.encode() + b"\0"
        i = data.find(old)
        if i < 0 or data.count(old) != 1:
            return None
        new = b"libgfortran.so.5"
        data[i : i + len(old)] = new + b"\0" * (len(old) - len(new))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, out)
    for q in sorted(glob.glob(str(libs / "libquadmath-*.so*"))):
        ctypes.CDLL(q, mode=ctypes.RTLD_GLOBAL)
    return out


# Run in a child: load `preload` then `lib` (argv), check cblas_sgemm against NumPy on shapes that
# reach both the small-matrix and the blocked kernels. Exit 0 only if every result matches.
_PROBE = r"""
import ctypes, sys
import numpy as np
for p in sys.argv[2:]:
    ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
f = lib.cblas_sgemm
P = ctypes.POINTER(ctypes.c_float)
I, F = ctypes.c_int, ctypes.c_float
f.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
rng = np.random.default_rng(0)
for m, n, k in ((2, 3, 4), (8, 8, 8), (17, 5, 33), (64, 48, 80), (300, 200, 100)):
    for ta in (False, True):
        for tb in (False, True):
            for beta in (0.0, 1.0):
                a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
                b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
                c = rng.standard_normal((m, n), dtype=np.float32)
                want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b) + beta * c
                ptr = lambda x: x.ctypes.data_as(P)
                f(101, 112 if ta else 111, 112 if tb else 111, m, n, k, 1.0, ptr(a), a.shape[1],
                  ptr(b), b.shape[1], beta, ptr(c), n)
                if not np.allclose(c, want, rtol=1e-3, atol=1e-3 * k):
                    sys.exit(3)
"""


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags.strip()}"


def probe(lib: str, preload: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether `lib`'s cblas_sgemm runs correctly on this CPU, tried in a child process (cached per
    file and CPU). (ok, what the check found)."""
    try:
        st = os.stat(lib)
    except OSError as e:
        return False, str(e)
    key = json.dumps([os.path.realpath(lib), st.st_size, st.st_mtime_ns, list(preload), _cpu_id()])
    cache = _cache_dir() / f"probe-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    try:
        saved = json.loads(cache.read_text())
        return bool(saved["ok"]), str(saved["found"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, lib, *preload], capture_output=True, timeout=120,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        )  # fmt: skip
        code = out.returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"probe failed: {e}"
    ok = code == 0
    if ok:
        found = "sgemm checked"
    elif code < 0:
        found = f"sgemm killed by signal {-code} (a kernel this CPU cannot run)"
    elif code == 3:
        found = "sgemm gave wrong results"
    else:
        found = f"probe exited {code}"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")
        tmp.write_text(json.dumps({"ok": ok, "found": found, "lib": lib}))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs the probe again
    return ok, found


def _version(handle: ctypes.CDLL) -> str:
    """`OpenBLAS 0.3.29` from the loaded library's own build string (`OpenBLAS` if it has none)."""
    try:
        fn = handle.openblas_get_config
        fn.restype = ctypes.c_char_p
        words = (fn() or b"").decode("ascii", "replace").split()
    except (AttributeError, OSError):
        words = []
    return " ".join(words[:2]) if len(words) >= 2 and words[0] == "OpenBLAS" else "OpenBLAS"


def _try_system(refused: list[str]) -> str | None:
    for cand in _SYSTEM_CANDIDATES:
        if os.path.exists(cand):
            ok, found = probe(cand)
            if not ok:
                refused.append(f"system OpenBLAS: {found}")
                continue
            try:
                return f"{_version(ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL))} (system)"
            except OSError:
                continue
    return None


def _try_wheel(libs: Path, refused: list[str]) -> str | None:
    roots = [str(p) for p in _site_dirs("cmeel")]
    roots += [p for p in sys.path if p and os.path.isdir(os.path.join(p, "cmeel.prefix"))]
    for root in dict.fromkeys(roots):
        lib = Path(root) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if not lib.exists():
            continue
        try:
            gf = _gfortran_for_wheel(libs)
            quad = tuple(sorted(glob.glob(str(libs / "libquadmath-*.so*"))))
            ok, found = probe(str(lib), (*quad, str(gf)) if gf is not None else quad)
            if not ok:
                refused.append(f"cmeel-openblas: {found}")
                continue
            if gf is not None:
                ctypes.CDLL(str(gf), mode=ctypes.RTLD_GLOBAL)
            return f"{_version(ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL))} (cmeel-openblas)"
        except OSError:
            continue
    return None


_heap: str | None = None


def keep_heap() -> str:
    """On Linux glibc, mallopt(M_MMAP_MAX, 0) and a trim threshold of 2 GiB (the most mallopt
    takes): every block from the heap, freed memory kept for the next step (see the module
    docstring). Returns what it did."""
    global _heap
    if _heap is not None:
        return _heap
    if os.environ.get("MLXPT_MALLOC", "").lower() in ("off", "0", "none"):
        _heap = "glibc defaults (MLXPT_MALLOC=off)"
    elif not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _heap = "platform default"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)) == 1
            _heap = "kept (no mmap per block)" if ok else "glibc defaults (mallopt refused)"
        except (OSError, AttributeError):
            _heap = "glibc defaults (no libc.so.6)"
    return _heap


def activate() -> str:
    """Load the fastest safe BLAS before mlx is imported; return a one-line status that names the
    library by its source (`OpenBLAS 0.3.29 (cmeel-openblas)`), not its path."""
    global _status
    if _status is not None:
        return _status
    keep_heap()
    choice = os.environ.get("MLXPT_BLAS", "auto").lower()
    if not sys.platform.startswith("linux"):
        _status = "platform default (Accelerate on macOS)"
    elif choice in ("off", "0", "none", "reference"):
        _status = "reference (MLXPT_BLAS=off)"
    elif (libs := _mlx_cpu_libs()) is None:
        _status = "mlx default (not the mlx[cpu] wheel)"
    elif "mlx.core" in sys.modules:
        _status = "reference (mlx was imported before mlxpt could load OpenBLAS)"
    else:
        got, refused = None, []
        if choice in ("auto", "system"):
            got = _try_system(refused)
        if got is None and choice in ("auto", "wheel"):
            got = _try_wheel(libs, refused)
        if got is None and refused:
            got = f"reference (OpenBLAS refused, {'; '.join(refused)})"
        _status = got or "reference (no OpenBLAS found: pip install cmeel-openblas)"
    return _status


def status() -> str:
    return _status or "not activated yet"


def describe() -> str:
    """Status line for `mlxpt --version`: what activate() did, or would do, in this process."""
    return activate()
