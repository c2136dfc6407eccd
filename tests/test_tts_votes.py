"""Vote counting, adaptive stopping, length penalty and answer extraction for voting (pure, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxpt.decode.votes import (
    adaptive_schedule,
    beta_confidence,
    leader_is_safe,
    length_penalty,
    logprob_weight,
    reward_weight,
    should_stop,
    vote,
)
from mlxpt.rewards.extract import extract, same_answer


def test_majority_vote_counts_and_abstentions():
    v = vote(["7", None, "8", "7", None])
    assert v.answer == "7" and v.counts == {"7": 2, "8": 1} and v.abstained == 2


def test_vote_ties_go_to_the_answer_seen_first():
    assert vote(["8", "7", "7", "8"]).answer == "8"
    assert vote(["7", "8", "8", "7"]).answer == "7"
    assert vote([None, "3", "4"]).answer == "3"


def test_all_abstain_gives_no_answer():
    v = vote([None, None])
    assert v.answer is None and v.counts == {} and v.abstained == 2
    assert vote([]).answer is None


def test_weighted_vote_can_overturn_the_majority_and_ties_stay_first_seen():
    answers = ["7", "7", "8"]
    assert vote(answers).answer == "7"
    assert vote(answers, [0.1, 0.1, 0.9]).answer == "8"
    assert vote(answers, [0.25, 0.25, 0.5]).answer == "7"  # tie on weight: first seen
    assert vote(answers, [float("nan"), float("nan"), 0.1]).answer == "8"  # non-finite weighs 0
    with pytest.raises(ValueError):
        vote(answers, [1.0])


def test_weights_from_logprob_and_reward():
    assert logprob_weight(0.0) == 1.0 and logprob_weight(math.log(0.5)) == pytest.approx(0.5)
    assert logprob_weight(float("-inf")) == 0.0
    assert reward_weight(None) == 0.0 and reward_weight(-2.0) == 0.0 and reward_weight(0.75) == 0.75


def test_leader_is_safe_only_with_a_strict_lead_over_the_remaining_samples():
    assert leader_is_safe({"7": 5, "8": 1}, 3)  # lead 4 > 3
    assert not leader_is_safe({"7": 5, "8": 2}, 3)  # lead 3: the runner-up could tie
    assert not leader_is_safe({"7": 3}, 3)  # a new answer could take every remaining sample
    assert leader_is_safe({"7": 4}, 3)
    assert leader_is_safe({}, 0) and not leader_is_safe({}, 1)


def test_beta_confidence_closed_form():
    assert beta_confidence(4, 0) == pytest.approx(31 / 32)  # P(Bin(5, 1/2) <= 4)
    assert beta_confidence(3, 3) == pytest.approx(0.5)
    for a, b in [(1, 0), (5, 2), (7, 6), (2, 9)]:
        assert beta_confidence(a, b) + beta_confidence(b, a) == pytest.approx(1.0)
    rng = np.random.default_rng(0)  # Monte Carlo check of P(Beta(a+1, b+1) > 1/2)
    for a, b in [(3, 1), (6, 2), (2, 2)]:
        mc = (rng.beta(a + 1, b + 1, 200_000) > 0.5).mean()
        assert beta_confidence(a, b) == pytest.approx(mc, abs=0.005)


def test_should_stop_rules():
    assert should_stop({"7": 2}, 16, 16)  # budget reached
    assert should_stop({"7": 4}, 4, 16, threshold=0.95)  # 4-0: confidence 0.969
    assert not should_stop({"7": 3}, 3, 16, threshold=0.95)  # 3-0: 0.9375
    assert not should_stop({"7": 4}, 4, 16, threshold=None)  # safe-only: 12 samples could overtake
    assert should_stop({"7": 9}, 9, 16, threshold=None)  # lead 9 > 7 remaining
    assert not should_stop({}, 4, 16, threshold=0.5)  # nothing to be confident about


@settings(max_examples=300, deadline=None)
@given(
    answers=st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=12),
    batch=st.integers(1, 4),
)
def test_safe_only_adaptive_stop_never_changes_the_answer(answers, batch):
    """Stopping early (safe rule only) gives the same vote as any way of spending the rest."""
    budget = len(answers)
    used = adaptive_schedule(answers, budget, batch, threshold=None)
    early = vote(answers[:used]).answer
    if used < budget:  # exhaustive over continuations with the seen answers, a new one and abstain
        assert early is not None
        choices = sorted({a for a in answers[:used] if a is not None}) + ["new", None]
        rest = budget - used
        for tail in itertools.islice(itertools.product(choices, repeat=rest), 5000):
            assert vote(list(answers[:used]) + list(tail)).answer == early
    assert vote(answers[:budget]).answer == early or used < budget


def test_adaptive_schedule_reports_samples_used():
    unanimous = ["5"] * 16
    assert adaptive_schedule(unanimous, 16, 4, 0.95) == 4
    assert adaptive_schedule(unanimous, 16, 4, None) == 12  # 12-0 with 4 left: safe
    assert adaptive_schedule(unanimous, 16, 1, None) == 9  # 9-0 with 7 left
    split = ["1", "2"] * 8
    assert adaptive_schedule(split, 16, 4, 0.95) == 16


def test_length_penalty():
    assert length_penalty(-6.0, 3, 0.0) == -6.0
    assert length_penalty(-6.0, 3, 1.0) == -2.0
    assert length_penalty(-6.0, 0, 1.0) == -6.0  # never divides by zero
    # with alpha 1 a long confident beam beats a short unsure one; with alpha 0 the short one wins
    long, short = (-2.0, 10), (-1.0, 2)
    assert length_penalty(*long, 1.0) > length_penalty(*short, 1.0)
    assert length_penalty(*long, 0.0) < length_penalty(*short, 0.0)


@pytest.mark.parametrize(
    ("text", "how", "want"),
    [
        ("3 * 4 = 12\nAnswer: 1,200", "auto", "1200"),
        ("Answer: 7.0", "auto", "7"),
        ("**Answer:** $12", "auto", "12"),
        ("so 5 then 6. The answer is 6.", "auto", "6"),
        ("no digits here", "auto", None),
        ("", "auto", None),
        ("Result => 42 <= done", "re:=> (\\d+)", "42"),
        ("\\boxed{\\frac{1}{2}}", "auto", "0.5"),
        ("<answer> 8 </answer> then 9", "auto", "8"),
    ],
)
def test_extraction_edge_cases_that_voting_depends_on(text, how, want):
    assert extract(text, how) == want


def test_equal_answers_vote_together_after_normalisation():
    answers = [extract(t) for t in ("Answer: 1,200", "Answer: 1200.0", "Answer: $1200", "Answer: 12")]
    v = vote(answers)
    assert v.counts == {"1200": 3, "12": 1} and same_answer(v.answer, "1200")
