"""The NumPy reference backend against the MLX path on tiny random models (fast).

Each supported config (llama tied, llama untied with llama3 RoPE scaling, qwen2 with q/k/v bias,
qwen3 with q/k norm) is loaded both ways from the same safetensors: logits, per-token log-probs,
20 greedy tokens, adapter gradients vs `mx.grad` and one AdamW step must agree. A float64
finite-difference check validates the hand-written backward on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tiny
from safetensors.numpy import load_file, save_file
from tiny import StopAfter

from mlxpt.backends.numpy_backend import AdamW, NumpyBackend
from mlxpt.backends.numpy_model import Model
from mlxpt.objectives import sft_grad, sft_objective

VARIANTS = {
    "llama": {},
    "llama3-untied": {
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "llama-linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "head_dim": 16,
        "tie_word_embeddings": False,
    },
}


def make_variant(path, name: str, **extra):
    """A tiny folder of one config; qwen2 gets q/k/v biases, qwen3 q/k norm weights."""
    path = tiny.make_model(path, **{**VARIANTS[name], **extra})
    cfg = json.loads((path / "config.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(7)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        if cfg["model_type"] == "qwen2":
            for proj in ("q_proj", "k_proj", "v_proj"):
                t[p + proj + ".bias"] = (0.1 * rng.standard_normal(t[p + proj + ".weight"].shape[0])).astype(np.float32)
        if cfg["model_type"] == "qwen3":
            for norm in ("q_norm", "k_norm"):
                t[p + norm + ".weight"] = (1 + 0.2 * rng.standard_normal(cfg["head_dim"])).astype(np.float32)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "mlx"})
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return request.param, make_variant(tmp_path_factory.mktemp(request.param), request.param)


def mlx_model(path):
    from pathlib import Path

    from mlx_lm.utils import load_model

    return load_model(Path(path))[0]


def batch(seed=0, B=3, L=24, V=272):
    """Random right-padded (inputs, targets, mask)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, V, (B, L)).astype(np.int32)
    targets = rng.integers(3, V, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.float32)
    mask[1, L - 7 :] = 0
    mask[2, : L // 3] = 0
    return inputs, targets, mask


def test_logits_and_logps_match_mlx(variant):
    import mlx.core as mx

    from mlxpt.backends.mlx_backend import token_logp

    name, path = variant
    ref, ours = mlx_model(path), Model.load(path)
    inputs, targets, _ = batch()
    a = np.array(ref(mx.array(inputs)))
    b = ours.logits(inputs)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
    la = np.array(token_logp(ref, mx.array(inputs), mx.array(targets)))
    lb = ours.token_logp(inputs, targets)
    assert np.abs(la - lb).max() <= 1e-4 * np.abs(la).max(), name


def test_twenty_greedy_tokens_match_mlx(variant):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    name, path = variant
    ref, ours = mlx_model(path), Model.load(path)
    prompt = [5, 77, 140, 9, 33, 201, 18]
    cache = make_prompt_cache(ref)
    logits = ref(mx.array([prompt]), cache=cache)[:, -1]
    expected = []
    for _ in range(20):
        tok = int(mx.argmax(logits, axis=-1).item())
        expected.append(tok)
        logits = ref(mx.array([[tok]]), cache=cache)[:, -1]
    assert list(ours.generate(prompt, 20)) == expected, name
    # the cache path equals a full forward over prompt + generated tokens
    seq = np.array([prompt + expected])
    full = ours.logits(seq)[0, len(prompt) - 1 : -1].argmax(-1)
    assert full.tolist() == expected


def paired_backends(path, kind, targets="all", clip=1.0, num_layers=1):
    """An MLX and a NumPy backend with identical adapters (random LoRA B so every gradient is nonzero)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.backends.numpy_backend import resolve_keys
    from mlxpt.config import AdapterConfig
    from mlxpt.models.adapters import apply_adapters

    cfg = AdapterConfig(fine_tune_type=kind, num_layers=num_layers, targets=targets, rank=4, alpha=8.0)
    ref = mlx_model(path)
    apply_adapters(ref, cfg, seed=0)
    rng = np.random.default_rng(3)
    bumped = []
    for k, v in tree_flatten(ref.trainable_parameters()):
        if k.endswith(".lora_b") or k.endswith(".m"):
            v = np.array(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
            bumped.append((k, mx.array(v)))
    ref.load_weights(bumped, strict=False)
    mx.eval(ref.parameters())
    mb = MLXBackend(ref, make_optimizer("adamw", 0.01), compile=False)
    ours = Model.load(path)
    keys = None if kind == "full" else resolve_keys(targets)
    ours.add_adapters(kind, num_layers, 4, 2.0, 0.0, keys, seed=0)
    nb = NumpyBackend(ours, sft_objective, sft_grad, AdamW("adamw", 0.01))
    state = {k: np.array(v) for k, v in tree_flatten(ref.trainable_parameters())}
    assert state.keys() == ours.params.keys()
    nb._set_params(state)
    return mb, nb


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_adapter_gradients_and_one_adamw_step_match_mlx(variant, kind):
    from mlx.utils import tree_flatten

    name, path = variant
    mb, nb = paired_backends(path, kind, num_layers=2 if kind != "full" else 1)
    b = batch(1)
    mb.accumulate(b)
    nb.accumulate(b)
    ga = {k: np.array(v) for k, v in tree_flatten(mb._grads)}
    assert ga.keys() == nb._grads.keys()
    for k, g in ga.items():
        assert np.abs(g).max() > 0, f"{name}/{kind}: zero gradient {k}"
        err = np.abs(g - nb._grads[k]).max() / np.abs(g).max()
        assert err <= 1e-4, f"{name}/{kind} {k}: relative error {err:.2e}"
    (la, wa, na, _), (lb, wb, nn_, _) = mb.reduce(), nb.reduce()
    assert wa == wb and lb == pytest.approx(la, rel=1e-5) and nn_ == pytest.approx(na, rel=1e-4)
    # Adam's first step is ~lr * sign(g): an element whose gradient is ~eps amplifies 1e-7 gradient
    # noise, so the update rule is compared on the same gradients (MLX's, as float32 arrays)
    nb._grads = ga
    mb.apply(1e-2, 1.0)
    nb.apply(1e-2, 1.0)
    after = mb.get_state()
    for k, v in after["adapters"].items():
        np.testing.assert_allclose(nb.model.params[k], v, rtol=0, atol=1e-6, err_msg=f"{name}/{kind} {k}")
    ours = nb.get_state()["optimizer"]
    for k, v in after["optimizer"].items():
        assert np.abs(ours[k] - v).max() <= 1e-4 * max(np.abs(v).max(), 1e-30), k  # moments: like gradients


@pytest.mark.parametrize(("kind", "targets", "seed"), [("lora", "all", 0), ("dora", "q_proj,down_proj", 2**40 + 7)])
def test_same_seed_gives_the_mlx_initial_adapter(kind, targets, seed, tmp_path):
    from mlxpt.backends.numpy_backend import resolve_keys
    from mlxpt.config import AdapterConfig
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters, trainable

    path = make_variant(tmp_path / "m", "qwen3")
    ref, _ = load(str(path))
    apply_adapters(ref, AdapterConfig(fine_tune_type=kind, targets=targets, num_layers=2), seed=seed)
    expected = {k: np.array(v) for k, v in trainable(ref).items()}
    ours = Model.load(path)
    ours.add_adapters(kind, 2, 8, 2.0, 0.0, resolve_keys(targets), seed=seed)
    assert expected.keys() == ours.params.keys()
    for k, v in expected.items():
        if k.endswith(".m"):  # a float32 norm: summation order
            np.testing.assert_allclose(ours.params[k], v, rtol=1e-6)
        else:
            assert np.array_equal(ours.params[k], v), k


def test_targets_restrict_adapted_layers(tmp_path):
    path = make_variant(tmp_path / "m", "llama")
    mb, nb = paired_backends(path, "lora", targets="q_proj,down_proj")
    assert sorted(nb.model.adapters) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    nb.accumulate(batch())
    assert all(np.abs(g).max() > 0 for g in nb._grads.values())


@pytest.mark.parametrize("name", ["llama3-untied", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_finite_difference_gradients_float64(name, kind, tmp_path):
    """Central differences of the float64 loss agree with the analytic backward."""
    small = {"hidden_size": 32, "intermediate_size": 48, **({"head_dim": 8} if name == "qwen3" else {})}
    path = make_variant(tmp_path / name, name, **small)
    model = Model.load(path, dtype=np.float64)
    model.add_adapters(kind, 2, 3, 2.0, 0.0, None, seed=0)
    rng = np.random.default_rng(0)
    for k in model.params:
        model.params[k] = model.params[k] + 0.05 * rng.standard_normal(model.params[k].shape)
    inputs, targets, mask = batch(2, B=3, L=10)
    mask = mask.astype(np.float64)

    def loss():
        return float(sft_objective(model.token_logp(inputs, targets), mask)[0])

    keep: dict = {}
    logp = model.token_logp(inputs, targets, keep=keep)
    grads = model.backward(keep, sft_grad(logp, mask))
    eps = 1e-5
    for k, p in model.params.items():
        if kind == "dora" and not k.endswith(".m"):
            continue  # mlx-lm's DoRA stops the gradient through the norm: A, B are checked vs mx.grad
        for idx in [tuple(rng.integers(0, s) for s in p.shape) for _ in range(3)]:
            old = p[idx]
            p[idx] = old + eps
            up = loss()
            p[idx] = old - eps
            down = loss()
            p[idx] = old
            fd = (up - down) / (2 * eps)
            assert grads[k][idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), f"{name}/{kind} {k}{idx}"


def test_numpy_backend_never_imports_mlx(tmp_path):
    """Import, build and train one step in a fresh interpreter: `mlx` stays out of sys.modules."""
    path = make_variant(tmp_path / "m", "llama")
    code = f"""
import sys
import numpy as np
import mlxpt.backends.numpy_backend as nbk
from mlxpt.config import SFTConfig
from mlxpt.objectives import sft_objective
cfg = SFTConfig()
cfg.model.model = {str(path)!r}
cfg.train.backend = "numpy"
from mlxpt.backends import create_backend
b = create_backend("numpy", cfg.model, cfg.adapter, cfg.train, sft_objective)
x = np.arange(24, dtype=np.int32).reshape(2, 12) + 3
b.accumulate((x, x, np.ones(x.shape, np.float32)))
b.reduce()
b.apply(1e-3, 1.0)
bad = sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx.") or m.startswith("mlx_lm"))
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_numpy_sampler_seeded_and_filters():
    from mlxpt.backends.numpy_model import make_sampler

    logprobs = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    assert make_sampler()(logprobs).tolist() == [0]
    draws = lambda **kw: [int(s(logprobs)[0]) for s in [make_sampler(**kw)] for _ in range(200)]  # noqa: E731
    a, b = draws(temperature=1.0, seed=3), draws(temperature=1.0, seed=3)
    assert a == b and len(set(a)) == 4
    assert set(draws(temperature=1.0, top_k=2, seed=0)) == {0, 1}
    assert set(draws(temperature=1.0, top_p=0.7, seed=0)) == {0, 1}
    assert set(draws(temperature=1.0, min_p=0.4, seed=0)) == {0, 1}


# --- the shared runner with --backend numpy --------------------------------------------------


def sft_cfg(model_dir, data_dir, runs, **kw):
    from mlxpt.config import SFTConfig, apply_flat

    cfg = SFTConfig()
    base = {
        "model": str(model_dir),
        "data": str(data_dir),
        "runs_dir": str(runs),
        "steps": 6,
        "batch_size": 4,
        "max_seq_len": 256,
        "eval_every": 3,
        "eval_batches": 1,
        "save_every": 100,
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "num_layers": -1,
        "backend": "numpy",
    }
    apply_flat(cfg, {**base, **kw}, source="test")
    return cfg


def test_sft_run_on_numpy_backend_learns_and_saves_an_mlx_lm_adapter(tmp_path, data_dir):
    from mlxpt.train.sft import run_sft

    path = make_variant(tmp_path / "m", "llama")
    events = []
    run_dir, outcome = run_sft(sft_cfg(path, data_dir, tmp_path / "runs"), emit=events.append)
    assert outcome == "finished"
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert evals[-1] < evals[0]
    start = next(e for e in events if e["event"] == "start")
    assert start["backend"] == "numpy"
    from mlx_lm import load as mlx_load

    mlx_load(str(path), adapter_path=str(run_dir))  # the adapter folder is mlx-lm's format


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_on_numpy_backend_is_bit_identical(accum, tmp_path, data_dir):
    from mlxpt.runs import latest_checkpoint, load_checkpoint
    from mlxpt.train.sft import run_sft

    path = make_variant(tmp_path / "m", "llama")
    kw = {"steps": 7, "grad_accum": accum, "dropout": 0.1, "eval_every": 0}
    straight, _ = run_sft(sft_cfg(path, data_dir, tmp_path / "a", **kw))
    cfg = sft_cfg(path, data_dir, tmp_path / "b", **kw)
    part, outcome = run_sft(cfg, stop=StopAfter(3 * (accum + 1) + 1))
    assert outcome == "interrupted"
    resumed, outcome = run_sft(cfg, resume_dir=part)
    assert outcome == "finished"
    a, sa = load_checkpoint(latest_checkpoint(straight))
    b, sb = load_checkpoint(latest_checkpoint(resumed))
    assert sa["loop"] == {**sb["loop"], "elapsed": sa["loop"]["elapsed"]}
    for group in ("adapters", "optimizer", "rng"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert np.array_equal(a[group][k], b[group][k]), f"{group}/{k}"


def test_numpy_backend_refuses_qlora(tmp_path):
    from mlxpt.backends import create_backend
    from mlxpt.errors import ConfigError

    cfg = sft_cfg(make_variant(tmp_path / "m", "llama"), tmp_path, tmp_path, quantize="4")
    with pytest.raises(ConfigError):
        create_backend("numpy", cfg.model, cfg.adapter, cfg.train, sft_objective)
