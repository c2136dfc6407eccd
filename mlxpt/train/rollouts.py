"""GRPO rollouts: sample a group of completions per prompt, score them with the guarded rewards,
and turn them into one batch for the objective (group-relative advantages, the loss mask, and
the old/reference log-probs the clipped surrogate and the KL need).

`sample_rollout` is a function of its inputs: each completion draws from keys of its own
(`keys`, one per prompt, see `sampling.make_keyed_sampler`), so a prompt's samples are the same
whichever rank samples it and whatever prompts share its batch. What a window keeps for its
`num_iterations` updates, and what a step reports, is grpo.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mlxpt.config import GRPOConfig
from mlxpt.data.batching import collate
from mlxpt.data.encode import Example
from mlxpt.data.prompts import PromptExample
from mlxpt.rewards import RewardGuard


def group_advantages(rewards: np.ndarray, scale: str = "group", eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, zero-std flag per group) for rewards of shape (prompts, G)."""
    r = np.asarray(rewards, dtype=np.float64)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True) if r.shape[1] > 1 else np.zeros_like(mean)
    zero = std[:, 0] < 1e-6
    if scale == "group":
        adv = (r - mean) / (std + eps)
    elif scale == "batch":
        adv = (r - mean) / ((r.std(ddof=1) if r.size > 1 else 0.0) + eps)
    elif scale == "none":
        adv = r - mean
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return adv.astype(np.float32), zero


@dataclass(frozen=True)
class Rollout:
    """One micro-batch of scored completions: the arrays the objective trains on, in the run's
    layout, and plain-number stats for the step report."""

    batch: tuple
    stats: dict
    ranks: list | None = None  # several ranks, mu > 1: every rank's (batch, stats), for checkpoints


@dataclass(frozen=True)
class RolloutSpec:
    """Everything sampling and scoring need besides the prompts."""

    cfg: GRPOConfig
    tokenizer: object
    backend: object
    guard: RewardGuard
    sampler: Callable
    pad: int
    grouped: bool  # the shared-prompt layout (each prompt once per group)
    # the settings sampling and scoring read (max_completion_length, extract, format_regex):
    # GRPO's `grpo` section by default; RFT passes its `rft` section, which names them alike
    section: object = None

    @property
    def g(self):
        return self.cfg.grpo if self.section is None else self.section


def score(spec: RolloutSpec, e: PromptExample, text: str, n_tokens: int) -> tuple[float, dict]:
    """(total reward, reward per function) of one completion of `e`."""
    g = spec.g
    row = {
        **e.row.fields,
        "completion_tokens": n_tokens,
        "max_completion_length": g.max_completion_length,
        "extract_method": g.extract,
        "format_regex": g.format_regex,
    }
    scores = spec.guard.score(e.row.prompt, text, row)
    return spec.guard.total(scores), scores


def sample_scored(spec: RolloutSpec, examples: list[PromptExample], G: int, keys: list[int] | None = None):
    """G completions of each prompt in one batched generation, each scored: (seqs as (example,
    ids with the stop token, truncated), total rewards, rewards per function, samples, stats, seconds).
    `keys`: one sampling key per prompt (the spec's sampler is keyed)."""
    from mlxpt.decode.batch import GroupStats, generate_groups  # imports MLX (after the BLAS is chosen)

    model = spec.backend.model
    model.eval()
    gs = GroupStats()
    t0 = time.perf_counter()
    groups = generate_groups(
        model, spec.tokenizer, [e.tokens for e in examples], G, spec.g.max_completion_length, spec.sampler,
        stats=gs, keys=keys,
    )  # fmt: skip
    seqs, totals, per_fn, samples = [], [], [], []
    for e, comps in zip(examples, groups, strict=True):
        for c in comps:
            ids = c.tokens + ([c.stop_token] if c.stop_token is not None else [])
            total, scores = score(spec, e, c.text, len(c.tokens))
            seqs.append((e, ids, c.finish_reason == "length"))
            totals.append(total)
            per_fn.append(scores)
            samples.append({"prompt": e.row.prompt, "completion": c.text, "reward": total, "rewards": scores})
    return seqs, totals, per_fn, samples, gs, time.perf_counter() - t0


def sample_rollout(spec: RolloutSpec, examples: list[PromptExample], keys: list[int] | None = None) -> Rollout:
    """Sample, score and batch one micro-batch of prompts (`keys`: one sampling key per prompt)."""
    G = spec.cfg.grpo.num_generations
    seqs, totals, per_fn, samples, gs, t_gen = sample_scored(spec, examples, G, keys)
    rewards = np.array(totals, dtype=np.float64).reshape(len(examples), G)  # a float32 cast could overflow
    batch, seq_tokens, zero = _batch(spec, examples, seqs, rewards, spec.cfg.grpo.skip_zero_std_groups)
    stats = _stats(seqs, totals, per_fn, samples[:G], gs.generated_tokens, t_gen, int(zero.sum()), len(examples))
    return Rollout(batch, {**stats, "seq_tokens": seq_tokens, "prompt_tokens": [list(e.tokens) for e in examples]})


def sample_dynamic(
    spec: RolloutSpec,
    draws: Iterator[tuple],
    want: int,
    most: int,
    agree: Callable[[np.ndarray], tuple[np.ndarray, int]] | None = None,
) -> Rollout:
    """DAPO's dynamic sampling: sample the next draw of prompts (`draws` yields (examples, keys,
    data position after them)) until `want` groups have unequal rewards or `most` draws beyond
    the first are spent; train on the first `want` such groups, in data order. If no group had
    any, the last draw's groups are kept with a zero loss weight (as `skip_zero_std_groups` does).
    The step report counts every drawn group; `draws` and `after` (the data position once done)
    are in the stats.

    Several ranks: each draw holds this rank's part of the batch, and `agree(zero)` turns its
    equal-reward flags into every rank's (in data order) and this rank's offset in them, so the
    ranks choose the groups one process would, each training on its own; a rank left with none
    keeps its last draw's groups with a zero loss weight."""
    agree = agree or (lambda zero: (zero, 0))
    G = spec.cfg.grpo.num_generations
    kept: list[tuple] = []  # (example, its G seqs, its rewards)
    seqs_all, totals_all, fn_all, samples_all = [], [], [], []
    gen_tokens = n_zero = n_groups = taken = 0
    seconds = 0.0
    for n, (examples, keys, end) in enumerate(draws, 1):
        after = end  # where the data stands once this draw is taken
        seqs, totals, per_fn, samples, gs, t_gen = sample_scored(spec, examples, G, keys)
        rewards = np.array(totals, dtype=np.float64).reshape(len(examples), G)
        zero = group_advantages(rewards)[1]
        seqs_all += seqs
        totals_all += totals
        fn_all += per_fn
        samples_all += samples
        gen_tokens, seconds = gen_tokens + gs.generated_tokens, seconds + t_gen
        n_zero, n_groups = n_zero + int(zero.sum()), n_groups + len(examples)
        every, offset = agree(zero)
        chosen = np.flatnonzero(~every)[: max(0, want - taken)]  # over every rank's groups
        taken += len(chosen)
        for j in chosen - offset:
            if 0 <= j < len(examples):
                kept.append((examples[j], seqs[j * G : (j + 1) * G], rewards[j]))
        if taken >= want or n > most:
            break
    if kept:
        examples = [e for e, _, _ in kept]
        seqs = [s for _, group, _ in kept for s in group]
        rewards = np.stack([r for _, _, r in kept])
    # nothing kept here: the last draw, masked (with other ranks' groups chosen, its own may differ)
    batch, seq_tokens, _ = _batch(spec, examples, seqs, rewards, skip=True, mute=not kept)
    stats = _stats(seqs_all, totals_all, fn_all, samples_all[:G], gen_tokens, seconds, n_zero, n_groups)
    return Rollout(batch, {
        **stats, "seq_tokens": seq_tokens, "prompt_tokens": [list(e.tokens) for e in examples],
        "draws": n, "kept_groups": len(kept), "after": list(after),
    })  # fmt: skip


def _stats(seqs, totals, per_fn, samples, gen_tokens: int, seconds: float, zero: int, groups: int) -> dict:
    """The step report's numbers of every sampled completion (grpo.py's `report`)."""
    return {
        "rewards": totals,
        "per_fn": per_fn,
        "zero_std": zero,
        "groups": groups,
        "lengths": [len(ids) for _, ids, _ in seqs],
        "truncated": sum(t for _, _, t in seqs),
        "gen_s": seconds,
        "gen_tokens": gen_tokens,
        "samples": samples,  # the first prompt's group
    }


def _batch(
    spec: RolloutSpec, examples, seqs, rewards: np.ndarray, skip: bool, mute: bool = False
) -> tuple[tuple, int, np.ndarray]:
    """(the objective's arrays, trained sequence tokens, zero-std flag per group) of scored
    groups: group-relative advantages; with `skip`, groups whose rewards are all equal are left
    out (all of them kept with a zero loss weight when every group is such); `mute`: every group
    kept with a zero loss weight."""
    g, G = spec.cfg.grpo, spec.cfg.grpo.num_generations
    adv, zero = group_advantages(rewards, g.scale_rewards)
    keep = np.ones(len(seqs), bool)
    if skip and zero.any() and not zero.all() and not mute:
        keep = ~np.repeat(zero, G)
    rows = []
    for i, (e, ids, truncated) in enumerate(seqs):
        if not keep[i]:
            continue
        train = not (truncated and g.mask_truncated_completions) and not (zero.all() and skip) and not mute
        rows.append(Example(list(e.tokens) + ids, [0] * len(e.tokens) + [int(train)] * len(ids), e.row.where))
    arrays, mask = _arrays(spec, examples, seqs, rows, keep)
    empty = np.zeros((0,), np.float32)
    old = spec.backend.token_logps(*arrays).astype(np.float32) if g.num_iterations > 1 else empty
    ref = spec.backend.token_logps(*arrays, reference=True).astype(np.float32) if g.beta > 0 else empty
    seq_tokens = int(sum(len(r.tokens) for r in rows))
    return (*arrays, mask, adv.reshape(-1)[keep], old, ref), seq_tokens, zero


def _arrays(spec: RolloutSpec, examples, seqs, rows, keep) -> tuple[tuple, np.ndarray]:
    """(the arrays the backend scores, the loss mask): `(inputs, targets)` of whole rows, or
    with shared prompts `(prompts, left_pad, completions)` (one prompt per kept group)."""
    if not spec.grouped:
        inputs, targets, mask = collate(rows, spec.pad)
        return (inputs, targets), mask
    from mlxpt.backends.shared_prefix import layout  # imports MLX (after the BLAS is chosen)

    G = spec.cfg.grpo.num_generations
    kept = [i for i in range(len(seqs)) if keep[i]]
    prompts = [examples[i // G].tokens for i in kept[::G]]  # keep drops whole groups
    comps = [seqs[i][1] for i in kept]
    pr, lp, co = layout(prompts, comps, spec.pad, pad_to=8)
    mask = np.zeros(co.shape, np.float32)
    for j, (row, ids) in enumerate(zip(rows, comps, strict=True)):
        mask[j, : len(ids)] = row.mask[-1] if ids else 0.0  # the row's train flag
    return (pr, lp, co), mask
