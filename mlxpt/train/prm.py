"""Process reward model on the shared runner: the reward model's scalar head (models/heads.py) read
at the end token of every step of stepwise-supervision rows (data/stepwise.py), trained with the
adapter by binary cross-entropy; scoring with a trained one is decode/prm.py.

Objective: Σ_steps -[y log σ(z) + (1 - y) log σ(-z)], z = w · h_end, where h_end is the backbone's
final (normed) hidden state at the step's last token (its delimiter's) and y ∈ [0, 1] the step's
label (soft labels train towards their share), averaged over the steps of a window.

Deviations and simplifications:
- TRL's PRMTrainer is a two-class token classifier on hard labels; this is one logit per step,
  and a label may be any probability (Math-Shepherd's soft estimate).
- The head is the reward model's bias-free Linear(hidden, 1), random at the start (models/heads.py);
  an offset is learnt through the backbone. It is saved as `reward_head.safetensors` beside the
  adapter, in the same format as a reward model's.
- Each step is tokenised on its own with the delimiter after it, so a prefix of steps is scored
  as it is inside the longer solution (what step search needs); rows over max_seq_len lose their
  last steps, never part of a step.
- Validation logs the mean loss per step, step accuracy, first-error-step accuracy, the AUC over
  steps and the AUC of the last step alone (the PRM read as an outcome model).
- MLX backend only (the NumPy backend refuses `prm` with E525).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from mlxpt import objectives
from mlxpt.config import PRMConfig
from mlxpt.data.batching import batch_plan
from mlxpt.data.encode import pad_id_of
from mlxpt.data.stepwise import StepExample, check_delimiter, encode_stepwise, load_stepwise
from mlxpt.decode.prm import collate_steps, sigmoid, step_metrics
from mlxpt.errors import MlxptError
from mlxpt.train.loop import Task, rows_task
from mlxpt.train.rm import head_check, head_method
from mlxpt.train.runner import TaskContext, rows_shape, run_training


def bce_objective(logits, labels, weights):
    """Binary cross-entropy per step from the head's logits (B, S), labels (B, S) in [0, 1] and
    weights (B, S) (0 on padding): (loss summed over steps, steps, {"step_accuracy": hits})."""
    xp = objectives._xp(logits)
    loss = -(labels * objectives._log_sigmoid(xp, logits) + (1 - labels) * objectives._log_sigmoid(xp, -logits))
    hits = ((logits >= 0) == (labels >= 0.5)).astype(xp.float32)
    return (loss * weights).sum(), weights.sum(), {"step_accuracy": (hits * weights).sum()}


def read_rows(cfg: PRMConfig):
    return load_stepwise(cfg.data.data, cfg.data.valid)


def prepare_data(cfg: PRMConfig, tokenizer, rows=None):
    """(train examples, valid examples, report); raises DataError before any model load."""
    d = cfg.data
    train_rows, valid_rows = rows if rows is not None else read_rows(cfg)
    delimiter = check_delimiter(cfg.prm.step_delimiter)
    train, train_report = encode_stepwise(train_rows, tokenizer, delimiter, d.max_seq_len, d.overlong)
    valid, valid_report = (
        encode_stepwise(valid_rows, tokenizer, delimiter, d.max_seq_len, d.overlong) if valid_rows else ([], {})
    )
    if not train:
        raise MlxptError("E158", "no stepwise rows left after encoding", d.data, "check max_seq_len and the data")
    return train, valid, {"train": train_report, "valid": valid_report}


def collate(examples: list[StepExample], pad_id: int):
    """(inputs, step-end positions, labels, weights), each (B, L) or (B, S)."""
    inputs, positions, weights = collate_steps([e.tokens for e in examples], [e.ends for e in examples], pad_id)
    labels = np.zeros(weights.shape, np.float32)
    for i, e in enumerate(examples):
        labels[i, : len(e.labels)] = e.labels
    return inputs, positions, labels, weights


def length(e: StepExample) -> int:
    return len(e.tokens)


def evaluate(backend, examples: list[StepExample], batch_size: int, max_batches: int, pad_id: int) -> dict:
    """val_loss (mean per step) and the PRM's metrics (decode/prm.py) over the first
    `max_batches` batches of a fixed plan of the validation split."""
    plan = batch_plan([length(e) for e in examples], batch_size, seed=0, epoch=0)
    if max_batches >= 0:
        plan = plan[:max_batches]
    scores, labels, total, steps = [], [], 0.0, 0
    for idx in plan:
        part = [examples[i] for i in idx]
        inputs, positions, y, w = collate(part, pad_id)
        z = backend.token_logps(inputs, positions).astype(np.float64)  # output="reward": head logits (B, S)
        loss, n, _ = bce_objective(z, y.astype(np.float64), w.astype(np.float64))
        total, steps = total + float(loss), steps + int(n)
        for row, e in enumerate(part):
            scores.append(sigmoid(z[row, : len(e.labels)]).tolist())
            labels.append(list(e.labels))
    if not steps:
        return {}
    metrics = {f"val_{k}": v for k, v in step_metrics(scores, labels).items()}
    return {"val_loss": total / steps, **metrics, "val_steps": steps}


def prm_task(ctx: TaskContext) -> Task:
    pad_id = pad_id_of(ctx.tokenizer)
    task = rows_task(collate=partial(collate, pad_id=pad_id), length=length, tokens=length)
    return replace(task, evaluate=lambda b, ex, bs, mb: evaluate(b, ex, bs, mb, pad_id))


def make_objective(cfg: PRMConfig, layout: str = "rows"):
    return bce_objective


def _check_delimiter(cfg: PRMConfig) -> None:
    check_delimiter(cfg.prm.step_delimiter, "--step-delimiter")


# MLX only, a step delimiter, and a resume must be of a prm run (before anything is read)
check = head_check("prm", "process reward model", ("E525", "E526"), _check_delimiter)

PRM = head_method(
    "prm",
    check,
    read=read_rows,
    encode=prepare_data,
    objective=make_objective,
    task=prm_task,
    length=length,
    memory_shape=rows_shape(1),
)


def run_prm(
    cfg: PRMConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) a process reward model; return (run folder, "finished" | "interrupted")."""
    return run_training(PRM, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
