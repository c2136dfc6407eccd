"""NumPy reference backend vs MLX backend on the default model (CPU): SFT step and generation.

    .venv/bin/python bench/numpy_vs_mlx.py [--steps 4] [--batch-size 4] [--new-tokens 64]

Both backends train the same float32 weights (`--quantize none`), the same LoRA settings and the
same batches (the first rows of the bundled SFT data); the first step of each is left out (MLX
compiles, both warm caches). Generation: greedy, from the same chat prompt, KV cache on both.
No target: the numbers tell users when the NumPy fallback is usable.
"""

from __future__ import annotations

import argparse
import json
import time

from mlxpt.config import SFTConfig, apply_flat


def sft_steps(backend_name: str, steps: int, batch_size: int) -> dict:
    from mlxpt.backends import create_backend
    from mlxpt.data.batching import collate
    from mlxpt.data.encode import pad_id_of
    from mlxpt.models.loader import load_tokenizer
    from mlxpt.train.sft import SFT

    cfg = SFTConfig()
    apply_flat(cfg, {"quantize": "none", "batch_size": batch_size, "backend": backend_name}, source="bench")
    tok = load_tokenizer(cfg.model.model)
    train, _, _ = SFT.encode(cfg, tok, SFT.read(cfg))
    backend = create_backend(backend_name, cfg.model, cfg.adapter, cfg.train, SFT.objective(cfg, "rows"))
    pad = pad_id_of(tok)
    times, tokens = [], []
    for i in range(steps + 1):
        batch = [train[(i * batch_size + j) % len(train)] for j in range(batch_size)]
        t0 = time.perf_counter()
        backend.accumulate(collate(batch, pad))
        loss, n, _, _ = backend.reduce()
        backend.apply(1e-4, 1.0)
        if i:  # step 0 is warm-up
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(e.tokens) - 1 for e in batch))
    return {"s_per_step": sum(times) / len(times), "tok_per_s": sum(tokens) / sum(times), "last_loss": loss / n}


def generation(backend_name: str, new_tokens: int) -> dict:
    from mlxpt.models.loader import load_tokenizer, resolve

    tok = load_tokenizer("smollm2-135m")
    msgs = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    if backend_name == "numpy":
        from mlxpt.backends.numpy_model import Model

        model = Model.load(resolve("smollm2-135m"))
        t0 = time.perf_counter()
        out = []
        for t in model.generate(list(prompt), new_tokens, eos=set()):
            out.append(t)
        dt = time.perf_counter() - t0
    else:
        from mlx_lm.generate import stream_generate

        from mlxpt.models import load

        model, tok = load("smollm2-135m", quantize="none")
        t0 = time.perf_counter()
        out = [r.token for r in stream_generate(model, tok, prompt, max_tokens=new_tokens)]
        dt = time.perf_counter() - t0
    return {"prompt_tokens": len(prompt), "new_tokens": len(out), "tok_per_s": len(out) / dt, "first_ids": out[:8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    rows = {}
    for name in ("mlx", "numpy"):
        rows[name] = {
            "sft": sft_steps(name, args.steps, args.batch_size),
            "generate": generation(name, args.new_tokens),
        }
        print(name, json.dumps(rows[name]), flush=True)
    m, n = rows["mlx"], rows["numpy"]
    print("\n| backend | SFT s/step | SFT tok/s | generation tok/s (batch 1, greedy) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['sft']['s_per_step']:.2f} | {r['sft']['tok_per_s']:.0f} | {r['generate']['tok_per_s']:.1f} |"
        )
    print(
        f"\nnumpy / mlx: SFT {n['sft']['tok_per_s'] / m['sft']['tok_per_s']:.2f}x, "
        f"generation {n['generate']['tok_per_s'] / m['generate']['tok_per_s']:.2f}x; "
        f"same greedy tokens: {n['generate']['first_ids'] == m['generate']['first_ids']}"
    )


if __name__ == "__main__":
    main()
