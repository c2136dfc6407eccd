"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of each row.

Objective: minimise -sum(mask * log p(token | prefix)) / sum(mask), with `mask` marking every
assistant turn (default), everything after the prompt, or every token (data/encode.py).
Everything else (validation order, runs, checkpoints, resume) is the shared runner's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from mlxpt.config import SFTConfig
from mlxpt.data.batching import collate
from mlxpt.data.encode import encode_all, pad_id_of
from mlxpt.data.formats import load_splits
from mlxpt.errors import MlxptError
from mlxpt.objectives import sft_objective
from mlxpt.train.loop import Task, rows_task
from mlxpt.train.runner import Method, TaskContext, resume_command, rows_shape, run_training

__all__ = ["SFT", "prepare_data", "resume_command", "run_sft"]


def read_rows(cfg: SFTConfig):
    return load_splits(cfg.data.data, cfg.data.valid)


def prepare_data(cfg: SFTConfig, tokenizer, rows=None):
    """(train examples, valid examples, report); raises DataError before any model load."""
    d = cfg.data
    train_rows, valid_rows = rows if rows is not None else read_rows(cfg)
    kw = {"mask": d.mask, "max_len": d.max_seq_len, "overlong": d.overlong}
    train, train_report = encode_all(train_rows, tokenizer, **kw)
    valid, valid_report = encode_all(valid_rows, tokenizer, **kw) if valid_rows else ([], {})
    if not train:
        raise MlxptError("E170", "no trainable rows left after encoding", d.data, "check max_seq_len and the mask mode")
    return train, valid, {"train": train_report, "valid": valid_report}


def sft_task(ctx: TaskContext) -> Task:
    return rows_task(
        collate=partial(collate, pad_id=pad_id_of(ctx.tokenizer)),
        length=lambda e: len(e.tokens),
        tokens=lambda e: len(e.tokens) - 1,
    )


SFT = Method(
    name="sft",
    read=read_rows,
    encode=prepare_data,
    objective=lambda cfg, layout: sft_objective,
    task=sft_task,
    length=lambda e: len(e.tokens),
    memory_shape=rows_shape(1),
)


def run_sft(
    cfg: SFTConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one SFT run; return (run folder, "finished" | "interrupted")."""
    return run_training(SFT, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
