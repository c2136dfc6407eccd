"""Settings of distillation from a teacher (`mlxpt train distill`, train/distill.py): SFT's data
and sections plus `distill` (the teacher, token- or sequence-level, the divergence, the cache)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxpt.config.sections import (
    OTHER_OWNERS,
    AdapterConfig,
    DataConfig,
    ModelConfig,
    Sections,
    TrainConfig,
    opt,
)
from mlxpt.errors import ConfigError


@dataclass
class DistillSection:
    teacher: str | None = opt(
        None, "teacher: a model (like --model) or an mlxpt run / adapter folder (its base + adapter)"
    )
    mode: str = opt(
        "token", "token: match the teacher's distributions per trained token (GKD); sequence: SFT on the "
        "teacher's own answers to the data's prompts (generated once, cached in the run)", ("token", "sequence"),
    )  # fmt: skip
    divergence: str = opt(
        "forward_kl", "token mode: KL(teacher||student), KL(student||teacher) or TRL's generalised JSD",
        ("forward_kl", "reverse_kl", "jsd"),
    )  # fmt: skip
    jsd_beta: float = opt(0.5, "jsd: the mixture weight beta in (0, 1) (towards 0: forward KL, towards 1: reverse KL)")
    temperature: float = opt(1.0, "temperature of both distributions in the divergence, and of sampled answers")
    on_policy_ratio: float = opt(
        0.0, "token mode: probability that a batch's responses are the student's own samples (GKD's lambda)"
    )
    teacher_cache: str = opt(
        "none", "token mode: teacher log-probs per batch (none), or its top-k per trained token cached once in the run",
        ("none", "top-k"),
    )  # fmt: skip
    top_k: int = opt(
        64, "--teacher-cache top-k: teacher log-probs kept per trained token (both renormalised over them)"
    )
    teacher_greedy: bool = opt(True, "sequence mode: the teacher answers greedily (off: sampled at --temperature)")
    max_completion_length: int = opt(256, "sequence mode and on-policy samples: most tokens generated per answer")


@dataclass
class DistillConfig(Sections):
    """Distillation: SFT's data (prompts + responses) and sections plus `distill`."""

    UNUSED = ("packing",)  # rows are not packed for this method

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(packing=False))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillSection = field(default_factory=DistillSection)


OTHER_OWNERS["distill"] = DistillConfig  # a distill setting given to another method names distill


def check_settings(cfg: DistillConfig) -> None:
    """Refusals of the distill section (E740, E741): before anything is read."""
    d = cfg.distill
    if not d.teacher or not str(d.teacher).strip():
        raise ConfigError(
            "E740", "distillation needs a teacher", "--teacher",
            "give --teacher MODEL (a folder, hub id or alias) or --teacher runs/<id> (a run's base + adapter)",
        )  # fmt: skip
    bad = [
        ("jsd_beta", not 0 < d.jsd_beta < 1, "in (0, 1); use --divergence forward_kl or reverse_kl for the ends"),
        ("top_k", d.top_k < 1, ">= 1"),
        ("on_policy_ratio", not 0 <= d.on_policy_ratio <= 1, "in [0, 1]"),
    ]
    for name, wrong, allowed in bad:
        if wrong:
            raise ConfigError(
                "E741", f"{name}={getattr(d, name)!r} is out of range ({allowed})", f"--{name.replace('_', '-')}",
                d.__dataclass_fields__[name].metadata["help"],
            )  # fmt: skip
    if d.mode == "sequence" and (d.on_policy_ratio > 0 or d.teacher_cache != "none"):
        what = "--on-policy-ratio" if d.on_policy_ratio > 0 else "--teacher-cache"
        raise ConfigError(
            "E742", f"{what} is a token-mode setting; --mode sequence trains SFT on the teacher's answers", what,
            f"drop {what}, or use --mode token",
        )  # fmt: skip
