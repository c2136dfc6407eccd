"""Decoding options: one `DecodeConfig` for every strategy, shared by `mlxpt generate`, `mlxpt chat`,
`mlxpt eval` and the TUI chat (and whatever serves answers next), and `check_decode`, which
validates one before any model loads.

`sampling=None` means the strategy's default: temperature DEFAULT_TEMPERATURE for the strategies
that draw samples (temperature 0 would make every sample the same), 0 for greedy and beam.
Greedy always decodes at temperature 0, keeping only the seed and repetition penalty it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxpt.decode.sampling import SamplingConfig
from mlxpt.errors import ConfigError

STRATEGY_NAMES = ("greedy", "sample", "best-of-n", "self-consistency", "beam")  # strategies.STRATEGIES' keys
SAMPLED = ("sample", "best-of-n", "self-consistency")  # the strategies that draw samples
WEIGHTINGS = ("none", "logprob", "reward")
DEFAULT_TEMPERATURE = 0.7


@dataclass
class DecodeConfig:
    strategy: str = "greedy"  # one of STRATEGY_NAMES
    n: int = 8  # samples (sample, best-of-n, self-consistency) or beam width
    max_tokens: int = 256  # most tokens to generate per sample
    sampling: SamplingConfig | None = None  # temperature, top-p/k, min-p, seed, repetition penalty (None: default)
    scorer: object = None  # best-of-n scorer: a spec (scorers.py) or a scorers.Scorer (None: logprob)
    extract: str = "auto"  # final-answer extractor (rewards/extract.py)
    weighting: str = "none"  # self-consistency vote weights: none | logprob | reward (by `scorer`)
    adaptive: bool = False  # self-consistency: draw `batch` samples at a time, stop once the vote is decided
    batch: int = 4  # adaptive: samples drawn between stopping checks
    confidence: float | None = 0.95  # adaptive: stop at this P(leader wins) (None: only when safe)
    length_penalty: float = 1.0  # beam: score = log-prob / length**this
    stop_strings: tuple[str, ...] = ()  # batched samples end at the first of these

    @property
    def streamed(self) -> bool:
        """True for one streamed decode (greedy, or a single sample): text can be shown as it comes."""
        return self.strategy == "greedy" or (self.strategy == "sample" and self.n == 1)

    def sampling_settings(self) -> SamplingConfig:
        """The sampling settings this strategy runs with (`sampling_for`)."""
        return sampling_for(self.strategy, self.sampling)


def default_temperature(strategy: str) -> float:
    """DEFAULT_TEMPERATURE for the strategies that draw samples, 0 for greedy and beam."""
    return DEFAULT_TEMPERATURE if strategy in SAMPLED else 0.0


def sampling_for(strategy: str, sampling: SamplingConfig | None) -> SamplingConfig:
    """The sampling settings a strategy runs with (greedy always uses temperature 0)."""
    if strategy == "greedy":
        base = sampling or SamplingConfig()
        return SamplingConfig(0.0, 1.0, 0, 0.0, base.seed, base.repetition_penalty)
    return sampling or SamplingConfig(temperature=default_temperature(strategy))


def check_strategy(strategy: str, n: int, weighting: str = "none", batch: int = 4, confidence: float | None = 0.95):
    """ConfigError E620/E621/E626 for an unknown strategy or out-of-range settings."""
    if strategy not in STRATEGY_NAMES:
        raise ConfigError(
            "E620", f"unknown strategy {strategy!r}", "--strategy", f"use one of {', '.join(STRATEGY_NAMES)}"
        )
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


def check_decode(cfg: DecodeConfig) -> None:
    """ConfigError for any setting a strategy would reject, before a model loads or a token is drawn:
    the strategy and its numbers, the extractor, the sampling ranges, the beam settings and the
    scorer spec (when the strategy uses one)."""
    from mlxpt.decode.beam import check_beam
    from mlxpt.decode.sampling import validate_sampling
    from mlxpt.decode.scorers import check_spec
    from mlxpt.rewards.extract import check_method

    check_strategy(cfg.strategy, cfg.n, cfg.weighting, cfg.batch, cfg.confidence)
    check_method(cfg.extract)
    s = cfg.sampling_settings()
    validate_sampling(s.temperature, s.top_p, s.top_k, s.min_p, s.seed)
    if cfg.strategy == "beam":
        check_beam(cfg.n, cfg.length_penalty)
    uses_scorer = cfg.strategy == "best-of-n" or (cfg.strategy == "self-consistency" and cfg.weighting == "reward")
    if uses_scorer and (cfg.scorer is None or isinstance(cfg.scorer, str)):
        check_spec(cfg.scorer)
