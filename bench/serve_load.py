"""A bounded load test on loopback: `mlxpt serve` and `mlx_lm.server`, side by side, same model.

Each server is started as a child on a free loopback port with the same float32 copy of the
default model (bench/sft.py's `float_model`; mlx-lm's quantised CPU matmul would be ~20x slower
and unfair to it) and the same OpenBLAS (mlxpt's swap is applied in mlx-lm's child too). Then
`--clients` threads send `--requests` chat completions in all (distinct short arithmetic
questions, temperature 0, `--max-tokens`), each waiting for its answer before sending the next.
Reported per server: failed requests (non-200, bad JSON, a connection error), p50/p95 latency,
and aggregate completion tokens/s (usage counts over the wall time of the whole load).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/serve_load.py [--clients 32] [--requests 200]
                              [--max-tokens 16] [--tools mlxpt,mlx-lm] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import ROOT, float_model, machine, versions  # noqa: E402

PY = sys.executable
_MLX_LM_SERVER = "import sys; from mlxpt import _blas; _blas.activate(); from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(tool: str, model: Path, port: int, clients: int) -> list[str]:
    if tool == "mlxpt":
        return [PY, "-m", "mlxpt.cli", "serve", "--model", str(model), "--port", str(port), "--runs-dir", "/nonexistent",
                "--max-streams", str(max(32, clients)), "--batch-size", str(clients)]  # fmt: skip
    return [PY, "-c", _MLX_LM_SERVER, "--model", str(model), "--port", str(port), "--host", "127.0.0.1"]


def post(port: int, body: dict, timeout: float = 600) -> tuple[int, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, None
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, model: str, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            status, _ = post(port, request(model, 0, 2), timeout=60)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not answer in time")


def request(model: str, i: int, max_tokens: int) -> dict:
    a, b = 3 + i % 47, 5 + (i * 7) % 53
    return {"model": model, "messages": [{"role": "user", "content": f"What is {a} + {b}? Answer briefly."}],
            "max_tokens": max_tokens, "temperature": 0.0}  # fmt: skip


def load(port: int, model: str, clients: int, total: int, max_tokens: int) -> dict:
    latencies, tokens, failures = [], [], []
    next_i = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                status, body = post(port, request(model, i, max_tokens))
                ok = status == 200 and body is not None and body.get("choices")
            except OSError as e:
                status, body, ok = str(e), None, False
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    latencies.append(dt)
                    tokens.append(int((body.get("usage") or {}).get("completion_tokens", 0)))
                else:
                    failures.append(status)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {
        "requests": total, "failed": len(failures), "failures": failures[:5], "p50_s": round(pct(0.5), 3),
        "p95_s": round(pct(0.95), 3), "mean_s": round(statistics.fmean(lat), 3) if lat else None,
        "completion_tokens": sum(tokens), "wall_s": round(wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
        "requests_per_s": round(len(lat) / wall, 2),
    }  # fmt: skip


def run_tool(tool: str, model: Path, args) -> dict:
    port = free_port()
    log = open(Path(args.logdir) / f"serve_load-{tool}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command(tool, model, port, args.clients), cwd=ROOT, stdout=log, stderr=log)
    name = model.name if tool == "mlxpt" else str(model)
    try:
        t = time.perf_counter()
        wait_ready(proc, port, name)
        ready = time.perf_counter() - t
        result = load(port, name, args.clients, args.requests, args.max_tokens)
        result["startup_s"] = round(ready, 1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tools", default="mlxpt,mlx-lm")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--logdir", default="/tmp")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = float_model(args.model)
    out = {"machine": machine(), "versions": versions(), "load": os.getloadavg(), "args": vars(args), "tools": {}}
    for tool in args.tools.split(","):
        out["tools"][tool] = r = run_tool(tool, model, args)
        print(f"{tool:8s} failed {r['failed']}/{r['requests']}  p50 {r['p50_s']:.3f} s  p95 {r['p95_s']:.3f} s  "
              f"{r['tokens_per_s']:.1f} tok/s  ({r['completion_tokens']} tokens in {r['wall_s']} s)", flush=True)  # fmt: skip
    out["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
