"""Decoding options: one `DecodeConfig` for every strategy, shared by `mlxpt generate`, `mlxpt chat`,
`mlxpt eval` and the TUI chat (and whatever serves answers next), and `check_decode`, which
validates one before any model loads.

`sampling=None` means the strategy's default: temperature DEFAULT_TEMPERATURE for the strategies
that draw samples (temperature 0 would make every sample the same), 0 for greedy and beam.
Greedy always decodes at temperature 0, keeping only the seed and repetition penalty it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlxpt.decode.sampling import SamplingConfig
from mlxpt.errors import ConfigError

STRATEGY_NAMES = (
    "greedy",
    "sample",
    "best-of-n",
    "self-consistency",
    "beam",
    "auto",
    "step-beam",
    "tree",
)  # strategies.STRATEGIES' keys
SAMPLED = ("sample", "best-of-n", "self-consistency", "step-beam", "tree", "auto")  # the strategies that draw samples
STEP_STRATEGIES = ("step-beam", "tree")  # step-level search (step_search.py)


def reads_scorer(strategies, weighting: str | None) -> bool:
    """Whether `--scorer` is used by these strategies (a name or several): best-of-n, auto, a step
    search (its step values), or reward-weighted votes."""
    names = (strategies,) if isinstance(strategies, str) else tuple(strategies)
    return any(s in ("best-of-n", "auto", *STEP_STRATEGIES) for s in names) or weighting == "reward"


STEP_AGGREGATES = ("min", "last", "product")
TREE_SEARCHES = ("bfs", "dfs")
WEIGHTINGS = ("none", "logprob", "reward")
DEFAULT_TEMPERATURE = 0.7


@dataclass
class SearchConfig:
    """Step-level search settings of `step-beam` and `tree` (step_search.py)."""

    beam_width: int | None = None  # partial solutions kept per step (dvts: subtrees; None: the config's n)
    expand: int = 4  # sampled next steps per expanded partial solution
    delimiter: str | None = None  # a step ends at this string (kept in the step); None: the PRM scorer's, else "\n"
    aggregate: str = "min"  # step scores -> a partial solution's value: min | last | product
    max_steps: int = 16  # most steps in one solution
    dvts: bool = False  # step-beam: beam_width independent subtrees, each keeping its best child
    tree_search: str = "bfs"  # tree: bfs (best beam_width per level) | dfs (best first, backtracking)
    prune_threshold: float | None = None  # drop partial solutions valued below this (None: keep all)
    max_nodes: int = 256  # most steps sampled in one search
    max_search_tokens: int | None = None  # most tokens generated in one search (None: no limit)
    max_seconds: float | None = None  # wall-clock limit of one search (None: no limit)


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
    search: SearchConfig = field(default_factory=SearchConfig)  # step-beam, tree: step-level search
    budget: int | None = None  # auto: generated tokens per prompt (budget.py)
    calibration: object = None  # auto: table path(s; several are pooled) or a budget.CalibrationTable
    budget_mode: str = "prompt"  # auto: the budget bounds each prompt's expected tokens, or (mean) their mean

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
    if cfg.strategy in STEP_STRATEGIES:
        check_search(cfg.search, cfg.strategy, s.temperature)
        width = cfg.search.beam_width or cfg.n
        if cfg.strategy == "step-beam" and s.temperature == 0 and width > 1:  # once drawn, counted, never said
            raise ConfigError(
                "E627", f"temperature 0 makes the beam's {width} first steps the same", "--temperature",
                "use a positive temperature such as 0.7, or --beam-width 1",
            )  # fmt: skip
    if cfg.strategy == "auto":
        from mlxpt.decode.budget import check_auto

        check_auto(cfg)
    uses_scorer = cfg.strategy in ("best-of-n", *STEP_STRATEGIES) or (
        cfg.strategy == "self-consistency" and cfg.weighting == "reward"
    )
    if uses_scorer and (cfg.scorer is None or isinstance(cfg.scorer, str)):
        check_spec(cfg.scorer)
    if cfg.strategy in STEP_STRATEGIES:
        from mlxpt.decode.scorers import search_delimiter

        search_delimiter(cfg.scorer, cfg.search.delimiter)  # E638: not the PRM's (its config read, nothing loads)


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_search(search: SearchConfig, strategy: str = "step-beam", temperature: float = DEFAULT_TEMPERATURE) -> None:
    """ConfigError E627/E631-E637 for step-search settings out of range (before any model loads)."""
    s = search
    checks = [
        (s.beam_width is None or _whole(s.beam_width, 1), "E631", f"beam width {s.beam_width!r} is out of range", "--beam-width",
         "use a whole number >= 1"),
        (_whole(s.expand, 1), "E631", f"expand={s.expand!r} is out of range", "--expand", "use a whole number >= 1"),
        (s.delimiter is None or (isinstance(s.delimiter, str) and s.delimiter != ""), "E632", "the step delimiter is empty",
         "--step-delimiter", "use e.g. '\\n' (the default) or '. '"),
        (s.aggregate in STEP_AGGREGATES, "E633", f"unknown step aggregate {s.aggregate!r}", "--step-aggregate",
         f"use {', '.join(STEP_AGGREGATES)}"),
        (_whole(s.max_steps, 1), "E634", f"max-steps={s.max_steps!r} is out of range", "--max-steps", "use a whole number >= 1"),
        (s.tree_search in TREE_SEARCHES, "E635", f"unknown tree search {s.tree_search!r}", "--tree-search",
         f"use {', '.join(TREE_SEARCHES)}"),
        (s.prune_threshold is None or (isinstance(s.prune_threshold, (int, float)) and math.isfinite(s.prune_threshold)),
         "E636", f"prune threshold {s.prune_threshold!r} is not a finite number", "--prune-threshold",
         "use a value such as 0.3 (values are in [0, 1] for prm, verifier, logprob and rm scorers)"),
        (_whole(s.max_nodes, 1), "E637", f"max-nodes={s.max_nodes!r} is out of range", "--max-nodes", "use a whole number >= 1"),
        (s.max_search_tokens is None or _whole(s.max_search_tokens, 1), "E637",
         f"max-search-tokens={s.max_search_tokens!r} is out of range", "--max-search-tokens", "use a whole number >= 1"),
        (s.max_seconds is None or (isinstance(s.max_seconds, (int, float)) and 0 < s.max_seconds < math.inf),
         "E637", f"max-seconds={s.max_seconds!r} is out of range", "--max-seconds", "use a number of seconds > 0"),
        (not (s.dvts and strategy == "tree"), "E627", "--dvts is a step-beam option", "--dvts",
         "use --strategy step-beam --dvts, or drop --dvts"),
        (s.expand == 1 or temperature > 0, "E627", f"temperature 0 makes all {s.expand} expansions the same",
         "--temperature", "use a positive temperature such as 0.7, or --expand 1"),
    ]  # fmt: skip
    for ok, code, what, where, hint in checks:
        if not ok:
            raise ConfigError(code, what, where, hint)
