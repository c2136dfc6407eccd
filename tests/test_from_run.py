"""Chaining (`mlxpt train <method> --from RUN`): a run starts from an earlier run's adapter, its
reference is that starting model, its folder records the lineage, and bad sources are refused
before any weights are read (tiny model, both backends)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import tiny
from tiny import run_config

from mlxpt.config import DPOConfig, GRPOConfig, SFTConfig, apply_flat, build_config
from mlxpt.errors import ConfigError, MlxptError

BACKENDS = ("mlx", "numpy")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sft_runs(tiny_dir, data_dir, tmp_path_factory):
    """One finished 4-step SFT run per backend (rank 4, alpha 8: not the defaults)."""
    from mlxpt.train.sft import run_sft

    out = {}
    for backend in BACKENDS:
        tmp = tmp_path_factory.mktemp(f"sft-{backend}")
        cfg = run_config(SFTConfig, tiny_dir, data_dir, tmp, steps=4, rank=4, alpha=8.0, backend=backend)
        out[backend], outcome = run_sft(cfg)
        assert outcome == "finished"
    return out


def _dpo_cfg(tiny_dir, pref_dir, tmp_path, **kw):
    return run_config(DPOConfig, tiny_dir, pref_dir, tmp_path, **kw)


def _sft_model_logps(backend: str, tiny_dir, sft_dir, pairs, pad_id):
    """Summed response log-probs of `pairs` under base + the SFT run's adapter, loaded the usual way
    (MLX: mlx-lm's adapter loader through models.load; NumPy: load_adapter_weights)."""
    from mlxpt.train.dpo import collate_pairs

    inputs, targets, mask, _, _ = collate_pairs(pairs, pad_id)
    if backend == "mlx":
        import mlx.core as mx

        from mlxpt.backends.mlx_backend import token_logp
        from mlxpt.models.loader import load

        model, _ = load(str(tiny_dir), adapter=str(sft_dir))
        model.eval()
        logp = np.array(token_logp(model, mx.array(inputs), mx.array(targets)))
    else:
        from mlxpt.backends.numpy_backend import create_numpy_backend
        from mlxpt.config import ModelConfig, TrainConfig

        b = create_numpy_backend(ModelConfig(model=str(tiny_dir)), _sft_adapter_cfg(), TrainConfig(), None)
        b.load_adapter_weights(sft_dir)
        logp = b.token_logps(inputs, targets)
    seq = (logp * mask).sum(1)
    n = len(pairs)
    return seq[:n], seq[n:]


def _sft_adapter_cfg():
    from mlxpt.config import AdapterConfig

    return AdapterConfig(rank=4, alpha=8.0, num_layers=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_from_an_sft_run_starts_at_it_and_uses_it_as_reference(backend, sft_runs, tiny_dir, pref_dir, tmp_path):
    from safetensors.numpy import load_file

    from mlxpt.data.encode import pad_id_of
    from mlxpt.models.chaining import START_FILE
    from mlxpt.models.loader import load_tokenizer
    from mlxpt.train.dpo import REFERENCE_FILE, prepare_data, run_dpo

    sft_dir = sft_runs[backend]
    events = []
    # rank/alpha left at their defaults: taken from the SFT adapter (4, 8.0)
    cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, steps=2, backend=backend, from_run=str(sft_dir), eval_batches=0)
    run_dir, outcome = run_dpo(cfg, emit=events.append)
    assert outcome == "finished"
    # the reference is the SFT model: the cached log-probs are its log-probs
    tok = load_tokenizer(str(tiny_dir))
    train, _, _ = prepare_data(cfg, tok)
    ref = load_file(str(run_dir / REFERENCE_FILE))
    want_c, want_r = _sft_model_logps(backend, tiny_dir, sft_dir, train[:8], pad_id_of(tok))
    np.testing.assert_allclose(ref["train_chosen"][:8], want_c, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ref["train_rejected"][:8], want_r, rtol=1e-4, atol=1e-3)
    # ... and the policy starts there: step 1's loss is log 2, its margins 0
    step1 = next(e for e in events if e["event"] == "step")
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert step1["margin"] == pytest.approx(0.0, abs=1e-3)
    # lineage: the source, its sha256, a copy of its bytes; the adapter's shape taken from it
    saved = json.loads((run_dir / "config.json").read_text())
    lin = saved["lineage"]
    assert saved["adapter"]["from_run"] == str(sft_dir.resolve())
    assert lin["sha256"] == sha(sft_dir / "adapters.safetensors") == sha(run_dir / START_FILE)
    assert (lin["run"], lin["method"], lin["step"], lin["status"]) == (sft_dir.name, "sft", 4, "finished")
    assert saved["adapter"]["rank"] == 4 and saved["adapter"]["alpha"] == 8.0
    assert saved["adapter_config"]["lora_parameters"]["rank"] == 4
    start = next(e for e in events if e["event"] == "start")
    assert start["from_run"] == str(sft_dir.resolve()) and "rank=4" in start["adopted"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_starting_model_is_the_sft_model(backend, sft_runs, tiny_dir, pref_dir, tmp_path):
    """Step 0 of a --from run (the backend as the runner builds it) scores and generates exactly as
    the SFT run's adapter does when loaded for generation."""
    from mlxpt.backends import create_backend
    from mlxpt.train import chain as chaining

    sft_dir = sft_runs[backend]
    cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, backend=backend, from_run=str(sft_dir))
    ch = chaining.prepare(cfg, None)
    b = create_backend(backend, cfg.model, cfg.adapter, cfg.train)
    b.start_from(chaining.start_arrays(ch))
    assert b.at_start()
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 200, size=(2, 24))
    targets = np.roll(inputs, -1, axis=1)
    got = b.token_logps(inputs, targets)
    ref = b.token_logps(inputs, targets, reference=True)
    np.testing.assert_array_equal(got, ref)  # the reference is the starting model
    if backend == "mlx":
        import mlx.core as mx

        from mlxpt.backends.mlx_backend import token_logp
        from mlxpt.decode.batch import generate_many
        from mlxpt.models.loader import load

        model, tok = load(str(tiny_dir), adapter=str(sft_dir))
        model.eval()
        b.model.eval()
        want = np.array(token_logp(model, mx.array(inputs), mx.array(targets)))
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.array(b.model(mx.array(inputs))), np.array(model(mx.array(inputs))), atol=1e-5)
        prompt = [tok.encode("What is 2 + 3?")]
        mine = generate_many(b.model, tok, prompt, 12)[0].tokens
        theirs = generate_many(model, tok, prompt, 12)[0].tokens
        assert mine == theirs  # 12 greedy tokens
    else:
        from mlxpt.backends.numpy_backend import create_numpy_backend

        other = create_numpy_backend(cfg.model, _sft_adapter_cfg(), cfg.train, None)
        other.load_adapter_weights(sft_dir)
        np.testing.assert_allclose(got, other.token_logps(inputs, targets), atol=1e-6)
        base = create_numpy_backend(cfg.model, _sft_adapter_cfg(), cfg.train, None)
        assert not np.allclose(got, base.token_logps(inputs, targets), atol=1e-4)  # the SFT run moved it
        assert np.allclose(b.kl_to_reference(inputs), other.kl_to_reference(inputs), atol=1e-6)  # KL: to the base


def test_grpo_from_an_sft_run_starts_there_with_it_as_kl_reference(sft_runs, tiny_dir, tmp_path):
    from mlxpt.train.grpo import run_grpo

    (tmp_path / "p").mkdir()
    prompts = tiny.write_prompt_dir(tmp_path / "p", train=(4, 1), test=(2, 2))
    flat = {"steps": 2, "batch_size": 2, "num_generations": 4, "max_completion_length": 8, "rewards": "format",
            "beta": 0.1, "log_completions_every": 0, "from_run": str(sft_runs["mlx"]), "warmup_steps": 10}  # fmt: skip
    events = []
    run_dir, outcome = run_grpo(run_config(GRPOConfig, tiny_dir, prompts, tmp_path, **flat), emit=events.append)
    assert outcome == "finished"
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the KL reference is the SFT model, not the base
    assert json.loads((run_dir / "config.json").read_text())["lineage"]["method"] == "sft"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[0]["message"].startswith("step 1: sampling group 1/1")
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("warming up over 1 steps" in w for w in warnings)  # 10 warm-up steps of a 2-step run
    # the format reward of a random tiny model: 0 for every completion, said once
    assert sum("every group had equal rewards" in w for w in warnings) == 1


def test_warmup_is_at_most_half_the_run():
    from mlxpt.config import TrainConfig
    from mlxpt.train.loop import lr_at

    cfg = TrainConfig(steps=8, warmup_steps=10, learning_rate=1.0, schedule="constant")
    assert [lr_at(i, cfg) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_resume_starts_from_the_run_s_own_copy(sft_runs, tiny_dir, pref_dir, tmp_path):
    from test_train import StopAfter

    from mlxpt.models.chaining import START_FILE
    from mlxpt.train.dpo import run_dpo

    source = tmp_path / "source"
    shutil.copytree(sft_runs["numpy"], source)
    cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, steps=3, backend="numpy", from_run=str(source), save_every=1)
    run_dir, outcome = run_dpo(cfg, stop=StopAfter(3))
    assert outcome == "interrupted"
    shutil.rmtree(source)  # the source may go: the run keeps its own copy
    saved = json.loads((run_dir / "config.json").read_text())
    resumed_cfg = build_config("dpo", {}, resume=str(run_dir), resume_config=saved)
    _, outcome = run_dpo(resumed_cfg, resume_dir=run_dir)
    assert outcome == "finished"
    with pytest.raises(ConfigError, match="E510"):  # --from is fixed on resume
        build_config("dpo", {"from_run": str(tmp_path)}, resume=str(run_dir), resume_config=saved)
    (run_dir / START_FILE).write_bytes(b"changed")
    with pytest.raises(ConfigError, match="E578"):
        run_dpo(resumed_cfg, resume_dir=run_dir)


def test_mlx_lm_adapter_folder_and_settings_that_contradict_it(sft_runs, tiny_dir, pref_dir, tmp_path):
    from mlxpt.train import chain as chaining

    folder = tmp_path / "mlx-lm-adapter"
    folder.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(sft_runs["mlx"] / name, folder / name)
    cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, from_run=str(folder))
    ch = chaining.prepare(cfg, None)
    assert ch.lineage["run"] is None and (cfg.adapter.rank, cfg.adapter.alpha) == (4, 8.0)
    cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, from_run=str(folder), rank=16)
    with pytest.raises(ConfigError, match=r"E575: rank=16 does not match the --from adapter's rank=4"):
        chaining.prepare(cfg, None)
    cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, from_run=str(folder), fine_tune_type="dora")
    with pytest.raises(ConfigError, match="E575: fine_tune_type=dora"):
        chaining.prepare(cfg, None)


def test_bad_sources_are_refused_before_any_weights(sft_runs, tiny_dir, pref_dir, tmp_path, data_dir):
    from mlxpt.train.dpo import run_dpo

    def refused(code, from_run, **kw):
        cfg = _dpo_cfg(tiny_dir, pref_dir, tmp_path, from_run=str(from_run), **kw)
        with pytest.raises(MlxptError, match=code):
            run_dpo(cfg)
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder

    refused("E570", tmp_path / "missing")
    refused("E571", sft_runs["mlx"] / "adapters.safetensors")
    (tmp_path / "empty").mkdir()
    refused("E221", tmp_path / "empty")
    refused("E576", sft_runs["mlx"].parent)  # the folder of runs
    refused("E576", sft_runs["mlx"].parent, runs_dir=str(sft_runs["mlx"].parent))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sft_runs["mlx"], unfinished)
    (unfinished / "adapters.safetensors").unlink()
    (unfinished / "status.json").write_text(json.dumps({"status": "running", "step": 0}))
    refused("E572", unfinished)
    other = tmp_path / "other-model"
    tiny.make_model(other, hidden_size=32, intermediate_size=64)
    cfg = run_config(SFTConfig, other, data_dir, tmp_path / "o", steps=1, rank=4, alpha=8.0)
    from mlxpt.train.sft import run_sft

    other_run, _ = run_sft(cfg)
    with pytest.raises(ConfigError, match="E577"):  # shapes that do not fit: refused at load, no folder
        run_dpo(_dpo_cfg(tiny_dir, pref_dir, tmp_path / "x", from_run=str(other_run)))
    assert not (tmp_path / "x" / "runs").exists() or not any((tmp_path / "x" / "runs").iterdir())
    with pytest.raises(ConfigError, match="E574"):  # full fine-tuning has no adapter to start from
        apply_flat(DPOConfig(), {"from_run": str(sft_runs["mlx"]), "fine_tune_type": "full"}, "test")
