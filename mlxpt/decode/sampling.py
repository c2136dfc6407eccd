"""Token samplers for generation: mlx-lm's sampler chain behind one validated factory.

Temperature 0 is greedy (argmax). Top-p, top-k and min-p filter the distribution before a
categorical draw at the given temperature; `seed` seeds MLX's global generator once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mlxpt.errors import ConfigError


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set with this much probability (1: off)
    top_k: int = 0  # keep the K most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens below min_p x the top probability (0: off)
    seed: int | None = None  # seed MLX's random generator (None: unseeded)
    repetition_penalty: float | None = None  # >1 penalises tokens already in the context (None: off)


def _check(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(
            "E601",
            f"{name.replace('_', '-')}={value!r} is out of range",
            f"--{name.replace('_', '-')}",
            rule,
        )


def validate_sampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None) -> None:
    """Raise ConfigError E601 for values outside their range (before any model loads)."""
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        _check(
            isinstance(v, (int, float)) and math.isfinite(v),
            name,
            v,
            "use a finite number",
        )
    _check(
        temperature >= 0,
        "temperature",
        temperature,
        "use 0 for greedy or a positive value such as 0.7",
    )
    _check(0 < top_p <= 1, "top_p", top_p, "use a value in (0, 1]; 1 turns it off")
    _check(
        isinstance(top_k, int) and top_k >= 0,
        "top_k",
        top_k,
        "use a whole number >= 0; 0 turns it off",
    )
    _check(0 <= min_p < 1, "min_p", min_p, "use a value in [0, 1); 0 turns it off")
    _check(
        seed is None or (isinstance(seed, int) and 0 <= seed < 2**64),
        "seed",
        seed,
        "use a whole number >= 0",
    )


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Callable:
    """A function from log-probabilities (B, V) to tokens (B,); temperature 0 is greedy."""
    validate_sampling(temperature, top_p, top_k, min_p, seed)
    from mlxpt import _blas

    _blas.activate()
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler as _mlx_make_sampler

    if seed is not None:
        mx.random.seed(seed)
    return _mlx_make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)


def sampler_from(cfg: SamplingConfig) -> Callable:
    return make_sampler(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.seed)


def processors_from(cfg: SamplingConfig) -> list[Callable] | None:
    """mlx-lm logits processors for `cfg` (the repetition penalty), or None."""
    if cfg.repetition_penalty is None:
        return None
    if not cfg.repetition_penalty > 0:
        _check(False, "repetition_penalty", cfg.repetition_penalty, "use a value > 0 (1: off)")
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(repetition_penalty=cfg.repetition_penalty)


def filter_logprobs(logprobs, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0):
    """The log-probs (B, V) that `make_sampler` draws from: filtered tokens get -inf (same chain
    and order as the sampler: top-p, min-p, top-k). A pure function, for tests and inspection."""
    validate_sampling(1.0, top_p, top_k, min_p)
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if min_p != 0.0:
        logprobs = apply_min_p(logprobs, min_p)
    if top_k > 0 and top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs
