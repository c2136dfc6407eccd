"""One mlxpt SFT step on the default model, timed and counted: MFU and where the time goes.

The step is the one `mlxpt train sft` runs (MLXBackend: compiled forward/backward, the vocabulary
head at trained positions, Adam), on a fixed batch of `--batch` rows of `--length` tokens, every
position trained (as bench/sft_peers.py's `--mask none`), LoRA r=8 on all linears of the last 16
blocks, float32 weights (bench/sft.py's float copy). It prints:

- the median step time and trained tokens/s over `--steps` steps (after 2 warm-up steps);
- the matmul FLOPs of one step, counted from the model's shapes (`step_flops`): the forward of
  every block and of the head at the trained positions, attention's two products, and the
  backward's input gradients down to the first adapted block (frozen weights get none), plus the
  LoRA products; element-wise work is not counted;
- MFU: those FLOPs over the step time and the float32 matmul peak measured in this process as
  `mlxpt doctor` does (1024^3, the same BLAS threads);
- the process's minor page faults and system time a step (the kernel zeroing fresh pages).

`--perf` runs the same under `perf record` and splits the sampled CPU time into matmul
(OpenBLAS's compute kernels), OpenBLAS's threads waiting, `exp`, the kernel, and the rest.

    python bench/sft_profile.py [--threads 1] [--steps 6] [--perf]
    MLXPT_MALLOC=off python bench/sft_profile.py   # glibc's default malloc (the "before")
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_flops(cfg: dict, batch: int, length: int, adapted: int, rank: int) -> float:
    """Matmul FLOPs of one SFT step with every position trained (see the module docstring)."""
    d, f, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dk = d // heads
    shapes = [(d, d), (d, kv * dk), (d, kv * dk), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    tokens = batch * length
    linear = 2 * sum(i * o for i, o in shapes) * tokens  # one block's forward
    attention = 2 * 2 * heads * dk * batch * length * (length + 1) / 2  # QK^T and AV, causal half
    lora = 2 * rank * sum(i + o for i, o in shapes) * tokens  # x A then (xA) B
    head = 2 * d * vocab * tokens
    forward = layers * (linear + attention) + adapted * lora + head
    # backward: the head's input gradient, then each block from the top down to the lowest adapted
    # one: input gradients of its linears and attention (2 products each), LoRA's input and weight
    # gradients (about 2x its forward)
    backward = head + adapted * (linear + 2 * attention + 2 * lora)
    return forward + backward


def measure(a) -> dict:
    from mlxpt import _blas

    blas = _blas.activate()
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.commands.doctor import matmul_gflops
    from mlxpt.config import AdapterConfig
    from mlxpt.models.adapters import apply_adapters
    from mlxpt.objectives import sft_objective

    sys.path.insert(0, str(ROOT / "bench"))
    from sft import float_model

    folder = float_model(a.model)
    model = load_model(folder)[0]
    apply_adapters(model, AdapterConfig(num_layers=16, rank=8, alpha=16.0), seed=0)
    backend = MLXBackend(model, make_optimizer("adam"), sft_objective)
    rng = np.random.default_rng(0)
    inputs = rng.integers(10, 40000, (a.batch, a.length)).astype(np.int32)
    targets = rng.integers(10, 40000, (a.batch, a.length)).astype(np.int32)
    batch = (inputs, targets, np.ones((a.batch, a.length), np.float32))

    def step():
        backend.accumulate(batch)
        backend.reduce()
        backend.apply(1e-5, 0.0)

    for _ in range(2):
        step()
    if a.ready:  # --perf: the parent starts recording now
        Path(a.ready).write_text("go")
        time.sleep(1.0)
    times, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = matmul_gflops(1024)
    cfg = json.loads((folder / "config.json").read_text())
    flops = step_flops(cfg, a.batch, a.length, adapted=16, rank=8)
    s = float(np.median(times))
    return {
        "blas": blas, "heap": _blas.keep_heap(), "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "batch": a.batch, "length": a.length, "step_s": s, "tok_s": a.batch * a.length / s,
        "step_gflop": flops / 1e9, "achieved_gflops": flops / s / 1e9, "peak_gflops": peak,
        "mfu": flops / s / 1e9 / peak, "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / a.steps,
        "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / a.steps, "user_s_per_step": (r1.ru_utime - r0.ru_utime) / a.steps,
        "mx_peak_mb": mx.get_peak_memory() / 1e6,
    }  # fmt: skip


BUCKETS = (  # (name, test on "dso symbol"), first match wins
    (
        "matmul (OpenBLAS kernels)",
        lambda d, s: "openblas" in d and ("kernel" in s or "gemm" in s) and "thread" not in s,
    ),
    ("OpenBLAS threads waiting", lambda d, s: "openblas" in d or "sched_yield" in s),
    ("exp (mlx)", lambda d, s: "exp" in s.lower() and "mlx" in d),
    ("kernel (page faults, memory)", lambda d, s: "kernel" in d),
    ("mlx other", lambda d, s: "mlx" in d),
    ("libc / libm", lambda d, s: "libc" in d or "libm" in d),
)


def perf_split(a) -> dict:
    """Run `measure` in a child under perf record (from the first measured step) and bucket the
    samples by DSO and symbol."""
    with tempfile.TemporaryDirectory() as tmp:
        ready, data = Path(tmp) / "ready", Path(tmp) / "perf.data"
        child = subprocess.Popen([sys.executable, __file__, "--steps", str(a.steps), "--batch", str(a.batch),
                                  "--length", str(a.length), "--model", a.model, "--ready", str(ready), "--json-only"],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        while not ready.exists() and child.poll() is None:
            time.sleep(0.2)
        rec = subprocess.Popen(["perf", "record", "-F", "499", "-p", str(child.pid), "-o", str(data), "-q"],
                               stderr=subprocess.DEVNULL)  # fmt: skip
        out, _ = child.communicate()
        rec.terminate()
        rec.wait()
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio",
                                 "-q", "--percent-limit", "0.05"], capture_output=True, text=True).stdout  # fmt: skip
    shares: dict[str, float] = {name: 0.0 for name, _ in BUCKETS}
    shares["other"] = 0.0
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        pct, dso, sym = float(parts[0][:-1]), parts[1], " ".join(parts[2:])
        name = next((n for n, test in BUCKETS if test(dso.lower(), sym)), "other")
        shares[name] += pct
    return {"measure": json.loads(out.strip().splitlines()[-1]), "perf_share_pct": shares}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as the environment says)")
    ap.add_argument("--perf", action="store_true", help="also split the CPU time with perf record")
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    if a.perf:
        result = perf_split(a)
    else:
        result = measure(a)
        if a.json_only:
            print(json.dumps(result))
            return 0
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
