"""Swap the reference BLAS of the Linux `mlx[cpu]` wheel for OpenBLAS, before mlx is imported.

The wheel's libmlx links a bundled reference BLAS (~6 GFLOP/s on a 1024^2 matmul here).
Loading an OpenBLAS with RTLD_GLOBAL before `import mlx` makes libmlx bind `cblas_sgemm` to it
(10-30x faster). Sources, in order: a system libopenblas, then the `cmeel-openblas` wheel (its
libgfortran dependency is satisfied by a copy of the one bundled in the mlx wheel, renamed).
Opt out with MLXPT_BLAS=off (or choose MLXPT_BLAS=system|wheel). No-op on macOS (Accelerate).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
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
    return Path(os.environ.get("MLXPT_HOME", Path.home() / ".cache" / "mlxpt")) / "blas"


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


def _try_system() -> str | None:
    for cand in _SYSTEM_CANDIDATES:
        if os.path.exists(cand):
            try:
                ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
                return f"openblas (system, {cand})"
            except OSError:
                continue
    return None


def _try_wheel(libs: Path) -> str | None:
    roots = [str(p) for p in _site_dirs("cmeel")]
    roots += [p for p in sys.path if p and os.path.isdir(os.path.join(p, "cmeel.prefix"))]
    for root in dict.fromkeys(roots):
        lib = Path(root) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if not lib.exists():
            continue
        try:
            gf = _gfortran_for_wheel(libs)
            if gf is not None:
                ctypes.CDLL(str(gf), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return f"openblas (cmeel-openblas wheel, {lib})"
        except OSError:
            continue
    return None


def activate() -> str:
    """Load the fastest safe BLAS before mlx is imported; return a one-line status."""
    global _status
    if _status is not None:
        return _status
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
        got = None
        if choice in ("auto", "system"):
            got = _try_system()
        if got is None and choice in ("auto", "wheel"):
            got = _try_wheel(libs)
        _status = got or "reference (no OpenBLAS found: pip install cmeel-openblas)"
    return _status


def status() -> str:
    return _status or "not activated yet"


def describe() -> str:
    """Status line for `mlxpt --version`: what activate() did, or would do, in this process."""
    return activate()
