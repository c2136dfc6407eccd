"""Test-time scaling on the real default model (slow): the strategies run end to end on a bundled
test prompt, and greedy through `run_strategy` is exactly `generate_text`. The accuracy claims
(self-consistency vs greedy, adaptive vs fixed N) are benchmarks: see BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_model(session_mlxpt_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLXPT_HOME", str(session_mlxpt_home))
        from mlxpt.models.loader import load

        yield load("smollm2-135m")


@pytest.fixture(scope="module")
def prompt(default_model):
    from mlxpt.decode.generate import chat_prompt

    row = json.loads((ROOT / "assets/sft/test.jsonl").read_text().splitlines()[1])
    msgs = [m for m in row["messages"] if m["role"] != "assistant"]
    return chat_prompt(default_model[1], msgs), row["answer"]


def test_greedy_strategy_equals_generate_text(default_model, prompt):
    from mlxpt.decode.generate import generate_text
    from mlxpt.decode.strategies import run_strategy

    model, tok = default_model
    ids, _ = prompt
    r = run_strategy(model, tok, ids, "greedy", max_tokens=40)
    assert r.text == generate_text(model, tok, ids, max_tokens=40)
    assert 0 < r.generated_tokens <= 40 and r.seconds > 0


def test_sampled_strategies_on_the_default_model(default_model, prompt):
    from mlxpt.decode.sampling import SamplingConfig
    from mlxpt.decode.strategies import run_strategy

    model, tok = default_model
    ids, _ = prompt
    cfg = SamplingConfig(temperature=0.7, seed=0)
    sc = run_strategy(model, tok, ids, "self-consistency", n=4, max_tokens=48, sampling=cfg)
    assert len(sc.samples) == 4 and sum(sc.votes.values()) + sc.answers.count(None) == 4
    assert sc.answer is None or sc.answer in sc.votes
    bo = run_strategy(model, tok, ids, "best-of-n", n=4, max_tokens=48, sampling=cfg, scorer="verifier")
    assert len(bo.scores) == 4 and bo.text == bo.samples[bo.scores.index(max(bo.scores))]
    again = run_strategy(model, tok, ids, "self-consistency", n=4, max_tokens=48, sampling=cfg)
    assert again.samples == sc.samples  # seeded: reproducible on the real model too
