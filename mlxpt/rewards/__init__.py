"""Verifiable rewards: answer extraction (extract.py) and reward functions with their guard
(functions.py). Pure Python over text; no model, no MLX."""

from mlxpt.rewards.functions import (
    ANSWER_LINE,
    FLOAT32_MAX,
    REWARDS,
    RewardGuard,
    RewardStop,
    accuracy,
    arithmetic,
    format_reward,
    length,
    load_reward,
    parse_rewards,
    tags,
)

__all__ = [
    "ANSWER_LINE", "FLOAT32_MAX", "REWARDS", "RewardGuard", "RewardStop", "accuracy", "arithmetic",
    "format_reward", "length", "load_reward", "parse_rewards", "tags",
]  # fmt: skip
