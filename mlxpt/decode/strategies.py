"""Test-time scaling strategies behind one call: `run_strategy(model, tokenizer, prompt, name, n)`.

- `greedy`: one argmax decode (mlx-lm's streaming path, the fastest single stream);
- `sample`: n samples (one streamed decode for n = 1, else one batched group); the first is the answer;
- `best-of-n`: n samples in one batch (prompt prefilled once), ranked by a scorer (scorers.py);
- `self-consistency`: n samples, final answers extracted (extract.py) and voted (votes.py),
  optionally weighted by mean log-prob or a reward; `adaptive=True` draws `batch` samples at a
  time and stops as soon as the leader is safe or confident, reporting the samples used;
- `beam`: beam search of width n (beam.py).

Sampling strategies default to temperature 0.7 when no SamplingConfig is given (temperature 0
would make every sample the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlxpt.decode.sampling import SamplingConfig
from mlxpt.errors import ConfigError

STRATEGIES = ("greedy", "sample", "best-of-n", "self-consistency", "beam")
WEIGHTINGS = ("none", "logprob", "reward")
DEFAULT_TEMPERATURE = 0.7


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


def check_strategy(strategy: str, n: int, weighting: str = "none", batch: int = 4, confidence: float | None = 0.95):
    """ConfigError E620/E621/E626 for an unknown strategy or out-of-range settings."""
    if strategy not in STRATEGIES:
        raise ConfigError("E620", f"unknown strategy {strategy!r}", "--strategy", f"use one of {', '.join(STRATEGIES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("E621", f"n={n!r} is out of range", "--n", "use a whole number >= 1")
    if weighting not in WEIGHTINGS:
        raise ConfigError(
            "E626", f"unknown vote weighting {weighting!r}", "--weighting", f"use {', '.join(WEIGHTINGS)}"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError("E626", f"adaptive batch={batch!r} is out of range", "--batch", "use a whole number >= 1")
    if confidence is not None and not (isinstance(confidence, (int, float)) and 0.5 < confidence <= 1):
        raise ConfigError(
            "E626",
            f"confidence={confidence!r} is out of range",
            "--confidence",
            "use a value in (0.5, 1]; 1: safe-only",
        )


def sampling_for(strategy: str, sampling: SamplingConfig | None) -> SamplingConfig:
    """The sampling settings a strategy runs with (greedy always uses temperature 0)."""
    if strategy == "greedy":
        base = sampling or SamplingConfig()
        return SamplingConfig(0.0, 1.0, 0, 0.0, base.seed, base.repetition_penalty)
    return sampling or SamplingConfig(temperature=DEFAULT_TEMPERATURE)


def _group_fn() -> Callable:
    from mlxpt.decode.batch import generate_group

    return generate_group


def _stream(model, tokenizer, prompt_tokens, max_tokens, cfg: SamplingConfig) -> tuple[str, int, str]:
    """(text, generated tokens, finish reason) of one streamed decode."""
    from mlxpt.decode.generate import iter_generate
    from mlxpt.decode.sampling import sampler_from

    parts, last = [], None
    for chunk in iter_generate(model, tokenizer, prompt_tokens, max_tokens, sampler_from(cfg), cfg.repetition_penalty):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last.generation_tokens, last.finish_reason


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


def _weights(weighting: str, completions: Sequence, rewards: list[float] | None) -> list[float] | None:
    from mlxpt.decode.votes import logprob_weight, reward_weight

    if weighting == "logprob":
        return [logprob_weight(c.mean_logprob) if c.logprobs else 0.0 for c in completions]
    if weighting == "reward":
        return [reward_weight(r) for r in rewards or []]
    return None


def run_strategy(
    model,
    tokenizer,
    prompt_tokens: Sequence[int],
    strategy: str,
    n: int = 8,
    max_tokens: int = 256,
    sampling: SamplingConfig | None = None,
    scorer=None,
    extract: str = "auto",
    *,
    adaptive: bool = False,
    batch: int = 4,
    confidence: float | None = 0.95,
    weighting: str = "none",
    length_penalty: float = 1.0,
    prompt=None,
    row: dict | None = None,
    stop_strings: Sequence[str] = (),
    on_samples: Callable[[list], None] | None = None,
) -> StrategyResult:
    """Run one strategy on one prompt (see the module doc). `scorer` is a spec string or a
    `scorers.Scorer` (default `logprob`; with weighting="reward" it weights the vote); `prompt`
    and `row` are what scorers see (default: the decoded prompt, no row fields);
    `on_samples(completions)` is called after each drawn batch (live progress for a UI)."""
    from mlxpt.rewards.extract import check_method
    from mlxpt.rewards.extract import extract as extract_answer

    check_strategy(strategy, n, weighting, batch, confidence)
    check_method(extract)
    cfg = sampling_for(strategy, sampling)
    from mlxpt.decode.sampling import processors_from, validate_sampling

    validate_sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.seed)
    if prompt is None:
        prompt = tokenizer.decode(list(prompt_tokens))
    t0 = time.perf_counter()

    if strategy == "greedy" or (strategy == "sample" and n == 1):
        text, ntok, reason = _stream(model, tokenizer, prompt_tokens, max_tokens, cfg)
        return _result(strategy, [text], 0, [extract_answer(text, extract)], ntok, t0, finish_reasons=[reason])

    if strategy == "beam":
        from mlxpt.decode.beam import beam_search

        stats: dict = {}
        beams = beam_search(model, tokenizer, prompt_tokens, n, max_tokens, length_penalty, stats)
        texts = [b.text for b in beams]
        answers = [extract_answer(t, extract) for t in texts]
        return _result(
            strategy, texts, 0, answers, stats["generated_tokens"], t0,
            scores=[b.score for b in beams], n_used=n, finish_reasons=[b.finish_reason for b in beams],
        )  # fmt: skip

    from mlxpt.decode.sampling import sampler_from

    sampler = sampler_from(cfg)
    processors = processors_from(cfg)
    generate_group = _group_fn()
    score_fn = None
    if strategy == "best-of-n" or weighting == "reward":
        from mlxpt.decode.scorers import Scorer, make_scorer

        score_fn = scorer if isinstance(scorer, Scorer) else make_scorer(scorer, model, tokenizer)

    def draw(k: int) -> list:
        got = generate_group(
            model, tokenizer, list(prompt_tokens), k, max_tokens, sampler, tuple(stop_strings), processors
        )
        if on_samples is not None:
            on_samples(got)
        return got

    if strategy == "self-consistency" and adaptive:
        from mlxpt.decode.votes import should_stop

        completions: list = []
        counts: dict[str, int] = {}
        while True:
            got = draw(min(batch, n - len(completions)))
            completions += got
            for c in got:
                a = extract_answer(c.text, extract)
                if a is not None:
                    counts[a] = counts.get(a, 0) + 1
            if should_stop(counts, len(completions), n, confidence):
                break
    else:
        completions = draw(n)

    texts = [c.text for c in completions]
    answers = [extract_answer(t, extract) for t in texts]
    ntok = sum(len(c.tokens) for c in completions)
    reasons = [c.finish_reason for c in completions]
    scores = score_fn(prompt, completions, row) if score_fn is not None else None

    if strategy == "sample":
        return _result(strategy, texts, 0, answers, ntok, t0, finish_reasons=reasons)
    if strategy == "best-of-n":
        best = max(range(len(texts)), key=lambda i: (scores[i], -i))  # ties: the earliest sample
        return _result(strategy, texts, best, answers, ntok, t0, scores=scores, finish_reasons=reasons)

    from mlxpt.decode.votes import vote

    v = vote(answers, _weights(weighting, completions, scores))
    if v.answer is None:
        pick = 0
    else:  # the most confident sample among those that gave the winning answer
        pick = max((i for i, a in enumerate(answers) if a == v.answer), key=lambda i: completions[i].mean_logprob)
    return _result(
        strategy, texts, pick, answers, ntok, t0, scores=scores, votes=v.counts, answer=v.answer,
        weights=v.weights if weighting != "none" else None, finish_reasons=reasons,
    )  # fmt: skip
