"""Vote counting and adaptive stopping for self-consistency: pure functions, no I/O.

Self-consistency (Wang et al., 2022) samples several reasoning paths and returns the most frequent
final answer. Samples without an answer abstain. Ties go to the answer seen first, so a vote
depends only on the ordered samples (and the same samples always give the same answer).

Adaptive stopping draws samples in small batches and stops when
- the leader is safe: its lead over the runner-up exceeds the samples still allowed, so no
  continuation up to the budget could change the vote (exact; never a different answer), or
- the leader is confident: P(p_leader > p_runner_up | counts) >= threshold under a uniform Beta
  prior on the two top answers (the Beta rule of Aggarwal et al., 2023, "Let's Sample Step by
  Step: Adaptive-Consistency"). A heuristic: it can stop on an answer a full budget would flip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Vote:
    answer: str | None  # the winning answer (None when every sample abstained)
    counts: dict[str, int]  # answer -> number of samples, in order of first appearance
    weights: dict[str, float]  # answer -> summed weight (= counts for an unweighted vote)
    abstained: int = 0  # samples with no extractable answer


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> Vote:
    """Majority vote over `answers` (None abstains); with `weights`, the largest summed weight wins.

    Ties (equal weight, or equal count in an unweighted vote) go to the answer seen first."""
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(weights)} weights for {len(answers)} answers")
    counts: dict[str, int] = {}
    totals: dict[str, float] = {}
    abstained = 0
    for i, a in enumerate(answers):
        if a is None:
            abstained += 1
            continue
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w):
            w = 0.0
        counts[a] = counts.get(a, 0) + 1
        totals[a] = totals.get(a, 0.0) + w
    best = None
    for a in totals:  # dicts keep first-appearance order; strict > keeps the earliest on ties
        if best is None or totals[a] > totals[best]:
            best = a
    return Vote(best, counts, totals, abstained)


def logprob_weight(mean_logprob: float) -> float:
    """Weight of a sample in a log-prob weighted vote: its per-token geometric-mean probability."""
    return math.exp(mean_logprob) if math.isfinite(mean_logprob) else 0.0


def reward_weight(reward: float | None) -> float:
    """Weight of a sample in a reward-weighted vote: the reward, clipped at 0 (None counts 0)."""
    if reward is None or not math.isfinite(reward):
        return 0.0
    return max(0.0, float(reward))


def vote_weights(weighting: str, completions: Sequence, rewards: Sequence[float | None] | None) -> list[float] | None:
    """Per-sample weights of a vote: `logprob` weighs each completion by `logprob_weight` of its mean
    log-prob (0 without log-probs), `reward` by `reward_weight` of its reward; `none` gives None."""
    if weighting == "logprob":
        return [logprob_weight(c.mean_logprob) if c.logprobs else 0.0 for c in completions]
    if weighting == "reward":
        return [reward_weight(r) for r in rewards or []]
    return None


def top_two(counts: dict[str, int]) -> tuple[int, int]:
    """Counts of the leader and the runner-up (0 when absent)."""
    c = sorted(counts.values(), reverse=True) + [0, 0]
    return c[0], c[1]


def leader_is_safe(counts: dict[str, int], remaining: int) -> bool:
    """True when no way of spending `remaining` more samples can change the winner.

    A runner-up (or a new answer) that takes every remaining sample gains `remaining` on the
    leader; the leader is safe when its lead is larger. An equal lead is not safe: a tie could go
    to an answer seen earlier."""
    if remaining < 0:
        raise ValueError("remaining must be >= 0")
    first, second = top_two(counts)
    if first == 0:
        return remaining == 0
    return first - second > remaining


def beta_confidence(leader: int, runner_up: int) -> float:
    """P(p1 > p2) for p1/(p1+p2) ~ Beta(leader + 1, runner_up + 1), in closed form.

    For whole a, b: P(Beta(a, b) > 1/2) = P(Binomial(a + b - 1, 1/2) <= a - 1)."""
    a, b = leader + 1, runner_up + 1
    n = a + b - 1
    return sum(math.comb(n, k) for k in range(a)) / 2**n


def should_stop(counts: dict[str, int], used: int, budget: int, threshold: float | None = 0.95) -> bool:
    """The adaptive-stopping rule: stop at the budget, when the leader is safe, or (if
    `threshold` is set) when `beta_confidence` of the top two answers reaches it."""
    remaining = budget - used
    if remaining <= 0 or leader_is_safe(counts, remaining):
        return True
    if threshold is None:
        return False
    first, second = top_two(counts)
    return first > 0 and beta_confidence(first, second) >= threshold


def adaptive_schedule(answers: Sequence[str | None], budget: int, batch: int, threshold: float | None = 0.95) -> int:
    """How many of the ordered `answers` adaptive stopping uses: it looks after every `batch`
    samples (and at the budget) and returns the number used when it stops."""
    if batch < 1 or budget < 1:
        raise ValueError("batch and budget must be >= 1")
    counts: dict[str, int] = {}
    used = 0
    while used < budget:
        step = min(batch, budget - used)
        for a in answers[used : used + step]:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        used += step
        if should_stop(counts, used, budget, threshold):
            break
    return used


def length_penalty(sum_logprob: float, length: int, alpha: float = 1.0) -> float:
    """Beam score: the summed log-prob divided by length**alpha (alpha 0: raw sum, 1: mean)."""
    return sum_logprob / (max(length, 1) ** alpha)
