"""Test-time scaling strategies: one function per strategy in `STRATEGIES`, all run with one
`DecodeConfig` (options.py) through `run_strategy(model, tokenizer, prompt_tokens, cfg)`.

- `greedy`: one argmax decode (mlx-lm's streaming path, the fastest single stream);
- `sample`: n samples (one streamed decode for n = 1, else one batched group); the first is the answer;
- `best-of-n`: n samples in one batch (prompt prefilled once), ranked by a scorer (scorers.py);
- `self-consistency`: n samples, final answers extracted (rewards/extract.py) and voted (votes.py),
  optionally weighted by mean log-prob or a reward; `adaptive=True` draws `batch` samples at a
  time and stops as soon as the leader is safe or confident, reporting the samples used;
- `beam`: beam search of width n (beam.py).
- `step-beam`, `tree`: step-level search (PRM-guided beam, DVTS, Tree-of-Thoughts; step_search.py);
- `auto`: per prompt, a difficulty estimate picks the strategy and N within a token budget (budget.py).

Every strategy function takes (model, tokenizer, prompt_tokens, cfg, ctx) and returns a
StrategyResult; `ctx` (DecodeContext) carries what one call adds: the prompt and row scorers see,
and the live hooks of a UI (streamed chunks, drawn batches, cancellation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from mlxpt.decode.options import DecodeConfig, check_decode


@dataclass
class StrategyResult:
    text: str  # the chosen answer text
    samples: list[str]  # every sample (beams for `beam`), in draw order
    scores: list[float] | None  # best-of-n scores / beam scores, one per sample
    votes: dict[str, int] | None  # self-consistency: answer -> count
    answer: str | None  # extracted final answer of `text`
    n_used: int  # samples drawn (< n when adaptive stopping ended early)
    generated_tokens: int
    seconds: float
    strategy: str = ""
    answers: list[str | None] | None = None  # extracted answer per sample
    weights: dict[str, float] | None = None  # weighted vote totals
    finish_reasons: list[str] = field(default_factory=list)
    prefilled_tokens: int = 0  # step-beam, tree: tokens run through the model outside decoding
    stopped_by: str | None = None  # step-beam, tree: solution | exhausted | max-steps | max-nodes | ...
    search: dict | None = None  # step-beam, tree: nodes, pruned, backtracks, depth, the best path's steps
    auto: dict | None = None  # auto: what it chose, the difficulty estimate and the tokens spent (budget.py)
    # step-beam, tree: each sample's token ids, the end-of-turn token it stopped at included
    sample_tokens: list[list[int]] | None = None


@dataclass
class DecodeContext:
    prompt: object = None  # what scorers see (run_strategy's default: the decoded prompt tokens)
    row: dict | None = None  # row fields scorers see (e.g. the gold `answer` in `mlxpt eval`)
    on_samples: Callable[[list], None] | None = None  # called with each drawn batch of completions
    on_chunk: Callable | None = None  # called with each GenerationChunk of a streamed decode
    cancelled: Callable[[], bool] | None = None  # a streamed decode stops once this returns True
    pool: list | None = None  # completions drawn before (auto's probe): `drawer` serves these first


def _result(strategy: str, texts: list[str], pick: int, answers: list, tokens: int, t0: float, **kw) -> StrategyResult:
    """A StrategyResult choosing `texts[pick]`; `answer` defaults to that sample's answer."""
    kw.setdefault("n_used", len(texts))
    return StrategyResult(
        text=texts[pick],
        samples=texts,
        scores=kw.pop("scores", None),
        votes=kw.pop("votes", None),
        answer=kw.pop("answer", answers[pick]),
        generated_tokens=tokens,
        seconds=time.perf_counter() - t0,
        strategy=strategy,
        answers=answers,
        **kw,
    )


def _stream(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """One streamed decode; each chunk goes to ctx.on_chunk as it comes."""
    from mlxpt.decode.generate import iter_generate
    from mlxpt.decode.sampling import sampler_from
    from mlxpt.rewards.extract import extract

    t0 = time.perf_counter()
    s = cfg.sampling_settings()
    parts, ntok, reason = [], 0, None
    for chunk in iter_generate(model, tokenizer, prompt_tokens, cfg.max_tokens, sampler_from(s), s.repetition_penalty):
        parts.append(chunk.text)
        ntok, reason = chunk.generation_tokens or ntok + (chunk.token is not None), chunk.finish_reason
        if ctx.on_chunk is not None:
            ctx.on_chunk(chunk)
        if ctx.cancelled is not None and ctx.cancelled():
            break
    text = "".join(parts)
    return _result(cfg.strategy, [text], 0, [extract(text, cfg.extract)], ntok, t0, finish_reasons=[reason])


def drawer(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> Callable[[int], list]:
    """`draw(k)`: k more completions in one batch. The sampler (and so the seed) is set up once,
    here, so successive draws continue one random stream."""
    from mlxpt.decode.batch import generate_group
    from mlxpt.decode.sampling import processors_from, sampler_from

    s = cfg.sampling_settings()
    sampler, processors = sampler_from(s), processors_from(s)

    def draw(k: int) -> list:
        served = ctx.pool[:k] if ctx.pool else []
        if served:
            del ctx.pool[: len(served)]
        if len(served) == k:
            return served
        got = generate_group(
            model, tokenizer, list(prompt_tokens), k - len(served), cfg.max_tokens, sampler, tuple(cfg.stop_strings),
            processors,
        )  # fmt: skip
        if ctx.on_samples is not None:
            ctx.on_samples(got)
        return served + got

    return draw


def scorer_for(cfg: DecodeConfig, model, tokenizer):
    """cfg.scorer as a `scorers.Scorer` (a spec is built with the model for `logprob`/`rm:`)."""
    from mlxpt.decode.scorers import Scorer, make_scorer

    return cfg.scorer if isinstance(cfg.scorer, Scorer) else make_scorer(cfg.scorer, model, tokenizer)


def _read(completions: Sequence, how: str) -> tuple[list[str], list[str | None], int, list[str]]:
    """(texts, extracted answers, generated tokens, finish reasons) of drawn completions."""
    from mlxpt.rewards.extract import extract

    texts = [c.text for c in completions]
    answers = [extract(t, how) for t in texts]
    return texts, answers, sum(len(c.tokens) for c in completions), [c.finish_reason for c in completions]


def greedy(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """One argmax decode, streamed."""
    return _stream(model, tokenizer, prompt_tokens, cfg, ctx)


def sample(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """n samples, the first is the answer: one streamed decode for n = 1, else one batched group."""
    if cfg.n == 1:
        return _stream(model, tokenizer, prompt_tokens, cfg, ctx)
    t0 = time.perf_counter()
    texts, answers, ntok, reasons = _read(drawer(model, tokenizer, prompt_tokens, cfg, ctx)(cfg.n), cfg.extract)
    return _result(cfg.strategy, texts, 0, answers, ntok, t0, finish_reasons=reasons)


def best_of_n(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """n samples in one batch, the best by cfg.scorer is the answer. Equal scores (the verifier's
    1.0 for every sample with right arithmetic) go to the sample the model finds likelier (mean
    log-prob), then to the earliest: a tie never goes to sampling order alone."""
    t0 = time.perf_counter()
    draw = drawer(model, tokenizer, prompt_tokens, cfg, ctx)
    score = scorer_for(cfg, model, tokenizer)
    completions = draw(cfg.n)
    texts, answers, ntok, reasons = _read(completions, cfg.extract)
    scores = score(ctx.prompt, completions, ctx.row)
    best = max(range(len(texts)), key=lambda i: (scores[i], completions[i].mean_logprob, -i))
    return _result(cfg.strategy, texts, best, answers, ntok, t0, scores=scores, finish_reasons=reasons)


def _draw_adaptive(draw: Callable[[int], list], cfg: DecodeConfig) -> list:
    """Batches of cfg.batch samples until the vote is decided (votes.should_stop) or n are drawn."""
    from mlxpt.decode.votes import should_stop
    from mlxpt.rewards.extract import extract

    completions: list = []
    counts: dict[str, int] = {}
    while True:
        got = draw(min(cfg.batch, cfg.n - len(completions)))
        completions += got
        for c in got:
            a = extract(c.text, cfg.extract)
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        if should_stop(counts, len(completions), cfg.n, cfg.confidence):
            return completions


def self_consistency(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """n samples (fewer when adaptive stopping ends early), final answers voted; the answer text is
    the most confident sample (mean log-prob) among those that gave the winning answer."""
    from mlxpt.decode.votes import vote, vote_weights

    t0 = time.perf_counter()
    draw = drawer(model, tokenizer, prompt_tokens, cfg, ctx)
    score = scorer_for(cfg, model, tokenizer) if cfg.weighting == "reward" else None
    completions = _draw_adaptive(draw, cfg) if cfg.adaptive else draw(cfg.n)
    texts, answers, ntok, reasons = _read(completions, cfg.extract)
    scores = score(ctx.prompt, completions, ctx.row) if score is not None else None
    v = vote(answers, vote_weights(cfg.weighting, completions, scores))
    if v.answer is None:
        pick = 0
    else:
        pick = max((i for i, a in enumerate(answers) if a == v.answer), key=lambda i: completions[i].mean_logprob)
    return _result(
        cfg.strategy, texts, pick, answers, ntok, t0, scores=scores, votes=v.counts, answer=v.answer,
        weights=v.weights if cfg.weighting != "none" else None, finish_reasons=reasons,
    )  # fmt: skip


def beam(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """Beam search of width n; the best beam is the answer, every beam a sample."""
    from mlxpt.decode.beam import beam_search
    from mlxpt.rewards.extract import extract

    t0 = time.perf_counter()
    stats: dict = {}
    beams = beam_search(model, tokenizer, prompt_tokens, cfg.n, cfg.max_tokens, cfg.length_penalty, stats)
    texts = [b.text for b in beams]
    answers = [extract(t, cfg.extract) for t in texts]
    return _result(
        cfg.strategy, texts, 0, answers, stats["generated_tokens"], t0,
        scores=[b.score for b in beams], n_used=cfg.n, finish_reasons=[b.finish_reason for b in beams],
    )  # fmt: skip


def auto(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """Compute-optimal: estimate the prompt's difficulty, then run the strategy and N with the best
    expected accuracy within cfg.budget tokens (budget.py)."""
    from mlxpt.decode.budget import run_auto

    return run_auto(model, tokenizer, prompt_tokens, cfg, ctx, STRATEGIES, drawer)


def step_beam(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """Beam search over reasoning steps scored per step (step_search.py)."""
    from mlxpt.decode.step_search import step_beam as search

    return StrategyResult(**search(model, tokenizer, prompt_tokens, cfg, ctx))


def tree(model, tokenizer, prompt_tokens, cfg: DecodeConfig, ctx: DecodeContext) -> StrategyResult:
    """Tree-of-Thoughts BFS / DFS over reasoning steps (tree.py)."""
    from mlxpt.decode.tree import tree_search

    return StrategyResult(**tree_search(model, tokenizer, prompt_tokens, cfg, ctx))


Strategy = Callable[..., StrategyResult]  # (model, tokenizer, prompt_tokens, cfg, ctx) -> StrategyResult

STRATEGIES: dict[str, Strategy] = {
    "greedy": greedy,
    "sample": sample,
    "best-of-n": best_of_n,
    "self-consistency": self_consistency,
    "beam": beam,
    "auto": auto,
    "step-beam": step_beam,
    "tree": tree,
}


def run_strategy(
    model, tokenizer, prompt_tokens: Sequence[int], cfg: DecodeConfig | str, *, prompt=None, row: dict | None = None,
    on_samples=None, on_chunk=None, cancelled=None, **settings,
) -> StrategyResult:  # fmt: skip
    """Run cfg.strategy on one prompt (see the module doc and DecodeContext for the hooks).

    `cfg` is a DecodeConfig, or a strategy name with DecodeConfig fields as keywords
    (`run_strategy(model, tok, ids, "beam", n=4)`); keywords also override a config's fields."""
    if isinstance(cfg, str):
        cfg = DecodeConfig(cfg, **settings)
    elif settings:
        cfg = replace(cfg, **settings)
    check_decode(cfg)
    if prompt is None:
        prompt = tokenizer.decode(list(prompt_tokens))
    ctx = DecodeContext(prompt, row, on_samples, on_chunk, cancelled)
    return STRATEGIES[cfg.strategy](model, tokenizer, prompt_tokens, cfg, ctx)
