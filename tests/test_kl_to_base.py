"""SFT with `--kl-to-base BETA` (issue 22): loss = NLL + BETA * KL(p_tuned || p_base) per trained token,
the base being the adapter-off pass, on tiny random models (fast).

The objective against hand-computed values and autodiff; `kl_to_reference` against KL computed in
NumPy from the base model's and the tuned model's logits; MLX and NumPy backends step for step;
the NumPy closed-form gradient against finite differences; the runner's wiring, refusal and CLI.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import tiny
from tiny import run_config

from mlxpt.backends.numpy_backend import AdamW, NumpyBackend, grad_of
from mlxpt.backends.numpy_model import Model
from mlxpt.config import AdapterConfig, SFTConfig
from mlxpt.errors import ConfigError
from mlxpt.objectives import GRADS, sft_grad, sft_kl_grad, sft_kl_objective, sft_objective

E550 = "E550: full fine-tuning has no adapter to switch off for the KL to the base (kl_to_base) - use lora/dora or --kl-to-base 0"


def batch(seed=0, B=3, L=20, V=272):
    """Random right-padded (inputs, targets, mask)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, V, (B, L)).astype(np.int32)
    targets = rng.integers(3, V, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.float32)
    mask[1, L - 6 :] = 0
    mask[2, : L // 3] = 0
    return inputs, targets, mask


def mlx_model(path):
    from pathlib import Path

    from mlx_lm.utils import load_model

    return load_model(Path(path))[0]


def kl_numpy(logits, base):
    """KL(softmax(logits) || softmax(base)) per position, in float64."""
    lp = logits.astype(np.float64)
    lq = base.astype(np.float64)
    lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq - lq.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lq.max(-1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def bump(params: dict, seed: int = 3, scale: float = 0.05) -> dict:
    """LoRA B / DoRA m moved away from the base, so the KL and its gradient are not zero."""
    rng = np.random.default_rng(seed)
    return {
        k: v + scale * rng.standard_normal(v.shape).astype(v.dtype)
        for k, v in params.items()
        if k.endswith(".lora_b") or k.endswith(".m")
    }


def paired(path, kind, beta, optimizer="adamw", compile=True):
    """MLX and NumPy backends in output="logp_kl" mode with the same initial adapter (the base)
    and the same moved adapter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models.adapters import apply_adapters

    objective = partial(sft_kl_objective, beta=beta)
    ref = mlx_model(path)
    apply_adapters(ref, AdapterConfig(fine_tune_type=kind, num_layers=2, rank=4, alpha=8.0), seed=0)
    mb = MLXBackend(ref, make_optimizer(optimizer), objective, compile=compile, output="logp_kl")
    initial = {k: np.array(v) for k, v in tree_flatten(ref.trainable_parameters())}
    ours = Model.load(path)
    ours.add_adapters(kind, 2, 4, 2.0, 0.0, None, seed=0)
    assert initial.keys() == ours.params.keys()
    ours.params.update(initial)  # DoRA's m agrees only to float32 rounding otherwise
    nb = NumpyBackend(ours, objective, grad_of(objective), AdamW(optimizer), output="logp_kl")
    moved = bump(initial)
    ref.load_weights([(k, mx.array(v)) for k, v in moved.items()], strict=False)
    nb._set_params(moved)
    return mb, nb


# --- the objective ---------------------------------------------------------------------------


def test_objective_and_its_gradient_match_hand_computed_values():
    logp = np.array([[-1.0, -2.0, -4.0], [-0.5, -3.0, -7.0]], np.float32)
    kl = np.array([[0.1, 0.2, 9.0], [0.3, 0.4, 9.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
    loss, weight, aux = sft_kl_objective((logp, kl), mask, beta=0.5)
    # NLL 1 + 2 + 0.5 + 3 = 6.5; KL 0.1 + 0.2 + 0.3 + 0.4 = 1.0; masked positions ignored
    assert float(loss) == pytest.approx(6.5 + 0.5 * 1.0)
    assert float(weight) == 4.0 and float(aux["kl"]) == pytest.approx(1.0)
    glogp, gkl = grad_of(partial(sft_kl_objective, beta=0.5))((logp, kl), mask)
    np.testing.assert_array_equal(glogp, -mask)
    np.testing.assert_array_equal(gkl, 0.5 * mask)
    assert GRADS[sft_kl_objective] is sft_kl_grad


def test_objective_gradient_equals_autodiff():
    import mlx.core as mx

    logp, kl = mx.array(np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)), mx.array([[0.3] * 5] * 2)
    mask = mx.array(np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], np.float32))
    ga, gb = mx.grad(lambda a, b: sft_kl_objective((a, b), mask, beta=0.7)[0], argnums=(0, 1))(logp, kl)
    ca, cb = sft_kl_grad((logp, kl), mask, beta=0.7)
    np.testing.assert_allclose(np.array(ga), np.array(ca), atol=1e-7)
    np.testing.assert_allclose(np.array(gb), np.array(cb), atol=1e-7)


# --- the KL itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_kl_to_reference_is_the_kl_between_base_and_tuned_logits(kind, tiny_dir):
    """Both backends against a direct computation from the base model's (no adapter at all)
    and the tuned model's logits."""
    import mlx.core as mx

    mb, nb = paired(tiny_dir, kind, beta=0.1)
    inputs, _, _ = batch(4)
    base = np.array(mlx_model(tiny_dir)(mx.array(inputs)))  # the model without any adapter
    mb.model.eval()
    expected = kl_numpy(np.array(mb.model(mx.array(inputs))), base)
    assert expected.min() > 1e-5  # the adapter moved: a KL of 0 would not test anything
    got_mlx, got_np = mb.kl_to_reference(inputs), nb.kl_to_reference(inputs)
    assert got_mlx.shape == got_np.shape == inputs.shape and got_mlx.dtype == got_np.dtype == np.float32
    np.testing.assert_allclose(got_mlx, expected, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(got_np, kl_numpy(nb.model.logits(inputs), Model.load(tiny_dir).logits(inputs)),
                               rtol=2e-3, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(got_np, expected, rtol=2e-3, atol=1e-6)
    # the base pass puts the tuned adapter back
    np.testing.assert_allclose(kl_numpy(np.array(mb.model(mx.array(inputs))), base), expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_kl_is_zero_at_initialisation(kind, tiny_dir):
    from mlxpt.backends import create_backend
    from mlxpt.config import SFTConfig

    cfg = SFTConfig()
    cfg.model.model, cfg.adapter.fine_tune_type = str(tiny_dir), kind
    inputs, targets, mask = batch(5)
    for name in ("mlx", "numpy"):
        b = create_backend(name, cfg.model, cfg.adapter, cfg.train, partial(sft_kl_objective, beta=1.0))
        assert np.abs(b.kl_to_reference(inputs)).max() < 1e-6, name
    mb, _ = paired(tiny_dir, kind, beta=1.0)
    mb.model.load_weights(mb._initial, strict=False)  # back to the adapter as created
    mb.accumulate((inputs, targets, mask))
    _, _, _, aux = mb.reduce()
    assert abs(aux["kl"]) < 1e-5


# --- MLX and NumPy backends, and the NumPy gradient ------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("tied", [True, False])
def test_mlx_and_numpy_agree_over_a_few_steps(kind, tied, tiny_dir, tmp_path):
    from mlx.utils import tree_flatten

    path = tiny_dir if tied else tiny.make_model(tmp_path / "untied", tie_word_embeddings=False)
    mb, nb = paired(path, kind, beta=2.0, optimizer="sgd")
    for step in range(3):
        b = batch(10 + step)
        mb.accumulate(b)
        nb.accumulate(b)
        if step == 0:
            ga = {k: np.array(v) for k, v in tree_flatten(mb._grads)}
            assert ga.keys() == nb._grads.keys()
            for k, g in ga.items():
                assert np.abs(g).max() > 0, f"{kind}: zero gradient {k}"
                err = np.abs(g - nb._grads[k]).max() / np.abs(g).max()
                assert err <= 1e-4, f"{kind} {k}: relative error {err:.2e}"
        (la, wa, na, aa), (lb, wb, nb_, ab) = mb.reduce(), nb.reduce()
        assert wa == wb and lb == pytest.approx(la, rel=1e-5) and nb_ == pytest.approx(na, rel=1e-4)
        assert aa["kl"] > 1e-3 and ab["kl"] == pytest.approx(aa["kl"], rel=1e-4)
        mb.apply(0.5, 1.0)
        nb.apply(0.5, 1.0)
    for k, v in mb.get_state()["adapters"].items():
        np.testing.assert_allclose(nb.model.params[k], v, rtol=0, atol=1e-5, err_msg=f"{kind} {k}")


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_kl_step_compiled_equals_uncompiled_and_reaches_every_adapter(kind, tiny_dir):
    from mlx.utils import tree_flatten

    grads = {}
    for compile in (False, True):
        mb, _ = paired(tiny_dir, kind, beta=5.0, compile=compile)
        mb.accumulate(batch(6))
        grads[compile] = ({k: np.array(v) for k, v in tree_flatten(mb._grads)}, mb.reduce())
    (a, ra), (b, rb) = grads[False], grads[True]
    assert ra[0] == pytest.approx(rb[0], rel=1e-6) and ra[3]["kl"] == pytest.approx(rb[3]["kl"], rel=1e-5)
    for k in a:
        assert np.abs(a[k]).max() > 0, f"zero gradient {k}"
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * np.abs(a[k]).max(), err_msg=k)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_numpy_kl_gradient_against_finite_differences_float64(kind, tmp_path):
    path = tiny.make_model(tmp_path / "small", hidden_size=32, intermediate_size=48)
    model = Model.load(path, dtype=np.float64)
    model.add_adapters(kind, 2, 3, 2.0, 0.0, None, seed=0)
    base = {k: v.copy() for k, v in model.params.items()}
    rng = np.random.default_rng(1)
    for k in model.params:
        model.params[k] = model.params[k] + 0.05 * rng.standard_normal(model.params[k].shape)
    inputs, targets, mask = batch(2, B=3, L=8)
    mask = mask.astype(np.float64)
    beta = 3.0

    def loss():
        return float(sft_kl_objective(model.token_logp_kl(inputs, targets, base), mask, beta=beta)[0])

    keep: dict = {}
    out = model.token_logp_kl(inputs, targets, base, keep=keep)
    assert out[1].min() > 0
    grads = model.backward(keep, *sft_kl_grad(out, mask, beta=beta))
    eps = 1e-5
    checked = 0
    for k, p in model.params.items():
        if kind == "dora" and not k.endswith(".m"):
            continue  # mlx-lm's DoRA stops the gradient through the norm: A, B are checked vs MLX
        for idx in [tuple(rng.integers(0, s) for s in p.shape) for _ in range(2)]:
            old = p[idx]
            p[idx] = old + eps
            up = loss()
            p[idx] = old - eps
            down = loss()
            p[idx] = old
            assert grads[k][idx] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8), f"{kind} {k}{idx}"
            checked += 1
    assert checked >= 6


def test_beta_zero_is_plain_sft(tiny_dir, data_dir, tmp_path):
    """kl_to_base 0 takes the plain path; and the KL path at beta 0 gives plain SFT's numbers."""
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.train.sft import SFT

    cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path)
    assert SFT.objective(cfg, "rows") is sft_objective and SFT.output(cfg) == "logp"
    cfg.reg.kl_to_base = 0.25
    assert SFT.output(cfg) == "logp_kl" and SFT.objective(cfg, "rows").keywords == {"beta": 0.25}
    mb, _ = paired(tiny_dir, "lora", beta=0.0)
    plain = MLXBackend(mb.model, make_optimizer("adamw"), sft_objective)
    b = batch(7)
    for backend in (mb, plain):
        backend.accumulate(b)
    ga, gb = ({k: np.array(v) for k, v in tree_flatten(x._grads)} for x in (mb, plain))
    (la, wa, _, aux), (lb, wb, _, _) = mb.reduce(), plain.reduce()
    assert la == pytest.approx(lb, rel=1e-6) and wa == wb and aux["kl"] > 0
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=0, atol=1e-6 * np.abs(gb[k]).max(), err_msg=k)
    _, nb = paired(tiny_dir, "lora", beta=0.0)
    keep: dict = {}
    logp = nb.model.token_logp(b[0], b[1], keep=keep)
    np.testing.assert_array_equal(logp, nb.model.token_logp_kl(b[0], b[1], nb._initial)[0])
    plain_np = nb.model.backward(keep, sft_grad(logp, b[2]))
    nb.accumulate(b)
    for k, g in plain_np.items():
        np.testing.assert_allclose(nb._grads[k], g, rtol=0, atol=1e-6 * np.abs(g).max(), err_msg=k)


# --- the runner --------------------------------------------------------------------------------


def adapter_kl(run_dir, cfg, inputs) -> float:
    """Mean KL to the base of a finished run's saved adapter, on `inputs`."""
    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models.adapters import ADAPTER_FILE, apply_adapters

    model = mlx_model(cfg.model.model)
    apply_adapters(model, cfg.adapter, seed=cfg.train.seed)
    backend = MLXBackend(model, make_optimizer("adamw"))
    model.load_weights(str(run_dir / ADAPTER_FILE), strict=False)
    return float(backend.kl_to_reference(inputs).mean())


def test_kl_to_base_keeps_a_run_closer_to_the_base(tiny_dir, data_dir, tmp_path):
    from mlxpt.data import collate, encode_all, load_splits
    from mlxpt.models import load
    from mlxpt.train.sft import run_sft

    results = {}
    for beta in (0.0, 20.0):
        cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path / f"b{beta}", kl_to_base=beta, eval_every=3,
                         eval_batches=1)  # fmt: skip
        events: list[dict] = []
        run_dir, outcome = run_sft(cfg, emit=events.append)
        assert outcome == "finished"
        steps = [e for e in events if e["event"] == "step"]
        evals = [e for e in events if e["event"] == "eval"]
        if beta:
            assert all("kl" in e for e in steps) and steps[0]["kl"] < 1e-6  # step 1 starts at the base
            assert all("val_kl" in e for e in evals) and evals[0]["val_kl"] == 0.0
        else:
            assert not any("kl" in e for e in steps) and not any("val_kl" in e for e in evals)
        results[beta] = (cfg, run_dir, evals[-1]["val_loss"])
    _, tok = load(str(tiny_dir))
    rows, _ = load_splits(str(data_dir))
    inputs = collate(encode_all(rows, tok, max_len=256)[0][:8], 0)[0]
    free, pulled = (adapter_kl(results[b][1], results[b][0], inputs) for b in (0.0, 20.0))
    assert free > 0.01 and pulled < 0.5 * free, (free, pulled)


def test_full_fine_tuning_is_refused_before_anything_is_read(tiny_dir, data_dir, tmp_path):
    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models.adapters import apply_adapters
    from mlxpt.train.sft import run_sft

    cfg = run_config(SFTConfig, tiny_dir, tmp_path / "no-such-data", tmp_path, fine_tune_type="full", kl_to_base=0.1)
    with pytest.raises(ConfigError) as e:
        run_sft(cfg)
    assert e.value.line() == E550
    assert not (tmp_path / "runs").exists()
    model = mlx_model(tiny_dir)
    config = apply_adapters(model, AdapterConfig(fine_tune_type="full", num_layers=1), seed=0)
    with pytest.raises(ConfigError, match="E550"):
        MLXBackend(model, make_optimizer("adamw"), adapter_config=config, output="logp_kl")
    with pytest.raises(ConfigError, match="E550"):
        MLXBackend(model, make_optimizer("adamw"), adapter_config=config).kl_to_reference(np.zeros((1, 4), np.int32))
    ours = Model.load(tiny_dir)
    ours.add_adapters("full", 1, 4, 2.0, 0.0, None, seed=0)
    with pytest.raises(ConfigError, match="E550"):
        NumpyBackend(ours, sft_objective, sft_grad, AdamW()).kl_to_reference(np.zeros((1, 4), np.int32))


def test_cli_lists_and_refuses_kl_to_base(tiny_dir, data_dir, tmp_path, capsys):
    from mlxpt.cli import main

    with pytest.raises(SystemExit):
        main(["train", "sft", "--help"])
    assert "--kl-to-base" in capsys.readouterr().out
    args = ["train", "sft", "--model", str(tiny_dir), "--data", str(data_dir), "--runs-dir", str(tmp_path / "runs")]
    assert main([*args, "--fine-tune-type", "full", "--kl-to-base", "0.1"]) == 1
    assert E550 in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_both_backends_train_with_kl_to_base_through_the_runner(tiny_dir, data_dir, tmp_path):
    """`--backend numpy --kl-to-base` reaches the NumPy backend's KL path (create_backend passes
    the output mode) and logs the same losses and KL as MLX."""
    from mlxpt.train.methods import run_method

    got = {}
    for backend in ("mlx", "numpy"):
        cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp_path / backend, steps=3, kl_to_base=1.0,
                         backend=backend, dropout=0.0)  # fmt: skip
        events: list = []
        run_method("sft", cfg, emit=events.append)
        got[backend] = [(e["loss"], e["kl"]) for e in events if e["event"] == "step"]
    assert len(got["numpy"]) == 3 and got["numpy"][-1][1] > 0
    np.testing.assert_allclose(np.array(got["numpy"]), np.array(got["mlx"]), rtol=2e-3, atol=1e-6)
