"""Token samplers for generation: mlx-lm's sampler chain behind one validated factory.

Temperature 0 is greedy (argmax). Top-p, top-k and min-p filter the distribution before a
categorical draw at the given temperature; `seed` seeds MLX's global generator once.

`make_keyed_sampler` draws each row from a key of its own instead of the global generator
(`row_key` of the row's identity: run seed, data position, sample number, token number), so what
a row samples does not depend on which other rows share its batch. GRPO and RFT sample this way:
their samples are the same on one rank or split over several (train/distributed.py), and a
resumed run draws what the straight one drew without saving any generator state.
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


_MASK64 = (1 << 64) - 1


def row_key(*parts: int) -> int:
    """A 64-bit key from whole numbers (splitmix64 over each part): distinct tuples give
    unrelated keys, so neighbouring rows, samples and tokens draw independent numbers."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        z = (h + (int(part) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


def make_keyed_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Callable:
    """A function `(log-probs (B, V), keys: one row_key per row) -> tokens (B,)`: the same filter
    chain as `make_sampler` (`filter_logprobs`), then a Gumbel-max draw at `temperature` (what
    `mx.random.categorical` does) with each row's noise from its own key. Temperature 0 is
    greedy. `sampler.keyed` is True (generate_from passes the keys)."""
    validate_sampling(temperature, top_p, top_k, min_p)
    from mlxpt import _blas

    _blas.activate()
    import mlx.core as mx
    import numpy as np

    def sample(logprobs, keys):
        if temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        logprobs = filter_logprobs(logprobs, top_p, top_k, min_p)
        k = mx.array(np.array([[key >> 32, key & 0xFFFFFFFF] for key in keys], dtype=np.uint32))
        vocab = logprobs.shape[-1]
        noise = mx.vmap(lambda one: mx.random.gumbel((vocab,), key=one))(k)
        return mx.argmax(logprobs * (1 / temperature) + noise, axis=-1)

    sample.keyed = True
    return sample


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
