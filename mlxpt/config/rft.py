"""Settings of rejection-sampling fine-tuning (`mlxpt train rft`, train/rft.py): GRPO's prompt
data and reward settings (same names, same guard), rounds of sampling, and the acceptance rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxpt.config.sections import (
    OTHER_OWNERS,
    AdapterConfig,
    DataConfig,
    ModelConfig,
    Sections,
    TrainConfig,
    default_prompt_data,
    opt,
)
from mlxpt.errors import ConfigError

DEFAULT_ROUNDS = 3  # rounds when neither --rounds nor --steps-per-round is given
SEARCH_STRATEGIES = ("sample", "step-beam", "tree")  # --strategy: plain sampling or a step search
# the settings only a step search reads (the TUI form hides them under --strategy sample)
SEARCH_SETTINGS = ("scorer", "expand", "step_delimiter", "step_aggregate", "max_steps", "prune_threshold")


@dataclass
class RFTSection:
    rounds: int = opt(0, "sampling rounds over the run's --steps (0: steps / steps-per-round, or 3)")
    steps_per_round: int = opt(0, "optimiser steps on each round's kept samples (0: steps / rounds)")
    samples_per_prompt: int = opt(8, "completions sampled per training prompt each round (N)")
    prompts_per_round: int = opt(0, "training prompts sampled each round, a fresh seeded draw (0: all)")
    sample_batch: int = opt(0, "prompts sampled together in one batched generation (0: enough for 32 completions)")
    keep_per_prompt: int = opt(4, "accepted, distinct completions kept per prompt (at most)")
    accept: float | None = opt(
        None, "accept a completion when its total reward is >= this (default: the accuracy reward is 1)"
    )
    keep_truncated: bool = opt(
        False, "keep accepted completions cut at max_completion_length (trained with no stop token)"
    )
    on_empty: str = opt(
        "stop", "a round that accepts nothing: stop the run (checkpoint kept) or sample the next round",
        ("stop", "continue"),
    )  # fmt: skip
    rationalize: bool = opt(
        False,
        "STaR rationalization: a prompt none of whose samples is accepted is sampled again with its answer as a "
        "hint (--hint); what that accepts is trained after the prompt without the hint",
    )
    hint: str = opt(
        "The answer is {answer}.",
        "rationalization: the hint added on a new line to the prompt's last user message; {answer} is the row's answer",
    )
    strategy: str = opt(
        "sample",
        "how a round draws each prompt's candidates: sample (N keyed samples, prompts decoded together) or a "
        "step-level search (step-beam, tree) of width N whose finished solutions are the candidates",
        SEARCH_STRATEGIES,
    )
    scorer: str = opt(
        "verifier", "step search: what scores partial solutions: verifier, logprob, prm:RUN, prm+verifier:RUN or rm:RUN"
    )
    expand: int = opt(4, "step search: sampled next steps per expanded partial solution")
    step_delimiter: str = opt(
        "",
        "step search: text that ends a step (\\n, \\t and \\\\ are read as escapes; default: a prm:RUN scorer's own, else \\n)",
    )
    step_aggregate: str = opt(
        "min", "step search: step scores -> a partial solution's value", ("min", "last", "product")
    )
    max_steps: int = opt(16, "step search: most steps in one solution")
    prune_threshold: float | None = opt(
        None, "step search: drop partial solutions valued below this (default: keep all)"
    )
    max_completion_length: int = opt(128, "most tokens generated per completion")
    temperature: float = opt(1.0, "sampling temperature of the completions")
    top_p: float = opt(1.0, "nucleus sampling mass of the completions (1: off)")
    top_k: int = opt(0, "sample from the K most likely tokens (0: off)")
    min_p: float = opt(0.0, "drop tokens below min-p x the top probability (0: off)")
    rewards: str = opt("accuracy", "reward functions: built-in names or path/file.py:function, comma-separated")
    reward_weights: str | None = opt(None, "weights of the reward functions, comma-separated (default: 1 each)")
    reward_on_error: str = opt(
        "abstain", "a reward call that raises, hangs or returns a non-number counts as", ("abstain", "zero", "stop")
    )
    max_reward_failure_rate: float = opt(0.5, "stop the run when a reward function fails more often than this")
    reward_timeout: float = opt(10.0, "seconds a reward call may take before it counts as failed (0: no limit)")
    extract: str = opt(
        "auto",
        "how the accuracy reward finds the final answer: auto, tag, boxed, hash, answer, last_number, re:<regex>",
    )
    format_regex: str | None = opt(None, "regex the format reward requires (default: ends with an 'Answer: n' line)")


@dataclass
class RFTConfig(Sections):
    """Rejection-sampling fine-tuning: GRPO's data (prompts) plus `rft`; batch_size = kept samples
    per micro-batch."""

    UNUSED = ("packing",)  # rows are not packed for this method

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data=default_prompt_data()))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=60, learning_rate=1e-4, warmup_steps=5, eval_every=20, eval_batches=8, save_every=10
        )
    )
    rft: RFTSection = field(default_factory=RFTSection)


OTHER_OWNERS["rft"] = RFTConfig  # a rft setting given to another method names rft


def round_plan(cfg: RFTConfig) -> tuple[int, int]:
    """(rounds, steps per round) from --steps, --rounds and --steps-per-round (any two of them
    decide; given all three, they must agree). E586 names the disagreement."""
    steps, r = cfg.train.steps, cfg.rft
    for name in (
        "rounds",
        "steps_per_round",
        "samples_per_prompt",
        "prompts_per_round",
        "sample_batch",
        "keep_per_prompt",
    ):
        low = 1 if name in ("samples_per_prompt", "keep_per_prompt") else 0
        if getattr(r, name) < low:
            raise ConfigError(
                "E586", f"{name}={getattr(r, name)} is out of range (>= {low})", f"--{name.replace('_', '-')}",
                r.__dataclass_fields__[name].metadata["help"],
            )  # fmt: skip
    if r.rounds and r.steps_per_round:
        if r.rounds * r.steps_per_round != steps:
            raise ConfigError(
                "E586",
                f"--rounds {r.rounds} x --steps-per-round {r.steps_per_round} is not --steps {steps}",
                "--steps-per-round",
                f"give --steps {r.rounds * r.steps_per_round}, or only two of --steps, --rounds, --steps-per-round",
            )
        return r.rounds, r.steps_per_round
    if r.steps_per_round:
        return -(-steps // r.steps_per_round), r.steps_per_round
    rounds = r.rounds or DEFAULT_ROUNDS
    if steps % rounds:
        raise ConfigError(
            "E586", f"--steps {steps} do not split into {rounds} rounds of equal length", "--rounds",
            f"give --steps {steps - steps % rounds or rounds}, or --steps-per-round",
        )  # fmt: skip
    return rounds, steps // rounds
