"""The NumPy backend on the real default model (slow): logits and greedy parity with the MLX
backend, and the first SFT steps' losses of both backends from the same seed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mlxpt.config import SFTConfig, apply_flat

pytestmark = pytest.mark.slow


def test_default_model_logits_and_greedy_match_mlx():
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlxpt.backends.mlx_backend import token_logp
    from mlxpt.backends.numpy_model import Model
    from mlxpt.models.loader import load, resolve

    ref, tok = load("smollm2-135m")  # float32 on CPU: the MLX path dequantises like ours
    ours = Model.load(resolve("smollm2-135m"))
    ids = tok.encode("Tom has 14 pencils. He buys 9 more and then gives 6 to Ana. How many pencils")
    x, y = np.array([ids[:-1]]), np.array([ids[1:]])
    a, b = np.array(ref(mx.array(x))), ours.logits(x)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    la, lb = np.array(token_logp(ref, mx.array(x), mx.array(y))), ours.token_logp(x, y)
    assert np.abs(la - lb).max() <= 1e-4 * np.abs(la).max()
    cache, expected = make_prompt_cache(ref), []
    logits = ref(mx.array([ids]), cache=cache)[:, -1]
    for _ in range(20):
        expected.append(int(mx.argmax(logits, axis=-1).item()))
        logits = ref(mx.array([[expected[-1]]]), cache=cache)[:, -1]
    assert list(ours.generate(ids, 20)) == expected


def test_default_sft_losses_match_mlx_on_the_same_seed(tmp_path):
    """Same seed: same initial adapter (MLX's key sequence replayed) and data order; the step
    losses agree within 1e-3 relative (measured ~6e-5: float32 summation order)."""
    from mlxpt.runs import latest_checkpoint, load_checkpoint
    from mlxpt.train.sft import run_sft

    losses, times, first = {}, {}, {}
    for backend in ("mlx", "numpy"):
        cfg = SFTConfig()
        flat = {"steps": 3, "batch_size": 2, "max_seq_len": 128, "learning_rate": 3e-4, "warmup_steps": 1,
                "eval_every": 0, "eval_batches": 1, "save_every": 1, "keep": 3, "regression_data": "none", "runs_dir": str(tmp_path / backend), "backend": backend}  # fmt: skip
        apply_flat(cfg, flat, source="test")
        events = []
        t0 = time.perf_counter()
        run_dir, _ = run_sft(cfg, emit=events.append)
        times[backend] = time.perf_counter() - t0
        losses[backend] = [e["loss"] for e in events if e["event"] == "step"]
        first[backend] = load_checkpoint(latest_checkpoint(run_dir))[0]["adapters"]
    print(f"\nstep losses {losses}\nrun seconds {times}")
    np.testing.assert_allclose(losses["numpy"], losses["mlx"], rtol=1e-3)
    # Adam's first steps are ~lr * sign(g): elements whose gradient is ~eps flip with 1e-7 noise,
    # so adapters are compared by norm (worst tensor measured 3.5%, a lora_b after 3 steps)
    for k, v in first["mlx"].items():
        assert np.linalg.norm(first["numpy"][k] - v) <= 0.1 * max(np.linalg.norm(v), 1e-6), k
