"""Reward model on the shared runner: a scalar head on a LoRA-tuned backbone, trained with the
Bradley–Terry loss on preference pairs, and a scorer for any (prompt, response).

Objective: -log σ(r(x, c) - r(x, r)), r = w · h_last, where h_last is the backbone's final
(normed) hidden state at the last token of prompt + response (the end-of-turn token).

Deviations and simplifications:
- The head is one bias-free Linear(hidden, 1) in float32 (a bias cancels in the BT loss and would
  never train); it starts random (normal, std 1/√hidden) from the run seed, so the LoRA weights
  get gradient from step 1. It is saved beside the adapter as `reward_head.safetensors`; the
  adapter files stay mlx-lm's format (the vocabulary head is simply never used).
- The backbone is the instruct model with LoRA/DoRA (or `full` on the last layers), not a
  separately SFT-ed model; chosen and rejected go through one concatenated forward pass.
- Optional centring term λ (r_c + r_r)² (TRL's `center_rewards_coefficient`); off by default.
- Scoring runs the whole prompt + response without the training length limit; the reward is read
  at the response's own end-of-turn token, as in training.
- MLX backend only (the NumPy backend refuses `rm` with E516).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from mlxpt import objectives
from mlxpt.config import RMConfig
from mlxpt.data.encode import pad_id_of
from mlxpt.data.preference import PrefExample
from mlxpt.decode.reward_model import collate_rm
from mlxpt.errors import ConfigError
from mlxpt.models.heads import add_reward_head, save_reward_model
from mlxpt.runs import read_config
from mlxpt.train.dpo import pair_length, prepare_data, read_rows
from mlxpt.train.loop import Task, rows_task
from mlxpt.train.runner import Method, TaskContext, rows_shape, run_training


def head_check(name: str, what: str, codes: tuple[str, str], then: Callable | None = None) -> Callable:
    """A `Method.check` for a method that trains the reward head (`name`, a `what`: rm here, prm
    in prm.py), before anything is read: codes[0] on a backend other than MLX, then `then(cfg)`
    (the method's own refusals), codes[1] when the run to resume is of another method."""
    backend_code, resume_code = codes

    def check(cfg, resume_dir) -> None:
        if cfg.train.backend != "mlx":
            raise ConfigError(
                backend_code, f"the {cfg.train.backend} backend cannot train a {what}", "backend", "use --backend mlx"
            )
        if then is not None:
            then(cfg)
        if resume_dir is not None:
            method = read_config(resume_dir).get("method", "sft")
            if method != name:
                raise ConfigError(
                    resume_code,
                    f"this is a {method} run, not a {what}",
                    str(resume_dir),
                    f"resume it with `mlxpt train --resume {resume_dir}`, or start a new {name} run",
                )

    return check


def head_method(name: str, check: Callable, **fields) -> Method:
    """A `Method` that trains the reward head with the adapter (rm; prm): the backend adds the
    head to the model, hands the objective its outputs ("reward") and saves it beside the adapter."""
    return Method(
        name=name, check=check, output="reward", extend_model=add_reward_head, save=save_reward_model, **fields
    )


def collate_pairs(pairs: list[PrefExample], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """2B rows, B chosen then B rejected (prompt + response each)."""
    return collate_rm([p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs], pad_id)


def rm_task(ctx: TaskContext) -> Task:
    return rows_task(
        collate=partial(collate_pairs, pad_id=pad_id_of(ctx.tokenizer)),
        length=pair_length,
        tokens=lambda p: 2 * len(p.prompt) + len(p.chosen) + len(p.rejected),
    )


def make_objective(cfg: RMConfig, layout: str = "rows"):
    return partial(objectives.bt_objective, center_coef=cfg.rm.center_rewards_coefficient)


# MLX only, and a resume must be of an rm run (before anything is read)
check = head_check("rm", "reward model", ("E516", "E517"))

RM = head_method(
    "rm",
    check,
    read=read_rows,
    encode=prepare_data,
    objective=make_objective,
    task=rm_task,
    length=pair_length,
    memory_shape=rows_shape(2),
)


def run_rm(
    cfg: RMConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) a reward model; return (run folder, "finished" | "interrupted")."""
    return run_training(RM, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
