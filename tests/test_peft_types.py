"""Prefix tuning (`--fine-tune-type prefix`) and bottleneck adapters (`--fine-tune-type adapter`)
on tiny random models: MLX vs NumPy loss and gradients, the zero-init adapter's step 0, the prefix
under mlx-lm's KV cache (incremental and batched decode equal the full forward), save and reload,
a few SFT steps, fuse refused, and bad settings refused before anything is written."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_numpy_backend import batch, make_variant, mlx_model
from tiny import run_config

from mlxpt.config import AdapterConfig, SFTConfig
from mlxpt.errors import ConfigError

CASES = {  # name: (fine_tune_type, AdapterConfig settings)
    "prefix": ("prefix", {"prefix_length": 3}),
    "prefix-mlp": ("prefix", {"prefix_length": 3, "prefix_projection": 8}),
    "adapter": ("adapter", {"adapter_size": 4}),
}


def _cfg(name: str, num_layers: int = 2) -> AdapterConfig:
    kind, kw = CASES[name]
    return AdapterConfig(fine_tune_type=kind, num_layers=num_layers, **kw)


def paired(path, name: str, model_type: str):
    """MLX and NumPy backends with the same adapter; zero-initialised arrays bumped so every gradient is nonzero."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.backends.numpy_backend import AdamW, NumpyBackend
    from mlxpt.backends.numpy_model import Model
    from mlxpt.models.adapters import apply_adapters
    from mlxpt.models.peft import parameters_of
    from mlxpt.objectives import sft_grad, sft_objective

    cfg = _cfg(name)
    ref = mlx_model(path)
    apply_adapters(ref, cfg, seed=5)
    ours = Model.load(path)
    ours.add_adapters(cfg.fine_tune_type, 2, 8, 2.0, 0.0, None, seed=5, peft=parameters_of(cfg))
    start = {k: np.array(v) for k, v in tree_flatten(ref.trainable_parameters())}
    assert start.keys() == ours.params.keys()
    for k, v in start.items():  # the same seed draws the same initial adapter on both backends
        assert np.array_equal(ours.params[k], v), f"{model_type}/{name}: initial {k}"
    rng = np.random.default_rng(3)
    bumped = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
    ref.load_weights([(k, mx.array(v)) for k, v in bumped.items()], strict=False)
    mx.eval(ref.parameters())
    nb = NumpyBackend(ours, sft_objective, sft_grad, AdamW("adamw", 0.01))
    nb._set_params(bumped)
    return MLXBackend(ref, make_optimizer("adamw", 0.01), compile=False), nb


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("name", list(CASES))
def test_mlx_and_numpy_give_the_same_loss_and_gradients(name, model_type, tmp_path):
    from mlx.utils import tree_flatten

    mb, nb = paired(make_variant(tmp_path / "m", model_type), name, model_type)
    b = batch(1)
    mb.accumulate(b)
    nb.accumulate(b)
    ga = {k: np.array(v) for k, v in tree_flatten(mb._grads)}
    assert ga.keys() == nb._grads.keys()
    for k, g in ga.items():
        assert np.abs(g).max() > 0, f"{name}: zero gradient {k}"
        err = np.abs(g - nb._grads[k]).max()
        assert err <= 1e-5 * max(1.0, np.abs(g).max()), f"{model_type}/{name} {k}: error {err:.2e}"
    (la, wa, _, _), (lb, wb, _, _) = mb.reduce(), nb.reduce()
    assert wa == wb and abs(la - lb) <= 1e-5 * max(1.0, abs(la))


@pytest.mark.parametrize("name", ["prefix-mlp", "adapter"])
def test_numpy_backward_matches_finite_differences(name, tmp_path):
    """The hand-written backward of the new modules on its own, in float64."""
    from mlxpt.backends.numpy_model import Model
    from mlxpt.models.peft import parameters_of
    from mlxpt.objectives import sft_grad, sft_objective

    path = make_variant(tmp_path / "m", "llama", hidden_size=32, intermediate_size=48)
    model = Model.load(path, dtype=np.float64)
    cfg = _cfg(name, num_layers=1)
    model.add_adapters(cfg.fine_tune_type, 1, 8, 2.0, 0.0, None, seed=0, peft=parameters_of(cfg))
    rng = np.random.default_rng(0)
    for k in model.params:
        model.params[k] = model.params[k] + 0.05 * rng.standard_normal(model.params[k].shape)
    inputs, targets, mask = batch(2, B=3, L=9)
    mask = mask.astype(np.float64)

    def loss():
        return float(sft_objective(model.token_logp(inputs, targets), mask)[0])

    keep: dict = {}
    grads = model.backward(keep, sft_grad(model.token_logp(inputs, targets, keep=keep), mask))
    for k, p in model.params.items():
        idx = tuple(rng.integers(0, s) for s in p.shape)
        old = p[idx]
        p[idx] = old + 1e-5
        up = loss()
        p[idx] = old - 1e-5
        down = loss()
        p[idx] = old
        assert grads[k][idx] == pytest.approx((up - down) / 2e-5, rel=1e-4, abs=1e-8), k


def test_adapter_step_zero_equals_the_base_and_prefix_does_not(tiny_dir):
    import mlx.core as mx

    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters

    x = mx.array([[5, 6, 7, 8, 9, 10]])
    base, _ = load(str(tiny_dir))
    want = base(x)
    for name in ("adapter", "prefix"):
        model, _ = load(str(tiny_dir))
        apply_adapters(model, _cfg(name))
        same = bool(mx.array_equal(model(x), want).item())
        assert same == (name == "adapter"), name  # a prefix is never a no-op (documented)


@pytest.mark.parametrize("name", ["prefix", "prefix-mlp"])
def test_prefix_incremental_and_batched_decode_equal_the_full_forward(name, tiny_dir):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlxpt.decode.batch import generate_groups
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters

    model, tokenizer = load(str(tiny_dir))
    apply_adapters(model, _cfg(name), seed=1)
    prompt = [5, 6, 7, 8]
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    greedy = []
    for _ in range(8):  # greedy, one token at a time through the KV cache
        greedy.append(int(mx.argmax(logits, -1).item()))
        logits = model(mx.array([[greedy[-1]]]), cache=cache)[:, -1]
    full = model(mx.array([prompt + greedy]))[0, len(prompt) - 1 : -1]
    assert mx.argmax(full, -1).tolist() == greedy
    np.testing.assert_allclose(np.array(logits[0]), np.array(model(mx.array([prompt + greedy]))[0, -1]), atol=1e-4)
    # the batched sampler (two prompts of other lengths, left-padded into one cache) agrees too
    groups = generate_groups(model, tokenizer, [[9, 10, *prompt], prompt], n=2, max_tokens=8)
    for c in groups[1]:
        assert c.tokens == greedy[: len(c.tokens)] and len(c.tokens) >= 1


@pytest.mark.parametrize(
    ("name", "backend"), [("prefix-mlp", "mlx"), ("adapter", "mlx"), ("prefix", "numpy"), ("adapter", "numpy")]
)
def test_sft_lowers_the_loss_saves_and_reloads(name, backend, tiny_dir, data_dir, pref_dir, tmp_path):
    import mlx.core as mx

    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters, read_adapter_config
    from mlxpt.models.chaining import adopt_settings
    from mlxpt.train.sft import run_sft

    kind, extra = CASES[name]
    cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path, fine_tune_type=kind, backend=backend, **extra)
    cfg.train.steps, cfg.train.eval_every = 6, 6
    events: list = []
    run_dir, outcome = run_sft(cfg, emit=events.append)
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert outcome == "finished" and evals[-1] < evals[0], (name, backend, evals)
    saved = read_adapter_config(run_dir)
    assert saved["fine_tune_type"] == kind
    # reload (generate/eval's path) gives the trained model; so does rebuilding + loading the arrays
    model, _ = load(str(tiny_dir), adapter=str(run_dir))
    again, _ = load(str(tiny_dir))
    chained = AdapterConfig()
    assert adopt_settings(chained, saved, "--from")  # `--from RUN` takes the adapter's type and shape
    apply_adapters(again, chained)
    again.load_weights(str(run_dir / "adapters.safetensors"), strict=False)
    x = mx.array([[5, 6, 7, 8, 9]])
    np.testing.assert_allclose(np.array(model(x)), np.array(again(x)), atol=1e-5)
    if backend == "mlx":  # another method `--from` this run: it takes the type, starts there (DPO loss log 2)
        from mlxpt.config import DPOConfig
        from mlxpt.train.dpo import run_dpo

        dpo = run_config(
            DPOConfig, tiny_dir, pref_dir, tmp_path / "dpo", from_run=str(run_dir), steps=1, eval_batches=0
        )
        events = []
        _, outcome = run_dpo(dpo, emit=events.append)
        first = next(e for e in events if e["event"] == "step")
        assert outcome == "finished" and dpo.adapter.fine_tune_type == kind
        assert first["loss"] == pytest.approx(np.log(2), abs=1e-4)


def test_fuse_is_refused_with_one_line(tiny_dir, tmp_path):
    from mlxpt.fuse import fuse
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters, save_adapter

    for name, code in (("prefix", "E764"), ("adapter", "E765")):
        model, _ = load(str(tiny_dir))
        folder = tmp_path / name
        folder.mkdir()
        save_adapter(folder, model, apply_adapters(model, _cfg(name)))
        with pytest.raises(ConfigError, match=code) as e:
            fuse(folder, tmp_path / f"{name}-fused", model=str(tiny_dir))
        assert "\n" not in e.value.line()
        assert not (tmp_path / f"{name}-fused").exists()


def test_from_a_prefix_run_an_explicit_default_that_contradicts_it_is_refused(tiny_dir, data_dir, tmp_path):
    """`--from <prefix adapter> --fine-tune-type lora` is refused (E575) like `--from <LoRA> --fine-tune-type
    prefix`, though lora is the default: a setting the person gave (flag or YAML) is never overridden."""
    from mlxpt.config import build_config
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters, save_adapter
    from mlxpt.train import chain

    model, _ = load(str(tiny_dir))
    folder = tmp_path / "prefix-adapter"
    folder.mkdir()
    save_adapter(folder, model, apply_adapters(model, _cfg("prefix")))
    base = {"model": str(tiny_dir), "data": str(data_dir), "runs_dir": str(tmp_path / "runs"), "from_run": str(folder)}
    cfg = build_config("sft", base)  # nothing given: the source's shape is taken
    assert chain.prepare(cfg, None).adopted == ["fine_tune_type=prefix", "num_layers=2", "prefix_length=3"]
    yaml = tmp_path / "lora.yaml"
    yaml.write_text("fine_tune_type: lora\n")
    for flags, path in (({"fine_tune_type": "lora"}, None), ({"prefix_length": "16"}, None), ({}, str(yaml))):
        cfg = build_config("sft", {**base, **flags}, path)
        with pytest.raises(ConfigError, match="E575: (fine_tune_type=lora|prefix_length=16) does not match") as e:
            chain.prepare(cfg, None)
        assert "\n" not in e.value.line()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"fine_tune_type": "prefix", "prefix_length": 0}, "prefix_length=0"),
        ({"fine_tune_type": "adapter", "adapter_size": 0}, "adapter_size=0"),
        ({"fine_tune_type": "prefix", "prefix_projection": -1}, "prefix_projection=-1"),
        ({"fine_tune_type": "prefixes"}, "not one of"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(flags, match, tiny_dir, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=match) as e:
        run_config(SFTConfig, tiny_dir, data_dir, tmp_path, **flags)
    assert "\n" not in e.value.line()
    assert not (tmp_path / "runs").exists()


def test_prefix_on_an_unsupported_model_type_is_refused(tiny_dir, data_dir, tmp_path, monkeypatch):
    from mlxpt.models import prefix
    from mlxpt.train.sft import run_sft

    monkeypatch.setattr(prefix, "SUPPORTED", ("qwen3",))  # the tiny Llama stands in for an unsupported type
    cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path, fine_tune_type="prefix")
    with pytest.raises(ConfigError, match="E760.*'llama'.*qwen3") as e:
        run_sft(cfg)
    assert "\n" not in e.value.line()
    assert not any((tmp_path / "runs").glob("*/config.json"))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_new_run_form_offers_the_types_and_their_fields(tmp_path, tiny_dir, data_dir):
    """The form is generated from the config fields: the two types are choices of fine_tune_type,
    each with its own fields (help text naming the type), and a prefix run's command line carries them."""
    from app.main import create_app
    from app.screens.new_run import NewRunScreen

    app = create_app(tmp_path / "runs", poll_runs=False)
    async with app.run_test(size=(100, 40)) as pilot:
        screen = NewRunScreen("sft", {"model": str(tiny_dir), "data": str(data_dir)})  # no default model loaded
        await app.push_screen(screen)
        await pilot.pause()
        kind = screen.query_one("#f-fine_tune_type")
        assert {"prefix", "adapter"} <= {str(v) for _, v in kind._options}
        for name, owner in (("prefix_length", "prefix"), ("prefix_projection", "prefix"), ("adapter_size", "adapter")):
            assert re.match(rf"{name}( \(blank: [^)]*\))?: {owner}:", screen.query_one(f"#f-{name}").help_text)
        kind.value = "prefix"
        screen.query_one("#f-prefix_length").value = "8"
        await pilot.pause(0.6)  # the form's debounce: let its validation and memory workers finish
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        line = str(screen.query_one("#cli-line").render())
        assert "--fine-tune-type prefix" in line and "--prefix-length 8" in line, line
