"""An exported GGUF under llama.cpp itself, against the fused MLX model it came from.

`mlxpt fuse RUN --export gguf` checks its file by reading it back through mlxpt's own GGUF
loader; that check cannot catch a mistake the writer and the reader share (a Q/K permutation
done and undone the same wrong way). This bench asks llama.cpp: node-llama-cpp's prebuilt CPU
binary (npm, pinned in bench/llamacpp/package.json, installed into bench/llamacpp/node_modules
on first use; never by `make setup`) reads the GGUF and returns next-token log-probs, which are
compared with the fused folder's under mlx-lm on the same token ids.

    python bench/gguf_llamacpp.py FUSED_DIR [--gguf FILE] [--k 5]

Prints, per prompt, the top-k tokens of both and the largest log-prob difference over the
union of their top-k; exits 1 when the argmax differs or a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "llamacpp"
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Mia has 12 apples. She buys 7 more and gives 5 to Leo. How many apples does Mia have now?",
    "Write one short sentence about the sea.",
]


def llama_cpp_logprobs(gguf: Path, prompts: list[list[int]], k: int) -> list[dict[int, float]]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        sys.exit("gguf_llamacpp: needs node and npm on PATH (node-llama-cpp runs llama.cpp)")
    if not (HERE / "node_modules" / "node-llama-cpp").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=HERE, check=True)
    feed = json.dumps({"gguf": str(gguf), "prompts": prompts, "k": k})
    out = subprocess.run(["node", "logprobs.mjs"], cwd=HERE, input=feed, capture_output=True, text=True, check=True)
    return [dict((int(t), float(lp)) for t, lp in json.loads(line)) for line in out.stdout.splitlines() if line]


def mlx_logprobs(model, prompts: list[list[int]]) -> list:
    import mlx.core as mx

    out = []
    for ids in prompts:
        logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
        out.append((logits - mx.logsumexp(logits)).tolist())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fused", type=Path)
    ap.add_argument("--gguf", type=Path, default=None, help="default: the one *.gguf in FUSED")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.05, help="max |Δ log-prob| over the top-k")
    a = ap.parse_args()
    gguf = a.gguf or next(iter(sorted(a.fused.glob("*.gguf"))), None)
    if gguf is None:
        sys.exit(f"gguf_llamacpp: no .gguf in {a.fused}; pass --gguf")
    from mlx_lm import load

    model, tok = load(str(a.fused))
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)) for p in PROMPTS]
    ref = mlx_logprobs(model, ids)
    got = llama_cpp_logprobs(gguf.resolve(), ids, a.k)
    worst, ok = 0.0, True
    for text, full, top in zip(PROMPTS, ref, got, strict=True):
        mine = sorted(range(len(full)), key=lambda i: -full[i])[: a.k]
        diff = max(abs(full[t] - top[t]) for t in top)
        same = mine[0] == max(top, key=top.get)
        worst, ok = max(worst, diff), ok and same and diff <= a.tolerance
        show = lambda ts, lp: ", ".join(f"{tok.decode([t])!r} {lp[t]:.3f}" for t in ts)  # noqa: E731
        print(f"{text[:48]!r}\n  mlx      : {show(mine, full)}\n  llama.cpp: {show(list(top), top)}")
        print(f"  argmax {'same' if same else 'DIFFERS'}; max |Δ log-prob| over llama.cpp's top-{a.k}: {diff:.4f}")
    print(f"{gguf.name}: worst |Δ log-prob| {worst:.4f} (tolerance {a.tolerance}) -> {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
