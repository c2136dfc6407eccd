"""Test-time scaling speed checks on the default model (BENCHMARKS.md, "Test-time scaling").

1. single stream: `run_strategy(..., "greedy")` (mlxpt's decode path) vs `mlx_lm.generate` on the
   same model and prompt, interleaved; tokens per wall second of each, and the ratio.
2. best-of-8 batched vs one sample of the same length: `run_strategy(..., "best-of-n", n=8)` with
   the stop tokens masked (every row runs the full length) vs one streamed sample of that length.

    .venv/bin/python bench/tts.py --max-tokens 64 --repeats 3 --json bench-tts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def no_stop_sampler(tokenizer, temperature: float, seed: int):
    """A sampler that never picks a stop token (so every sample runs max_tokens)."""
    import mlx.core as mx

    from mlxpt.decode.generate import add_stop_tokens
    from mlxpt.decode.sampling import make_sampler

    base = make_sampler(temperature=temperature, seed=seed)
    stop = sorted(add_stop_tokens(tokenizer).eos_token_ids)

    def sampler(logp):
        mask = mx.zeros((logp.shape[-1],))
        mask[mx.array(stop)] = -float("inf")
        return base(logp + mask)

    return sampler


def single_stream(model, tok, ids, max_tokens: int, ours_first: bool) -> dict:
    import mlx_lm

    from mlxpt.decode.strategies import run_strategy

    def ours():
        t = time.perf_counter()
        r = run_strategy(model, tok, ids, "greedy", max_tokens=max_tokens)
        return r, time.perf_counter() - t

    def theirs():
        t = time.perf_counter()
        text = mlx_lm.generate(model, tok, ids, max_tokens=max_tokens, verbose=False)
        return text, time.perf_counter() - t

    if ours_first:
        (r, ours_s), (text, theirs_s) = ours(), theirs()
    else:
        (text, theirs_s), (r, ours_s) = theirs(), ours()
    # greedy on the same model and stop tokens: the same tokens when the texts match
    theirs_tokens = r.generated_tokens if text == r.text else len(tok.encode(text, add_special_tokens=False))
    return {
        "mlxpt_tokens": r.generated_tokens,
        "mlxpt_s": ours_s,
        "mlxpt_tok_s": r.generated_tokens / ours_s,
        "mlx_lm_tokens": theirs_tokens,
        "mlx_lm_s": theirs_s,
        "mlx_lm_tok_s": theirs_tokens / theirs_s,
        "same_text": r.text == text,
    }


def best_of_8(model, tok, ids, max_tokens: int, seed: int) -> dict:
    from mlxpt.decode.batch import generate_group
    from mlxpt.decode.scorers import make_scorer
    from mlxpt.decode.votes import vote

    scorer = make_scorer("logprob")
    out = {}
    for n in (1, 8):
        t = time.perf_counter()
        group = generate_group(model, tok, ids, n, max_tokens, no_stop_sampler(tok, 0.7, seed))
        scores = scorer(None, group)
        vote([c.text for c in group])
        out[f"n{n}_s"] = time.perf_counter() - t
        out[f"n{n}_tokens"] = sum(len(c.tokens) for c in group)
        _ = scores
    # one streamed sample (mlx-lm's pipelined decode), same length
    from mlx_lm.generate import stream_generate

    from mlxpt.decode.generate import add_stop_tokens

    t = time.perf_counter()
    for _ in stream_generate(
        model, add_stop_tokens(tok), ids, max_tokens=max_tokens, sampler=no_stop_sampler(tok, 0.7, seed)
    ):
        pass
    out["stream1_s"] = time.perf_counter() - t
    out["ratio_vs_group1"] = out["n8_s"] / out["n1_s"]
    out["ratio_vs_stream1"] = out["n8_s"] / out["stream1_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.models.loader import load

    model, tok = load(a.model)
    ids = chat_prompt(tok, [{"role": "user", "content": PROMPT}])
    single_stream(model, tok, ids, 8, True)  # warm-up (compiles, caches)
    best_of_8(model, tok, ids, 8, 0)
    rows = []
    for i in range(a.repeats):
        s = single_stream(model, tok, ids, a.max_tokens, ours_first=i % 2 == 0)
        b = best_of_8(model, tok, ids, a.max_tokens, i)
        rows.append({**s, **b})
        print(
            f"[{i}] single stream: mlxpt {s['mlxpt_tok_s']:.1f} tok/s ({s['mlxpt_tokens']} tok), "
            f"mlx_lm.generate {s['mlx_lm_tok_s']:.1f} tok/s ({s['mlx_lm_tokens']} tok), "
            f"ratio {s['mlxpt_tok_s'] / s['mlx_lm_tok_s']:.3f}, same text {s['same_text']} | "
            f"best-of-8 {b['n8_s']:.2f} s ({b['n8_tokens']} tok) vs 1 sample {b['n1_s']:.2f} s "
            f"(stream {b['stream1_s']:.2f} s): {b['ratio_vs_group1']:.2f}x / {b['ratio_vs_stream1']:.2f}x",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
    print(
        f"median: single-stream ratio mlxpt/mlx_lm {med['mlxpt_tok_s'] / med['mlx_lm_tok_s']:.3f}; "
        f"best-of-8 / one sample {med['ratio_vs_group1']:.2f}x (batched path), {med['ratio_vs_stream1']:.2f}x (streamed)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "median": med, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
