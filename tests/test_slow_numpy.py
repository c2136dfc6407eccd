"""The NumPy backend on the real default model (slow): logits and greedy parity with the MLX
backend, and the first SFT steps' losses of both backends from the same initial adapter."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mlxpt.config import SFTConfig, apply_flat

pytestmark = pytest.mark.slow


def test_default_model_logits_and_greedy_match_mlx():
    import mlx.core as mx

    from mlxpt.backends.mlx_backend import token_logp
    from mlxpt.backends.numpy_model import Model
    from mlxpt.models.loader import load, resolve

    ref, tok = load("smollm2-135m")  # float32 on CPU: the MLX path dequantises like ours
    ours = Model.load(resolve("smollm2-135m"))
    ids = tok.encode("Tom has 14 pencils. He buys 9 more and then gives 6 to Ana. How many pencils")
    x = np.array([ids[:-1]])
    a, b = np.array(ref(mx.array(x))), ours.logits(x)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= 1e-4, rel
    la = np.array(token_logp(ref, mx.array(x), mx.array([ids[1:]])))
    lb = ours.token_logp(x, np.array([ids[1:]]))
    assert np.abs(la - lb).max() <= 1e-4 * np.abs(la).max()
    expected = []
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(ref)
    logits = ref(mx.array([ids]), cache=cache)[:, -1]
    for _ in range(20):
        expected.append(int(mx.argmax(logits, axis=-1).item()))
        logits = ref(mx.array([[expected[-1]]]), cache=cache)[:, -1]
    assert list(ours.generate(ids, 20)) == expected


def test_default_sft_losses_match_mlx_from_the_same_adapter(tmp_path, monkeypatch):
    """Same seed, same data order, the MLX run's initial adapter copied in: step losses agree
    within 1e-3 relative over the first steps (float32 summation order is all that differs)."""
    import mlxpt.backends.numpy_backend as nbk
    from mlxpt.backends import create_backend
    from mlxpt.train.objectives import sft_objective
    from mlxpt.train.sft import run_sft

    def cfg_for(backend):
        cfg = SFTConfig()
        flat = {"steps": 4, "batch_size": 2, "max_seq_len": 256, "learning_rate": 3e-4, "warmup_steps": 1,
                "eval_every": 0, "save_every": 100, "runs_dir": str(tmp_path / backend), "backend": backend}  # fmt: skip
        apply_flat(cfg, flat, source="test")
        return cfg

    mlx_init = create_backend("mlx", *(lambda c: (c.model, c.adapter, c.train))(cfg_for("mlx")), sft_objective)
    (tmp_path / "init").mkdir()
    mlx_init.save_adapter(tmp_path / "init")
    real = nbk.create_numpy_backend

    def with_mlx_init(*a, **kw):
        b = real(*a, **kw)
        b.load_adapter_weights(tmp_path / "init")
        return b

    monkeypatch.setattr(nbk, "create_numpy_backend", with_mlx_init)
    losses, times = {}, {}
    for backend in ("mlx", "numpy"):
        events = []
        t0 = time.perf_counter()
        run_sft(cfg_for(backend), emit=events.append)
        times[backend] = time.perf_counter() - t0
        losses[backend] = [e["loss"] for e in events if e["event"] == "step"]
    print(f"\nstep losses {losses}\nrun seconds {times}")
    np.testing.assert_allclose(losses["numpy"], losses["mlx"], rtol=1e-3)
    assert losses["numpy"][-1] < losses["numpy"][0]
