"""GRPO: advantages and every loss type on hand-computed inputs, clipping at the band edges, the
closed-form gradients against mx.grad, prompt data errors, batched sampling, and runs on the
tiny model (every parameter moves, exact resume, a user reward file from the CLI)."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import tiny
from test_train import StopAfter, _load_state

from mlxpt.config import GRPOConfig
from mlxpt.errors import ConfigError, DataError
from mlxpt.objectives import GRADS, grpo_grad, grpo_objective
from mlxpt.train.rollouts import group_advantages

EMPTY = np.zeros((0,), np.float32)


def f32(*rows):
    """float32 array of one value/list, or of several rows."""
    return np.array(rows[0] if len(rows) == 1 else rows, dtype=np.float32)


def test_group_advantages_by_hand():
    r = f32([1, 0, 0, 1], [1, 1, 1, 1])
    adv, zero = group_advantages(r, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 1/3: the unbiased variance of (1, 0, 0, 1)
    np.testing.assert_allclose(adv[0], [a, -a, -a, a], rtol=1e-6)
    np.testing.assert_array_equal(adv[1], 0)
    assert zero.tolist() == [False, True]
    np.testing.assert_allclose(group_advantages(r, "none")[0][0], [0.5, -0.5, -0.5, 0.5])
    bstd = np.std(r, ddof=1)
    np.testing.assert_allclose(
        group_advantages(r, "batch")[0][0], np.array([0.5, -0.5, -0.5, 0.5]) / (bstd + 1e-4), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("loss_type", "loss", "weight"),
    [("grpo", -2.0, 1.0), ("dapo", -4.0, 2.0), ("dr_grpo", -1.0, 1.0), ("bnpo", -2.0, 1.0)],
)
def test_each_loss_type_by_hand(loss_type, loss, weight):
    # one completion of 2 tokens (a third position is padding), advantage 2, ratio 1: per token -2
    logp, mask = f32([-1.0, -2.0, -5.0]), f32([1, 1, 0])
    got, w, aux = grpo_objective(
        logp[None], mask[None], f32([2.0]), EMPTY, EMPTY, loss_type=loss_type, max_completion_length=4
    )
    assert float(got) == pytest.approx(loss) and float(w) == pytest.approx(weight)
    assert "kl" not in aux and float(aux["clip_fraction"]) == 0.0


def test_clipping_at_the_band_edges():
    eps, eps_hi = 0.2, 0.28

    def one(ratio, adv):
        logp = f32([-1.0])[None]
        old = logp - np.log(np.float32(ratio))
        loss, _, aux = grpo_objective(logp, f32([1])[None], f32([adv]), old, EMPTY, epsilon=eps, epsilon_high=eps_hi)
        g = grpo_grad(logp, f32([1])[None], f32([adv]), old, EMPTY, epsilon=eps, epsilon_high=eps_hi)
        return float(loss), float(g[0, 0]), float(aux["clip_fraction"])

    loss, g, clip = one(1.5, 1.0)  # above the band, positive advantage: clipped, no gradient
    assert loss == pytest.approx(-1.28) and g == 0.0 and clip == 1.0
    loss, g, clip = one(1.5, -1.0)  # above the band, negative advantage: the unclipped term is the min
    assert loss == pytest.approx(1.5, rel=1e-5) and g == pytest.approx(1.5, rel=1e-5) and clip == 0.0
    loss, g, clip = one(0.5, -1.0)  # below the band, negative advantage: clipped at 1 - eps
    assert loss == pytest.approx(0.8) and g == 0.0 and clip == 1.0
    for inside in (1.0 + eps_hi - 1e-3, 1.0 - eps + 1e-3):  # just inside: gradient -A·ratio
        loss, g, clip = one(inside, 1.0)
        assert g == pytest.approx(-inside, rel=1e-4) and clip == 0.0


def test_kl_term_and_beta_zero():
    logp = f32([-1.0, -2.0])[None]
    ref = logp + 0.5
    k3 = math.exp(0.5) - 0.5 - 1
    loss, _, aux = grpo_objective(logp, f32([1, 1])[None], f32([0.0]), EMPTY, ref, beta=0.1)
    assert float(loss) == pytest.approx(0.1 * k3, rel=1e-5) and float(aux["kl"]) == pytest.approx(k3, rel=1e-5)
    loss0, _, aux0 = grpo_objective(logp, f32([1, 1])[None], f32([0.0]), EMPTY, ref, beta=0.0)
    assert float(loss0) == 0.0 and "kl" not in aux0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("variant", ["mu1_nokl", "old_and_kl"])
def test_closed_form_gradient_matches_autodiff(loss_type, variant):
    assert GRADS[grpo_objective] is grpo_grad
    rng = np.random.default_rng(3)
    N, L = 6, 7
    logp = rng.normal(-2, 0.6, (N, L)).astype(np.float32)
    mask = (rng.random((N, L)) > 0.3).astype(np.float32)
    adv = rng.normal(0, 1, N).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (N, L))).astype(np.float32) if variant == "old_and_kl" else EMPTY
    ref = (logp + rng.normal(0, 0.3, (N, L))).astype(np.float32) if variant == "old_and_kl" else EMPTY
    kw = {"loss_type": loss_type, "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.05, "max_completion_length": 9}

    def f(lp):
        return grpo_objective(lp, mx.array(mask), mx.array(adv), mx.array(old), mx.array(ref), **kw)[0]

    np.testing.assert_allclose(
        grpo_grad(logp, mask, adv, old, ref, **kw), np.array(mx.grad(f)(mx.array(logp))), atol=1e-6
    )
    assert float(grpo_objective(logp, mask, adv, old, ref, **kw)[0]) == pytest.approx(
        f(mx.array(logp)).item(), rel=1e-5, abs=1e-5
    )


# -- prompt data ---------------------------------------------------------------------------


def test_prompt_data_errors_name_their_lines(tmp_path):
    from mlxpt.data.prompts import load_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "What is 2+2?", "answer": "4"}),
                json.dumps({"question": "x"}),
                json.dumps({"prompt": 5, "answer": "1"}),
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                        "answer": "1",
                    }
                ),
                json.dumps({"prompt": "no answer"}),
                "{broken",
                json.dumps(
                    {
                        "messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
                        "answer": "5",
                    }
                ),
            ]
        )
    )
    with pytest.raises(DataError) as e:
        load_prompts(f, require=("answer",))
    found = {(err.code, err.where.rsplit(":", 1)[1]) for err in e.value.errors}
    assert found == {("E171", "2"), ("E172", "3"), ("E174", "4"), ("E173", "5"), ("E105", "6")}
    g = tmp_path / "ok.jsonl"
    g.write_text(f.read_text().splitlines()[0] + "\n" + f.read_text().splitlines()[6] + "\n")
    rows, _ = load_prompts(g, require=("answer",))
    assert [r.messages[-1]["content"] for r in rows] == ["What is 2+2?", "2+3?"]  # SFT rows lose their reply
    assert rows[1].fields == {"answer": "5"}


def test_overlong_prompts_are_dropped_or_refused(tmp_path, tiny_dir):
    from mlxpt.data.prompts import encode_prompts, load_prompts
    from mlxpt.models.loader import load_tokenizer

    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "word " * 200, "answer": "1"}) + "\n" + json.dumps({"prompt": "hi", "answer": "1"}) + "\n"
    )
    rows, _ = load_prompts(f)
    tok = load_tokenizer(str(tiny_dir))
    kept, report = encode_prompts(rows, tok, 128, 32, "drop")
    assert len(kept) == 1 and report["dropped_overlong"] == 1
    with pytest.raises(DataError) as e:
        encode_prompts(rows, tok, 128, 32, "error")
    assert e.value.code == "E175" and e.value.where.endswith(":1")
    with pytest.raises(DataError) as e:
        encode_prompts(rows, tok, 32, 32, "drop")
    assert e.value.code == "E176"


# -- batched sampling ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from mlxpt.models.loader import load

    return load(str(tiny_dir))


def test_batched_group_matches_single_stream_and_model_logprobs(tiny_model):
    from mlxpt.backends.mlx_backend import token_logp
    from mlxpt.decode.batch import generate_group
    from mlxpt.decode.generate import iter_generate
    from mlxpt.decode.sampling import make_sampler

    model, tok = tiny_model
    prompt = list(tok.encode("Mia has 3 apples."))
    single = [c.token for c in iter_generate(model, tok, prompt, max_tokens=16) if c.token is not None]
    group = generate_group(model, tok, prompt, 3, max_tokens=16)
    assert all(c.tokens == single for c in group)  # greedy: every row is the single stream
    a = generate_group(model, tok, prompt, 4, 16, make_sampler(1.0, seed=5))
    b = generate_group(model, tok, prompt, 4, 16, make_sampler(1.0, seed=5))
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a}) > 1  # rows sample independently
    for c in a:  # the recorded log-probs are the model's, as a full forward pass gives them
        seq = mx.array(prompt + c.tokens)[None]
        full = np.array(token_logp(model, seq[:, :-1], seq[:, 1:]))[0, len(prompt) - 1 :]
        np.testing.assert_allclose(c.logprobs, full, atol=2e-4)


def test_groups_of_several_prompts_decode_as_one_batch(tiny_model):
    from mlxpt.decode.batch import generate_group, generate_groups

    model, tok = tiny_model
    prompts = [list(tok.encode(t)) for t in ("hello there", "a much longer prompt with more words in it", "x")]
    together = generate_groups(model, tok, prompts, 2, 16)
    for p, group in zip(prompts, together, strict=True):  # left padding changes nothing
        alone = generate_group(model, tok, p, 2, 16)
        assert [c.tokens for c in group] == [c.tokens for c in alone]
        np.testing.assert_allclose([c.logprobs for c in group], [c.logprobs for c in alone], atol=1e-4)
    # rows that stop early leave the batch; the others continue exactly as before
    stop = together[0][0].text[2:5]
    cut = generate_groups(model, tok, prompts, 2, 16, stop_strings=[stop])
    assert cut[0][0].finish_reason == "stop" and stop not in cut[0][0].text
    for full, part in zip(together[1:], cut[1:], strict=True):
        if stop not in full[0].text:
            assert [c.tokens for c in part] == [c.tokens for c in full]


def test_group_stop_strings_and_bad_arguments(tiny_model):
    from mlxpt.decode.batch import generate_group
    from mlxpt.decode.sampling import make_sampler

    model, tok = tiny_model
    prompt = list(tok.encode("hello"))
    free = generate_group(model, tok, prompt, 2, 24, make_sampler(1.0, seed=1))
    stop = free[0].text[3:6]
    cut = generate_group(model, tok, prompt, 2, 24, make_sampler(1.0, seed=1), stop_strings=[stop])
    assert stop not in cut[0].text and cut[0].finish_reason == "stop" and free[0].text.startswith(cut[0].text)
    for kw, code in (({"n": 0}, "E616"), ({"n": 2, "max_tokens": 0}, "E604")):
        with pytest.raises(ConfigError) as e:
            generate_group(model, tok, prompt, **{"max_tokens": 4, **kw})
        assert e.value.code == code
    with pytest.raises(ConfigError):
        generate_group(model, tok, [], 2, 4)


def test_shared_prompt_scoring_equals_the_plain_pass(tiny_dir):
    """Each prompt run once per group gives the plain full-sequence log-probs and gradients:
    prompts of different lengths (one of a single token), ragged completions, a LoRA adapter."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlxpt.backends.mlx_backend import token_logp
    from mlxpt.backends.shared_prefix import grouped_token_logp, layout, self_check
    from mlxpt.models.loader import load

    model, _ = load(str(tiny_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    model.update(
        tree_map(lambda a: a + 0.05 * mx.random.normal(a.shape, key=mx.random.key(1)), model.trainable_parameters())
    )
    assert self_check(model, token_logp)[0]
    rng = np.random.default_rng(1)
    G, prompts = 3, [rng.integers(1, 200, n).tolist() for n in (6, 3, 1)]
    comps = [rng.integers(1, 200, int(rng.integers(1, 7))).tolist() for _ in range(len(prompts) * G)]
    pr, lp, co = layout(prompts, comps, 0, pad_to=8)
    assert pr.shape == (3, 8) and co.shape[1] == 8 and lp.tolist() == [2, 5, 7]
    w = rng.normal(size=co.shape).astype(np.float32) * (
        np.arange(co.shape[1]) < np.array([len(c) for c in comps])[:, None]
    )
    # the same sequences, whole, right-padded, with the weights on their completion positions
    seqs = [prompts[i // G] + c for i, c in enumerate(comps)]
    L = max(len(x) for x in seqs) - 1
    inp, tgt, wp = (
        np.zeros((len(seqs), L), np.int32),
        np.zeros((len(seqs), L), np.int32),
        np.zeros((len(seqs), L), np.float32),
    )
    for i, x in enumerate(seqs):
        inp[i, : len(x) - 1], tgt[i, : len(x) - 1] = x[:-1], x[1:]
        wp[i, len(x) - 1 - len(comps[i]) : len(x) - 1] = w[i, : len(comps[i])]

    def grouped(m):
        return (grouped_token_logp(m, mx.array(pr), mx.array(lp), mx.array(co)) * mx.array(w)).sum()

    def plain(m):
        return (token_logp(m, mx.array(inp), mx.array(tgt)) * mx.array(wp)).sum()

    (va, ga), (vb, gb) = nn.value_and_grad(model, grouped)(model), nn.value_and_grad(model, plain)(model)
    assert va.item() == pytest.approx(vb.item(), rel=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(ga), tree_flatten(gb), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, err_msg=k)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma3_text", "olmo2", "starcoder2"])
def test_shared_prompt_scoring_fits_common_architectures(arch):
    """Random tiny models of mlx-lm's families (gemma3 with sliding-window layers): the shared
    pass gives the plain log-probs, and a pass that drops the prompt is caught."""
    import importlib
    import inspect

    from mlx.utils import tree_map

    from mlxpt.backends.mlx_backend import token_logp
    from mlxpt.backends.shared_prefix import self_check

    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    cfg = {"model_type": arch, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "rms_norm_eps": 1e-5,
           "head_dim": 16, "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16}  # fmt: skip
    fields = inspect.signature(mod.ModelArgs).parameters
    model = mod.Model(mod.ModelArgs.from_dict({k: v for k, v in cfg.items() if k in fields}))
    model.update(tree_map(lambda a: a * 3 if a.ndim == 2 else a, model.parameters()))  # context-sensitive

    class NoPrompt:
        def __init__(self, m):
            self.m, self.layers = m, m.layers

        def __call__(self, x, cache=None):
            return self.m(x)

    ok, found = self_check(model, token_logp)
    assert ok, found
    assert not self_check(NoPrompt(model), token_logp)[0]


def test_shared_prompt_check_refuses_a_model_it_does_not_fit(tiny_dir):
    from mlxpt.backends.mlx_backend import token_logp
    from mlxpt.backends.shared_prefix import self_check
    from mlxpt.models.loader import load

    model, _ = load(str(tiny_dir))

    class NoCache:  # attends over the new tokens only, as a model that ignores `cache` would
        def __init__(self, m):
            self.m, self.layers = m, m.layers

        def __call__(self, x, cache=None):
            return self.m(x)

    ok, found = self_check(NoCache(model), token_logp)
    assert not ok and "nats" in found
    ok, found = self_check(object(), token_logp)
    assert not ok and "Error" in found


def test_shared_prompt_and_plain_scoring_train_the_same(tiny_dir, prompt_dir, tmp_path, reward_file):
    """The grouped batch layout (masks, advantages, old and reference log-probs) trains exactly
    like whole rows: same adapters after a few steps with KL, mu = 2, and truncation masking."""
    from mlxpt.train.grpo import run_grpo

    kw = {"steps": 3, "num_iterations": 2, "mask_truncated_completions": True, "learning_rate": 1e-3}
    runs = []
    for name, plain in (("shared", False), ("plain", True)):
        events = []
        run_dir, _ = run_grpo(
            cfg_for(tiny_dir, prompt_dir, tmp_path / name, reward_file, plain_scoring=plain, **kw), emit=events.append
        )
        assert not [e for e in events if e["event"] == "warning" and "scoring" in e["message"]]
        runs.append(_load_state(run_dir)[0]["adapters"])
    for k in runs[0]:
        np.testing.assert_allclose(runs[0][k], runs[1][k], atol=2e-5, err_msg=k)


# -- runs on the tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    return tiny.write_prompt_dir(tmp_path_factory.mktemp("prompts"), train=(8, 1), test=(4, 2))


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("rw") / "lengthy.py"
    f.write_text("def chars(prompt, completion, **row):\n    return (len(completion) % 7) / 7\n")
    return f


def cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, **kw):
    base = {
        "steps": 3, "batch_size": 2, "num_generations": 4, "max_completion_length": 10,
        "rewards": f"{reward_file}:chars,accuracy", "beta": 0.1, "log_completions_every": 1,
    }  # fmt: skip
    return tiny.run_config(GRPOConfig, tiny_dir, prompt_dir, tmp_path, **{**base, **kw})


def test_high_lr_steps_change_every_trainable_parameter(tiny_dir, prompt_dir, tmp_path, reward_file):
    from mlxpt.backends.mlx_backend import MLXBackend
    from mlxpt.train.grpo import SAMPLES_FILE, run_grpo

    captured = {}
    orig = MLXBackend.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        captured["start"] = {k2: np.array(v) for k2, v in self._initial}

    events = []
    MLXBackend.__init__ = spy
    try:
        cfg = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, eval_every=3, eval_batches=1)
        run_dir, outcome = run_grpo(cfg, emit=events.append)
    finally:
        MLXBackend.__init__ = orig
    assert outcome == "finished"
    final = _load_state(run_dir)[0]["adapters"]
    assert set(final) == set(captured["start"])
    unchanged = [k for k, v in final.items() if np.array_equal(v, captured["start"][k])]
    assert not unchanged, f"parameters that never moved: {unchanged}"
    steps = [e for e in events if e["event"] == "step"]
    for key in ("reward_mean", "reward_std", "reward/chars", "reward/accuracy", "kl", "clip_fraction", "entropy",
                "completion_len_mean", "completion_len_max", "zero_std_fraction", "gen_tokens_per_s"):  # fmt: skip
        assert key in steps[-1], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert steps[-1]["kl"] > 0
    samples = [json.loads(line) for line in (run_dir / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 3 * 4 and {"prompt", "completion", "reward", "rewards", "step"} <= set(samples[0])
    assert [e["step"] for e in events if e["event"] == "samples"] == [1, 2, 3]
    evals = [e for e in events if e["event"] == "eval"]  # greedy held-out completions, scored
    assert [e["step"] for e in evals] == [0, 3] and all(e["val_prompts"] == 2 for e in evals)
    assert {"val_reward", "val_accuracy", "val_reward/chars", "val_completion_len"} <= set(evals[0])


def test_grpo_raises_a_learnable_reward(tiny_dir, prompt_dir, tmp_path):
    """End to end, the update goes uphill: rewarding digits in the completion makes the tiny model
    write more of them (a sign or advantage bug would leave the reward flat or push it down)."""
    from mlxpt.train.grpo import run_grpo

    f = tmp_path / "digits.py"
    f.write_text(
        "def digits(prompt, completion, **row):\n    return sum(c.isdigit() for c in completion) / max(1, len(completion))\n"
    )
    events = []
    kw = {"steps": 20, "rewards": f"{f}:digits", "learning_rate": 1e-2, "num_generations": 8, "beta": 0.0}
    run_grpo(
        cfg_for(tiny_dir, prompt_dir, tmp_path, f, max_completion_length=12, warmup_steps=0, **kw), emit=events.append
    )
    r = [e["reward_mean"] for e in events if e["event"] == "step"]
    assert len(r) == 20 and np.mean(r[-5:]) > 2 * np.mean(r[:5]), r


@pytest.mark.parametrize(("mu", "reads", "saved_step"), [(1, 5, 2), (2, 5, 2), (2, 7, 3)])
def test_resume_equals_uninterrupted(tiny_dir, prompt_dir, tmp_path, reward_file, mu, reads, saved_step):
    """The loop reads the stop flag after each micro-batch and each step (two reads a step): 5
    reads abandon step 3 and keep step 2; 7 abandon step 4 and keep step 3, which with mu = 2 is
    half way through a window, so its rollouts must come back from the checkpoint."""
    from mlxpt.train.grpo import run_grpo

    kw = {"steps": 4, "num_iterations": mu, "loss_type": "dapo"}
    straight, _ = run_grpo(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file, **kw))
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", reward_file, **kw)
    part, outcome = run_grpo(cfg, stop=StopAfter(reads))
    saved = _load_state(part)
    assert outcome == "interrupted" and saved[1]["loop"]["step"] == saved_step
    assert ("task" in saved[0]) == (saved_step % mu == 1)  # rollouts saved only mid-window
    resumed, outcome = run_grpo(cfg, resume_dir=part)
    assert outcome == "finished"
    a, b = _load_state(straight), _load_state(resumed)
    for group in ("adapters", "optimizer", "rng"):
        for k in a[0][group]:
            np.testing.assert_allclose(a[0][group][k], b[0][group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


def test_resume_mid_window_refuses_changed_prompts(tiny_dir, prompt_dir, tmp_path, reward_file):
    """Rollouts saved half way through a window are only reused for the prompts they were sampled for."""
    import shutil

    from mlxpt.train.grpo import run_grpo

    data = tmp_path / "data"
    shutil.copytree(prompt_dir, data)
    cfg = cfg_for(tiny_dir, data, tmp_path, reward_file, steps=4, num_iterations=2)
    part, outcome = run_grpo(cfg, stop=StopAfter(7))  # keeps step 3, the first update of window 2
    assert outcome == "interrupted" and "task" in _load_state(part)[0]
    original = (data / "train.jsonl").read_text()
    rows = [json.loads(x) for x in original.splitlines()]
    (data / "train.jsonl").write_text(
        "".join(json.dumps({**r, "prompt": r["prompt"] + " Twice."}) + "\n" for r in rows)
    )
    with pytest.raises(ConfigError) as e:
        run_grpo(cfg, resume_dir=part)
    assert e.value.code == "E552" and str(part) in e.value.line()
    (data / "train.jsonl").write_text(original)  # the refused resume kept the saved rollouts
    straight, _ = run_grpo(cfg_for(tiny_dir, data, tmp_path / "a", reward_file, steps=4, num_iterations=2))
    resumed, outcome = run_grpo(cfg, resume_dir=part)
    assert outcome == "finished"
    a, b = _load_state(straight)[0]["adapters"], _load_state(resumed)[0]["adapters"]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


# fails on about a third of the completions, greedy validation's included
FLAKY = """def flaky(prompt, completion, answer=0, **row):
    if (sum(completion.encode()) + int(float(answer))) % 3 == 0:
        raise ValueError('boom')
    return 0.5
"""


@pytest.mark.parametrize(("reads", "saved_step"), [(5, 2), (1, 0)])
def test_resume_keeps_the_reward_failure_counts_and_log(tiny_dir, prompt_dir, tmp_path, reads, saved_step):
    """A reward that fails on a third of the completions (abstained): the resumed run reports the
    straight run's failure counts at every step, and reward_failures.jsonl and metrics.jsonl hold
    the same lines, none of the abandoned window (5 reads: step 3's) nor step 0's validation twice
    (1 read: a stop while step 1 samples saves step 0, whose validation a resume does again)."""
    from mlxpt.train.grpo import FAILURES_FILE, run_grpo

    f = tmp_path / "flaky.py"
    f.write_text(FLAKY)
    kw = {"steps": 4, "rewards": f"{f}:flaky,accuracy", "max_reward_failure_rate": 1.0, "eval_every": 1}
    straight, _ = run_grpo(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", f, **kw))
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", f, **kw)
    part, outcome = run_grpo(cfg, stop=StopAfter(reads))
    assert outcome == "interrupted" and _load_state(part)[1]["loop"]["step"] == saved_step
    resumed, _ = run_grpo(cfg, resume_dir=part)

    def lines(run, name, keys=None):
        rows = [json.loads(x) for x in (run / name).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time" and (keys is None or k in keys)} for r in rows]

    def metrics(run):
        return lines(run, "metrics.jsonl", ("event", "step", "reward_failures"))

    failures = [m.get("reward_failures") for m in metrics(straight) if m["event"] == "step"]
    assert all(failures) and failures[-1]["flaky"] > failures[0]["flaky"]  # the test sees failures
    assert metrics(resumed) == metrics(straight)
    assert lines(resumed, FAILURES_FILE) == lines(straight, FAILURES_FILE)
    assert {x["step"] for x in lines(straight, FAILURES_FILE)} == {0, 1, 2, 3, 4}  # step 0: validation


def test_resume_stops_at_the_reward_failure_rate_where_the_straight_run_does(tiny_dir, prompt_dir, tmp_path):
    """The failure rate counts over the whole run: a run resumed after step 1 stops (E549) with the
    straight run's counts at the same step (once a resume started counting from 0 and went on)."""
    from mlxpt.train.grpo import run_grpo

    f = tmp_path / "flaky.py"
    f.write_text(FLAKY)
    kw = {"steps": 6, "rewards": f"{f}:flaky,accuracy", "max_reward_failure_rate": 0.2}
    straight, cfg = (cfg_for(tiny_dir, prompt_dir, tmp_path / x, f, **kw) for x in "ab")
    tiny.assert_resume_stops_where_the_straight_run_does(run_grpo, straight, cfg, 3, _load_state)  # keeps step 1


def test_cli_grpo_with_a_user_reward_file_and_bad_settings(tiny_dir, prompt_dir, tmp_path, reward_file, capsys):
    from mlxpt.cli import main

    common = [
        "train",
        "grpo",
        "--model",
        str(tiny_dir),
        "--data",
        str(prompt_dir),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    rc = main([*common, "--steps", "2", "--batch-size", "1", "--num-generations", "2", "--max-completion-length", "6",
               "--rewards", f"{reward_file}:chars", "--eval-every", "0", "--beta", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "reward" in out and "done: adapter saved" in out
    for extra, code in (
        (["--backend", "numpy"], "E551"),
        (["--rewards", "nosuch"], "E540"),
        (["--rewards", "accuracy", "--reward-weights", "1,2"], "E546"),
        (["--extract", "nearest"], "E607"),
        (["--num-generations", "1"], "E505"),
    ):
        rc = main([*common, *extra])
        err = capsys.readouterr().err
        assert rc != 0 and code in err, (extra, err)


def test_memory_estimate_counts_each_prompt_once(tiny_dir, prompt_dir, tmp_path, reward_file, monkeypatch):
    """GRPO's pass is estimated as it runs: each prompt once per group and the vocabulary head
    on completion positions only, unless plain scoring runs G whole rows a prompt."""
    from mlxpt.errors import ResourceError
    from mlxpt.models import memory
    from mlxpt.models.loader import load_tokenizer
    from mlxpt.train.grpo import memory_shape, prepare_data, read_rows, run_grpo

    s = memory.Shape.shared_prompts(2, 4, 30, 10)
    assert (s.tokens, s.head_tokens, s.attn_pairs) == (2 * (30 + 40), 80, 2 * (30 * 30 + 40 * 40))
    r = memory.Shape.rows(8, 40)
    assert (r.tokens, r.head_tokens, r.attn_pairs) == (320, 320, 320 * 40)

    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file)
    train, valid, _ = prepare_data(cfg, load_tokenizer(str(tiny_dir)), read_rows(cfg))
    prompt = max(len(e.tokens) for e in train + valid)
    assert memory_shape(cfg, prompt) == memory.Shape.shared_prompts(2, 4, prompt, 10)
    cfg.grpo.plain_scoring = True
    assert memory_shape(cfg, prompt) == memory.Shape.rows(8, prompt + 10)

    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)  # a 10 kB machine
    for plain, label in ((False, "2 prompts x 4 completions of up to 10 tokens"), (True, "batch 8 x")):
        with pytest.raises(ResourceError) as e:
            run_grpo(cfg_for(tiny_dir, prompt_dir, tmp_path / str(plain), reward_file, plain_scoring=plain))
        assert label in e.value.line() and "--batch-size" in e.value.line()


# -- dynamic sampling (DAPO) -----------------------------------------------------------------


def _scripted_draws(rewards_per_prompt: list[list[float]], per_draw: int):
    """Draws of `per_draw` prompts whose G completions get the scripted rewards; (draws, fake
    sample_scored) for rollouts.sample_dynamic."""
    from mlxpt.data.prompts import PromptExample, PromptRow

    examples = [
        PromptExample([1, 2, 10 + i], PromptRow(f"p:{i + 1}", f"prompt {i}", [], False)) for i in range(len(rewards_per_prompt))
    ]  # fmt: skip
    by_tokens = {tuple(e.tokens): r for e, r in zip(examples, rewards_per_prompt, strict=True)}

    def draws():
        for k in range(0, len(examples), per_draw):
            yield examples[k : k + per_draw], [0] * per_draw, (0, k // per_draw + 1)

    def fake_scored(spec, part, G, keys=None):
        seqs, totals, per_fn, samples = [], [], [], []
        for e in part:
            for j, r in enumerate(by_tokens[tuple(e.tokens)]):
                seqs.append((e, [20 + j, 3], False))
                totals.append(r)
                per_fn.append({"scripted": r})
                samples.append({"prompt": e.row.prompt, "completion": str(j), "reward": r, "rewards": {"scripted": r}})
        from mlxpt.decode.batch import GroupStats

        return seqs, totals, per_fn, samples, GroupStats(), 0.0

    return draws(), fake_scored


def _spec(**grpo):
    from mlxpt.train.rollouts import RolloutSpec

    cfg = GRPOConfig()
    for k, v in {"num_generations": 2, "beta": 0.0, **grpo}.items():
        setattr(cfg.grpo, k, v)
    return RolloutSpec(cfg, None, None, None, None, 0, grouped=False)


@pytest.mark.parametrize(
    ("rewards", "want", "most", "kept", "draws", "after"),
    [
        # prompts 0-1 alike, 2 unequal, 3 alike, 4-5 unequal: fills 2 groups at the second draw
        ([[1, 1], [0, 0], [1, 0], [0, 0], [0, 1], [1, 0]], 2, 5, [2, 4], 3, 3),
        # the first `want` unequal groups in data order; the rest of the draw is dropped
        ([[1, 0], [0, 1], [1, 0], [0, 0]], 2, 5, [0, 1], 1, 1),
        # at most `most` draws beyond the first: a short batch
        ([[1, 1], [0, 0], [1, 1], [1, 0], [0, 1], [1, 0]], 2, 1, [3], 2, 2),
    ],
)
def test_dynamic_sampling_fills_the_batch_with_unequal_groups(monkeypatch, rewards, want, most, kept, draws, after):
    from mlxpt.train import rollouts

    it, fake = _scripted_draws(rewards, per_draw=2)
    monkeypatch.setattr(rollouts, "sample_scored", fake)
    r = rollouts.sample_dynamic(_spec(), it, want, most)
    inputs, targets, mask, adv, _, _ = r.batch
    assert r.stats["prompt_tokens"] == [[1, 2, 10 + i] for i in kept]
    assert (r.stats["draws"], r.stats["kept_groups"], r.stats["after"]) == (draws, len(kept), [0, after])
    drawn = rewards[: 2 * draws]
    assert r.stats["groups"] == len(drawn) and r.stats["zero_std"] == sum(a == b for a, b in drawn)
    assert r.stats["rewards"] == [x for g in drawn for x in g]  # the report counts every sampled completion
    assert inputs.shape[0] == 2 * len(kept) and mask.sum() > 0
    expect = np.concatenate([group_advantages(np.array([rewards[i]], float))[0][0] for i in kept])
    np.testing.assert_allclose(adv, expect)


def test_dynamic_sampling_with_no_unequal_group_keeps_the_last_draw_masked(monkeypatch):
    from mlxpt.train import rollouts

    it, fake = _scripted_draws([[1, 1], [0, 0], [0, 0], [1, 1], [1, 1], [0, 0]], per_draw=2)
    monkeypatch.setattr(rollouts, "sample_scored", fake)
    r = rollouts.sample_dynamic(_spec(), it, 2, 1)
    inputs, _, mask, adv, _, _ = r.batch
    assert (r.stats["draws"], r.stats["kept_groups"], r.stats["after"]) == (2, 0, [0, 2])
    assert r.stats["prompt_tokens"] == [[1, 2, 12], [1, 2, 13]] and inputs.shape[0] == 4
    assert mask.sum() == 0 and not adv.any()  # nothing to learn, and nothing learned


@pytest.mark.parametrize("most", [5, 0])
def test_dynamic_sampling_on_two_ranks_chooses_the_groups_of_one(monkeypatch, most):
    """Draws of 4 prompts split 2 + 2 over two ranks, whose flags `agree` joins: the ranks keep
    between them the groups one process keeps, each its own; a rank left with none trains on a
    zero-weight batch of its last draw."""
    from mlxpt.train import rollouts

    # draw 1: 0-1 alike (rank 0's), 2-3 unequal (rank 1's); draw 2: 4-5 alike, 6-7 unequal; draw 3: unequal
    rewards = [[1, 1], [0, 0], [1, 0], [0, 1], [0, 0], [1, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]
    alike = np.array([a == b for a, b in rewards])
    it, fake = _scripted_draws(rewards, per_draw=4)
    monkeypatch.setattr(rollouts, "sample_scored", fake)
    one = rollouts.sample_dynamic(_spec(), it, 3, most)
    got = []
    for rank in (0, 1):
        full, _ = _scripted_draws(rewards, per_draw=4)
        mine = ((ex[2 * rank : 2 * rank + 2], k[:2], end) for ex, k, end in full)
        seen = iter(range(0, len(rewards), 4))
        agree = lambda zero, rank=rank, seen=seen: (alike[(d := next(seen)) : d + 4], 2 * rank)  # noqa: E731
        got.append(rollouts.sample_dynamic(_spec(), mine, 3, most, agree))
    kept = [p for r in got if r.stats["kept_groups"] for p in r.stats["prompt_tokens"]]
    assert sorted(kept) == sorted(one.stats["prompt_tokens"]), (kept, one.stats["prompt_tokens"])
    assert all(r.stats["draws"] == one.stats["draws"] and r.stats["after"] == one.stats["after"] for r in got)
    assert sum(r.stats["kept_groups"] for r in got) == one.stats["kept_groups"] == (3 if most > 1 else 2)
    assert [r.stats["kept_groups"] for r in got] == [0, one.stats["kept_groups"]]  # rank 0's were alike
    empty = got[0]
    assert empty.batch[2].sum() == 0 and empty.batch[0].shape[0] == 4  # its last draw, weighted 0
    assert empty.stats["prompt_tokens"] == [[1, 2, 10 + i] for i in ((4, 5) if most else (0, 1))]
    # rank 0's two groups fill the batch: rank 1's unequal group 2 is not chosen, and not trained
    rewards = [[1, 0], [0, 1], [1, 0], [0, 0]]
    full, fake = _scripted_draws(rewards, per_draw=4)
    monkeypatch.setattr(rollouts, "sample_scored", fake)
    flags = np.array([False, False, False, True])
    late = rollouts.sample_dynamic(
        _spec(), ((ex[2:], k[2:], end) for ex, k, end in full), 2, most, lambda z: (flags, 2)
    )
    assert late.stats["kept_groups"] == 0 and late.batch[2].sum() == 0 and late.stats["draws"] == 1


@pytest.fixture(scope="module")
def half_flat_reward(tmp_path_factory):
    """A reward that is the same for every completion of half the prompts (by their text)."""
    f = tmp_path_factory.mktemp("rw") / "halfflat.py"
    f.write_text(
        "def halfflat(prompt, completion, **row):\n"
        "    return 0.5 if sum(map(ord, prompt)) % 2 else (sum(map(ord, completion)) % 7) / 7\n"
    )
    return f


@pytest.mark.parametrize(("mu", "reads", "saved_step"), [(1, 5, 2), (2, 7, 3)])
def test_dynamic_sampling_runs_and_resumes_exactly(
    tiny_dir, prompt_dir, tmp_path, half_flat_reward, mu, reads, saved_step
):
    """A run with dynamic sampling draws more batches than steps, trains each step on unequal
    groups only, and a resume (between steps, or between the mu updates of a window, whose end
    position comes from the checkpoint) equals the uninterrupted run."""
    from mlxpt.train.grpo import run_grpo

    kw = {"steps": 4, "num_iterations": mu, "batch_size": 2, "dynamic_sampling": 3, "beta": 0.0,
          "rewards": f"{half_flat_reward}:halfflat"}  # fmt: skip
    events = []
    straight, _ = run_grpo(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", half_flat_reward, **kw), emit=events.append)
    steps = [e for e in events if e["event"] == "step"]
    fills = [(e["kept_groups"], e["draws"]) for e in steps[::mu]]
    # a full batch of unequal groups, or a short one after 1 + 3 draws; some draws were all alike
    assert all(kept == 2 or draws == 4 for kept, draws in fills), fills
    assert all(kept >= 1 for kept, _ in fills) and sum(d for _, d in fills) > len(fills), fills
    assert all(e["zero_std_fraction"] > 0 for e in steps[::mu])
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", half_flat_reward, **kw)
    part, outcome = run_grpo(cfg, stop=StopAfter(reads))
    saved = _load_state(part)
    assert outcome == "interrupted" and saved[1]["loop"]["step"] == saved_step
    resumed, outcome = run_grpo(cfg, resume_dir=part)
    assert outcome == "finished"
    a, b = _load_state(straight), _load_state(resumed)
    where = [(x[1]["loop"]["epoch"], x[1]["loop"]["batch_index"]) for x in (a, b)]
    assert where[0] == where[1] > divmod(4 // mu, 4)  # past where 4 // mu single draws (4 a pass) end
    for group in ("adapters", "optimizer", "rng"):
        for k in a[0][group]:
            np.testing.assert_allclose(a[0][group][k], b[0][group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


def test_dynamic_sampling_bad_settings(tiny_dir, prompt_dir, tmp_path, reward_file, capsys):
    from mlxpt.cli import main

    rc = main(["train", "grpo", "--model", str(tiny_dir), "--data", str(prompt_dir), "--runs-dir",
               str(tmp_path / "runs"), "--dynamic-sampling", "-1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0 and "E505" in err and "dynamic_sampling" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_dynamic_sampling_resume_refuses_a_plain_window(tiny_dir, prompt_dir, tmp_path, reward_file):
    """Rollouts saved half way through a plain window hold no end position for dynamic sampling:
    resuming them with --dynamic-sampling is refused (E552) and leaves the checkpoint usable."""
    from mlxpt.train.grpo import run_grpo

    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, steps=4, num_iterations=2)
    part, outcome = run_grpo(cfg, stop=StopAfter(7))  # keeps step 3, the first update of window 2
    assert outcome == "interrupted" and "task" in _load_state(part)[0]
    dynamic = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, steps=4, num_iterations=2, dynamic_sampling=2)
    with pytest.raises(ConfigError) as e:
        run_grpo(dynamic, resume_dir=part)
    assert e.value.code == "E552" and "dynamic-sampling" in e.value.line()
    resumed, outcome = run_grpo(cfg, resume_dir=part)
    assert outcome == "finished"
