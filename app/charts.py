"""Which charts a run gets, chosen from the keys its step and eval events carry.

A new method adds a few `ChartSpec`s here, not a screen: the monitor draws every spec whose keys
appear in the run's events. Pure functions of plain dicts, tested without an app.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Series = tuple[str, list[float], list[float]]  # (label, x = steps, y)
EVAL_KEYS = ("val_", "regression_")  # keys read from eval events


@dataclass(frozen=True)
class ChartSpec:
    title: str
    keys: tuple[str, ...]  # plotted as lines; "val_*" and "regression_*" keys come from eval events
    band: tuple[str, str] | None = None  # (mean key, std key): draw mean ± std
    prefix: str | None = None  # one line per key with this prefix (reward/<fn>)


CHARTS = (
    ChartSpec("loss", ("loss", "val_loss")),
    ChartSpec("forgetting: regression accuracy %", ("regression_accuracy",)),
    ChartSpec("forgetting: KL to base (regression set)", ("regression_kl",)),
    ChartSpec("learning rate", ("lr",)),
    ChartSpec("tokens/s", ("tokens_per_s",)),
    ChartSpec("peak memory (MB)", ("peak_memory_mb",)),
    ChartSpec("DPO margin", ("margin", "val_margin")),
    ChartSpec("accuracy (preference or task)", ("accuracy", "val_accuracy")),
    ChartSpec("chosen / rejected reward", ("rewards_chosen", "rewards_rejected")),
    ChartSpec("reward mean ± std", (), band=("reward_mean", "reward_std")),
    ChartSpec("reward per function", (), prefix="reward/"),
    ChartSpec("validation reward", ("val_reward",)),
    ChartSpec("KL", ("kl",)),
    ChartSpec("clip fraction", ("clip_fraction",)),
    ChartSpec("completion length", ("completion_len_mean", "completion_len_max")),
    ChartSpec("zero-std groups / truncated", ("zero_std_fraction", "truncated_fraction")),
    ChartSpec("generation tokens/s", ("gen_tokens_per_s",)),
    ChartSpec("RFT round: kept share, accept rate, pass@N", ("rft_kept_share", "rft_accept_rate", "rft_pass_at_n")),
    ChartSpec("RFT round: kept samples (all; from a hint)", ("rft_kept", "rft_hint_kept")),
)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _line(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if _num(r.get(key)) and _num(r.get("step")):
            xs.append(r["step"])
            ys.append(float(r[key]))
    return xs, ys


def series_for(spec: ChartSpec, steps: list[dict], evals: list[dict]) -> list[Series]:
    """The lines of one chart; empty when the run has none of its keys."""
    out: list[Series] = []
    for key in spec.keys:
        xs, ys = _line(evals if key.startswith(EVAL_KEYS) else steps, key)
        if xs:
            out.append((key, xs, ys))
    if spec.band:
        mean, std = spec.band
        xs, ys = _line(steps, mean)
        if xs:
            sd = [float(r.get(std, 0.0)) if _num(r.get(std)) else 0.0 for r in steps if _num(r.get(mean))]
            out.append(("mean", xs, ys))
            out.append(("+std", xs, [m + s for m, s in zip(ys, sd, strict=True)]))
            out.append(("-std", xs, [m - s for m, s in zip(ys, sd, strict=True)]))
    if spec.prefix:
        keys = sorted({k for r in steps for k in r if k.startswith(spec.prefix)})
        for key in keys:
            xs, ys = _line(steps, key)
            if xs:
                out.append((key[len(spec.prefix) :], xs, ys))
    return out


def charts_for(steps: list[dict], evals: list[dict]) -> list[tuple[ChartSpec, list[Series]]]:
    """Every chart with data, in CHARTS order."""
    return [(spec, s) for spec in CHARTS if (s := series_for(spec, steps, evals))]
