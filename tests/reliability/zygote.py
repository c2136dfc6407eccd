"""A pre-imported training process that forks one child per request (the suites' subprocesses).

Starting `python -m mlxpt.cli` costs ~2-3 s here, mostly imports (transformers, mlx-lm); forking a
process that already holds them costs ~0.05 s, so dozens of kills fit in the time budget. Each
child is a real, separate process running `mlxpt.cli.main(argv)` with its own stdout/stderr files,
signal handlers and exit status; SIGKILL and SIGINT reach it like any `mlxpt train`. Nothing
computes in the parent before forking (MLX holds no threads until first use).

Protocol on stdin/stdout, one JSON object per line: request {argv, stdout, stderr, env?, faults?}
-> {"pid": N} when forked, then {"pid": N, "code": exit code or -signal} when it ended.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
PRELOAD = (
    "mlxpt.cli",
    "mlxpt.commands.train",
    "mlxpt.commands.generate",
    "mlxpt.train.sft",
    "mlxpt.backends.mlx_backend",
    "mlxpt.models.loader",
    "mlx_lm.utils",
    "mlx_lm.tuner.utils",
    "transformers",
    "yaml",
    "jinja2.sandbox",
)


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # a module renamed by a refactor only costs speed
            pass


def child(req: dict) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # signals sent to the child's group never reach the parent
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            out = os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.environ.update(req.get("env") or {})
        from reliability import faults

        faults.install(req.get("faults"))
        from mlxpt.cli import main

        try:
            code = main(req["argv"])
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        faults.finish()
    except BaseException:  # what the interpreter would do with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    sys.path[:0] = [str(ROOT), str(TESTS)]
    os.chdir(ROOT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One BLAS thread: the tiny model's matmuls gain nothing from threads, and on a shared,
    # oversubscribed CI machine spinning OpenBLAS threads made steps 10x slower.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
