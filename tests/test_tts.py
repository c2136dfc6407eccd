"""Test-time scaling on fake models with known logits and a byte tokenizer (fast, exact)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from test_tts_fakes import FakeLM, byte_tokenizer, scripted, uniform

from mlxpt.decode.batch import generate_group, generate_groups
from mlxpt.decode.beam import beam_search
from mlxpt.decode.options import STRATEGY_NAMES, DecodeConfig, check_strategy
from mlxpt.decode.sampling import SamplingConfig, filter_logprobs, make_keyed_sampler, make_sampler, row_key
from mlxpt.decode.scorers import arithmetic_steps, arithmetic_verifier, check_spec, make_scorer
from mlxpt.decode.strategies import STRATEGIES, DecodeContext, StrategyResult, run_strategy
from mlxpt.errors import ConfigError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def V(tok):
    return len(tok.get_vocab())


def prompt_ids(tok, text="Q: how many?"):
    return list(tok.encode(text))


SCRIPT = [("Answer: 7", 0.5), ("so 3 + 5 = 8. Answer: 8", 0.3), ("x 9", 0.2)]


@pytest.fixture
def scripted_lm(tok, V):
    ids = prompt_ids(tok)
    return FakeLM(V, scripted(tok, len(ids), SCRIPT, V)), ids


# ---- samplers on known distributions ---------------------------------------------------------

P = np.array([0.5, 0.3, 0.15, 0.05])


def _kept(**kw):
    out = np.array(filter_logprobs(mx.array(np.log(P))[None], **kw))[0]
    return [i for i in range(len(P)) if np.isfinite(out[i])]


def test_filters_on_a_known_distribution():
    assert _kept(top_k=2) == [0, 1]
    assert _kept(top_k=1) == [0]
    assert _kept(top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert _kept(top_p=0.81) == [0, 1, 2]
    assert _kept(min_p=0.4) == [0, 1]  # keep p >= 0.4 * 0.5
    assert _kept(min_p=0.05) == [0, 1, 2, 3]
    assert _kept(top_p=0.95, top_k=2) == [0, 1]  # composed, in the sampler's order
    assert _kept() == [0, 1, 2, 3]


def test_sampler_draws_only_kept_tokens_in_proportion():
    logp = mx.array(np.log(P))[None]
    draws = np.array([make_sampler(temperature=1.0, top_k=2, seed=0)(logp).item() for _ in range(1)])
    sampler = make_sampler(temperature=1.0, top_k=2, seed=0)
    draws = np.array([sampler(logp).item() for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).mean() == pytest.approx(0.5 / 0.8, abs=0.04)
    sampler = make_sampler(temperature=1.0, min_p=0.4, seed=1)
    assert set(sampler(mx.repeat(logp, 500, axis=0)).tolist()) == {0, 1}


def test_temperature_zero_is_argmax_and_temperature_flattens():
    logp = mx.array(np.log(P))[None]
    assert {make_sampler(0.0)(logp).item() for _ in range(20)} == {0}
    hot = make_sampler(temperature=5.0, seed=2)
    draws = np.array(hot(mx.repeat(logp, 4000, axis=0)).tolist())
    assert (draws == 3).mean() > 0.15  # p=0.05 at T=1, about 0.19 at T=5


def test_keyed_sampler_draws_in_proportion_and_each_row_from_its_key():
    logp = mx.repeat(mx.array(np.log(P))[None], 3000, axis=0)
    keys = [row_key(5, i) for i in range(3000)]
    draws = np.array(make_keyed_sampler(1.0, top_k=3)(logp, keys).tolist())
    assert set(draws.tolist()) == {0, 1, 2}
    assert (draws == 0).mean() == pytest.approx(0.5 / 0.95, abs=0.03)
    assert (draws == 2).mean() == pytest.approx(0.15 / 0.95, abs=0.03)
    # a row's draw is its key's, whatever rows share the batch and in what order
    one = make_keyed_sampler(1.0)
    alone = [one(logp[:1], [k]).item() for k in keys[:40]]
    assert one(logp[:40], keys[:40]).tolist() == alone
    assert one(logp[:40][::-1], keys[:40][::-1]).tolist() == alone[::-1]
    assert make_keyed_sampler(0.0)(logp[:4], keys[:4]).tolist() == [0, 0, 0, 0]
    assert len({row_key(1, 2, 3), row_key(1, 3, 2), row_key(2, 1, 3), row_key(1, 2), row_key(1, 2, 3, 0)}) == 5


def test_keyed_groups_do_not_depend_on_the_batch(tok, V):
    """GRPO's guarantee for several ranks: a prompt's completions are the same sampled alone or
    beside other prompts (row_key of its key, sample number, token number)."""
    lm = FakeLM(V, uniform(V))
    a, b = prompt_ids(tok, "Q: one?"), prompt_ids(tok, "Q: a longer second prompt?")
    sampler = make_keyed_sampler(temperature=1.0)

    def toks(prompts, keys):
        return [[c.tokens for c in g] for g in generate_groups(lm, tok, prompts, 3, 6, sampler, keys=keys)]

    both = toks([a, b], [11, 12])
    assert both == toks([a], [11]) + toks([b], [12])
    assert toks([b, a], [12, 11]) == both[::-1]
    assert toks([a], [13]) != both[0] and len({tuple(t) for t in both[0]}) == 3
    with pytest.raises(ValueError):
        generate_groups(lm, tok, [a], 2, 4, sampler)  # a keyed sampler without keys


# ---- batched generation on fake models -------------------------------------------------------


def test_group_is_seed_reproducible_and_diverse(tok, V):
    ids = prompt_ids(tok)
    lm = FakeLM(V, uniform(V))

    def draw(seed):
        return [c.tokens for c in generate_group(lm, tok, ids, 4, 6, make_sampler(temperature=1.0, seed=seed))]

    a, b, c = draw(3), draw(3), draw(4)
    assert a == b and a != c
    assert len({tuple(t) for t in a}) == 4  # rows sample independently


def test_group_temperature_zero_rows_are_identical_and_deterministic(scripted_lm, tok):
    lm, ids = scripted_lm
    group = generate_group(lm, tok, ids, 3, 40)
    assert [c.text for c in group] == ["Answer: 7"] * 3
    assert all(c.finish_reason == "stop" for c in group)
    assert group[0].logprobs[0] == pytest.approx(math.log(0.5), abs=1e-4)


def test_group_stops_each_row_on_its_own(scripted_lm, tok):
    lm, ids = scripted_lm
    group = generate_group(lm, tok, ids, 16, 40, make_sampler(temperature=1.0, seed=0))
    texts = {c.text for c in group}
    assert texts <= {t for t, _ in SCRIPT} and len(texts) == 3
    for c in group:
        assert c.finish_reason == "stop" and len(c.tokens) == len(tok.encode(c.text))
    short = generate_group(lm, tok, ids, 4, 3, make_sampler(temperature=1.0, seed=0))
    assert all(c.finish_reason == "length" and len(c.tokens) == 3 for c in short)


def test_group_stop_strings_cut_the_text(scripted_lm, tok):
    lm, ids = scripted_lm
    group = generate_group(lm, tok, ids, 2, 40, stop_strings=(":",))
    assert [c.text for c in group] == ["Answer"] * 2


def test_prompt_is_prefilled_once_for_the_whole_group(tok, V):
    ids = prompt_ids(tok)
    lm = FakeLM(V, uniform(V))
    generate_group(lm, tok, ids, 8, 5, make_sampler(temperature=1.0, seed=0))
    assert lm.calls <= 2 + 5  # prefill (+ last prompt token) then one batched pass per step


# ---- strategies ------------------------------------------------------------------------------


def test_strategy_names_and_bad_settings():
    assert tuple(STRATEGIES) == STRATEGY_NAMES
    assert STRATEGY_NAMES[:5] == ("greedy", "sample", "best-of-n", "self-consistency", "beam")
    assert "auto" in STRATEGY_NAMES
    for kw, code in [
        ({"strategy": "vote"}, "E620"),
        ({"n": 0}, "E621"),
        ({"n": -2}, "E621"),
        ({"weighting": "votes"}, "E626"),
        ({"batch": 0}, "E626"),
        ({"confidence": 0.3}, "E626"),
    ]:
        args = {"strategy": "best-of-n", "n": 4, **kw}
        with pytest.raises(ConfigError) as e:
            check_strategy(**args)
        assert e.value.code == code and "\n" not in e.value.line()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_from_one_decode_config(scripted_lm, tok, name):
    from mlxpt.rewards.extract import extract

    lm, ids = scripted_lm
    budget = 200 if name == "auto" else None  # auto: its choice within the budget sets n_used
    cfg = DecodeConfig(name, n=3, max_tokens=40, sampling=SamplingConfig(temperature=1.0, seed=0), budget=budget)
    r = run_strategy(lm, tok, ids, cfg)
    assert isinstance(r, StrategyResult) and r.strategy == name
    assert r.text in r.samples and set(r.samples) <= {t for t, _ in SCRIPT}
    want = r.auto["n"] if name == "auto" else (1 if name == "greedy" else 3)
    if name in ("step-beam", "tree"):  # a partial solution sampled twice is one candidate (step_search.distinct)
        assert 1 <= r.n_used <= want and r.generated_tokens > 0
    else:
        assert r.n_used == want and r.generated_tokens > 0
    assert r.answer == extract(r.text)
    direct = STRATEGIES[name](lm, tok, ids, cfg, DecodeContext(prompt="Q: how many?"))
    assert direct.samples == r.samples and direct.text == r.text  # run_strategy only dispatches


def test_streamed_chunks_batches_and_cancel_reach_the_hooks(scripted_lm, tok):
    lm, ids = scripted_lm
    chunks, batches = [], []
    r = run_strategy(lm, tok, ids, DecodeConfig("greedy", max_tokens=40), on_chunk=chunks.append)
    assert "".join(c.text for c in chunks) == r.text == "Answer: 7" and chunks[-1].finish_reason == "stop"
    cut = run_strategy(lm, tok, ids, DecodeConfig("greedy", max_tokens=40), cancelled=lambda: True)
    assert cut.text == "A" and cut.generated_tokens == 1  # stopped after the first chunk
    cfg = DecodeConfig("self-consistency", n=6, max_tokens=40, sampling=SamplingConfig(1.0, seed=0), adaptive=True)
    r = run_strategy(lm, tok, ids, cfg, on_samples=batches.append, batch=2)  # keywords override the config
    assert [len(b) for b in batches] == [2] * (r.n_used // 2)


def test_greedy_is_deterministic_and_takes_the_likeliest_script(scripted_lm, tok):
    lm, ids = scripted_lm
    a = run_strategy(lm, tok, ids, "greedy", max_tokens=40)
    b = run_strategy(lm, tok, ids, "greedy", max_tokens=40, sampling=SamplingConfig(temperature=1.0, seed=9))
    assert a.text == b.text == "Answer: 7" and a.answer == "7" and a.n_used == 1
    assert a.generated_tokens == len(tok.encode("Answer: 7"))


def test_self_consistency_votes_over_all_samples(scripted_lm, tok):
    lm, ids = scripted_lm
    cfg = SamplingConfig(temperature=1.0, seed=0)
    r = run_strategy(lm, tok, ids, "self-consistency", n=16, max_tokens=40, sampling=cfg)
    assert sum(r.votes.values()) == 16 and r.n_used == 16 and len(r.samples) == 16
    assert r.answer == max(r.votes, key=r.votes.get) and r.answer in r.text
    again = run_strategy(lm, tok, ids, "self-consistency", n=16, max_tokens=40, sampling=cfg)
    assert again.votes == r.votes and again.samples == r.samples  # seeded: reproducible


def test_best_of_n_scorers(scripted_lm, tok, tmp_path):
    lm, ids = scripted_lm
    cfg = SamplingConfig(temperature=1.0, seed=0)
    by_lp = run_strategy(lm, tok, ids, "best-of-n", n=12, max_tokens=40, sampling=cfg)
    assert len(by_lp.scores) == 12 and by_lp.scores.index(max(by_lp.scores)) == by_lp.samples.index(by_lp.text)
    # the verifier prefers the sample whose arithmetic checks out
    ver = run_strategy(lm, tok, ids, "best-of-n", n=12, max_tokens=40, sampling=cfg, scorer="verifier")
    assert ver.text == "so 3 + 5 = 8. Answer: 8"
    # an oracle reward with the gold answer (what `mlxpt eval` can do)
    acc = run_strategy(
        lm, tok, ids, "best-of-n", n=12, max_tokens=40, sampling=cfg, scorer="reward:accuracy", row={"answer": "9"}
    )
    assert acc.answer == "9" and max(acc.scores) == 1.0
    # a user function from a file; one that raises scores -inf instead of crashing
    f = tmp_path / "check.py"
    f.write_text(
        "def short(prompt, completion):\n    return -len(completion)\n\ndef bad(prompt, completion):\n    raise RuntimeError('x')\n"
    )
    short = run_strategy(lm, tok, ids, "best-of-n", n=12, max_tokens=40, sampling=cfg, scorer=f"verifier:{f}:short")
    assert short.text == "x 9"
    bad = run_strategy(lm, tok, ids, "best-of-n", n=4, max_tokens=40, sampling=cfg, scorer=f"reward:{f}:bad")
    assert bad.scores == [-math.inf] * 4 and bad.text == bad.samples[0]


def test_weighted_vote_by_reward(scripted_lm, tok):
    lm, ids = scripted_lm
    cfg = SamplingConfig(temperature=1.0, seed=0)
    r = run_strategy(
        lm, tok, ids, "self-consistency", n=12, max_tokens=40, sampling=cfg, scorer="verifier", weighting="reward"
    )
    assert r.answer == "8" and r.weights["8"] > r.weights.get("7", 0)


def test_adaptive_stops_early_when_the_answer_is_clear(tok, V):
    ids = prompt_ids(tok)
    sure = FakeLM(V, scripted(tok, len(ids), [("Answer: 4", 0.999), ("so 5", 0.001)], V))
    cfg = SamplingConfig(temperature=1.0, seed=0)
    r = run_strategy(sure, tok, ids, "self-consistency", n=16, max_tokens=20, sampling=cfg, adaptive=True, batch=4)
    assert r.n_used == 4 and r.answer == "4" and len(r.samples) == 4
    safe = run_strategy(
        sure, tok, ids, "self-consistency", n=16, max_tokens=20, sampling=cfg, adaptive=True, batch=4, confidence=None
    )
    assert safe.n_used == 12 and safe.answer == "4"  # 12-0 with 4 left is safe; 8-0 with 8 left is not


def test_adaptive_uses_the_whole_budget_on_a_split_vote(scripted_lm, tok):
    lm, ids = scripted_lm
    cfg = SamplingConfig(temperature=1.0, seed=0)
    r = run_strategy(lm, tok, ids, "self-consistency", n=8, max_tokens=40, sampling=cfg, adaptive=True, batch=2)
    assert 2 <= r.n_used <= 8 and sum(r.votes.values()) == r.n_used


def test_beam_finds_the_likelier_sequence_greedy_misses(tok, V):
    """First token: 'a' 0.5 then ten equally likely tails (0.05 each); 'b' 0.4 then a sure end."""
    ids = prompt_ids(tok)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    tails = [tok.encode(c)[0] for c in "0123456789"]
    eos = tok.eos_token_id

    def fn(history):
        gen = history[len(ids) :]
        logits = np.full(V, -30.0, np.float32)
        if not gen:
            logits[a], logits[b] = math.log(0.5), math.log(0.4)
        elif gen[0] == a and len(gen) == 1:
            logits[tails] = 0.0
        else:
            logits[eos] = 30.0
        return logits

    lm = FakeLM(V, fn)
    assert run_strategy(lm, tok, ids, "greedy", max_tokens=5).text.startswith("a")
    beams = beam_search(lm, tok, ids, width=2, max_tokens=5, alpha=0.0)
    assert beams[0].text == "b" and beams[0].finish_reason == "stop"
    assert beams[0].sum_logprob == pytest.approx(math.log(0.4 / 0.9), abs=1e-3)
    r = run_strategy(lm, tok, ids, "beam", n=2, max_tokens=5, length_penalty=0.0)
    assert r.text == "b" and len(r.scores) == 2 and r.scores[0] >= r.scores[1]
    assert beam_search(lm, tok, ids, width=1, max_tokens=5, alpha=0.0)[0].text.startswith("a")


def test_beam_rejects_bad_width():
    with pytest.raises(ConfigError) as e:
        beam_search(None, None, [1], width=0)
    assert e.value.code == "E625"


# ---- scorers ---------------------------------------------------------------------------------


def test_arithmetic_verifier():
    assert arithmetic_steps("9 * 12 = 108\n108 - 9 = 99\nAnswer: 99") == (2, 2)
    assert arithmetic_steps("9 * 12 = 107\n107 - 9 = 98") == (1, 2)
    assert arithmetic_steps("2 + 3 * 4 = 14, 10 / 4 = 2.5") == (2, 2)
    assert arithmetic_verifier(None, "9 * 12 = 108\nAnswer: 108") == 1.0
    assert arithmetic_verifier(None, "9 * 12 = 107\nAnswer: 107") == 0.0
    assert arithmetic_verifier(None, "no answer") == 0.0
    assert arithmetic_verifier(None, "Answer: 5") == 0.5


@pytest.mark.parametrize(
    "spec", ["", "votes", "reward:", "verifier:nope", "rm:/no/such/run", "reward:/no/file.py:f", "reward:x.py"]
)
def test_bad_scorer_specs_are_one_line_errors(spec):
    with pytest.raises(ConfigError) as e:
        check_spec(spec)
    assert e.value.code == "E622" and "\n" not in e.value.line()


def test_unknown_reward_name_is_an_error():
    with pytest.raises(ConfigError) as e:
        make_scorer("reward:no_such_reward")
    assert e.value.code == "E622"


def test_repetition_penalty_reaches_both_decode_paths(tok, V):
    """A model that always slightly prefers 'a' (then 'b'): greedy repeats 'a' forever; a strong
    repetition penalty moves it off 'a' once 'a' is in the context, streamed or batched."""
    a, b = tok.encode("a")[0], tok.encode("b")[0]

    def fn(history):
        logits = np.zeros(V, np.float32)
        logits[a], logits[b] = 2.0, 1.5
        return logits

    lm = FakeLM(V, fn)
    ids = prompt_ids(tok, "Q")
    plain = run_strategy(lm, tok, ids, "greedy", max_tokens=6)
    assert plain.text == "aaaaaa"
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=5.0)
    pen = run_strategy(lm, tok, ids, "greedy", max_tokens=6, sampling=cfg)
    assert pen.text.startswith("ab") and pen.text != "aaaaaa"
    group = run_strategy(lm, tok, ids, "sample", n=2, max_tokens=6, sampling=cfg)
    assert group.samples == [pen.text] * 2
