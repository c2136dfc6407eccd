"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of each row.

Objective: minimise -sum(mask * log p(token | prefix)) / sum(mask), with `mask` marking every
assistant turn (default), everything after the prompt, or every token (data/encode.py).
With `--replay FILE --replay-ratio R` each micro-batch also holds k replay rows (data/replay.py),
trained like any row; the data plan runs over the training rows with micro-batches of B - k.
With `--kl-to-base B` the loss adds B * sum(mask * KL(p_tuned || p_base)) over the vocabulary at
each trained position, the base being the adapter-off pass (LoRA/DoRA only; reported as `kl`).
With `packing` (the default) the rows of each micro-batch are packed best-fit-decreasing into
bins of max_seq_len positions with block-diagonal causal attention (layout "packed",
backends/packing.py): the same rows per step and the same per-token loss, without the padding.
Everything else (validation order, runs, checkpoints, resume) is the shared runner's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

from mlxpt.backends.base import no_base_error
from mlxpt.config import SFTConfig
from mlxpt.data.batching import collate, collate_packed, packing_efficiency
from mlxpt.data.encode import encode_all, pad_id_of
from mlxpt.data.formats import raise_if_errors, scan_splits
from mlxpt.data.replay import (
    ReplayExample,
    check_settings,
    file_sha256,
    replay_count,
    replay_order,
    replay_picks,
    scan_replay,
)
from mlxpt.errors import MlxptError
from mlxpt.models.memory import Shape
from mlxpt.objectives import sft_kl_objective, sft_objective
from mlxpt.train.loop import LoopState, MicroBatch, Task, iter_batches, rows_task
from mlxpt.train.runner import Method, TaskContext, resume_command, rows_shape, run_training

__all__ = ["SFT", "prepare_data", "resume_command", "run_sft"]


def read_rows(cfg: SFTConfig):
    """(train rows, valid rows, replay rows or None): every row of every file validated, and the
    replay settings checked, before any tokenizer or weights are read."""
    d, r = cfg.data, cfg.reg
    check_settings(r.replay, r.replay_ratio, d.batch_size, d.data, d.valid)
    train, valid, errors = scan_splits(d.data, d.valid)
    replay, label = None, Path(d.data).name
    if r.replay:
        replay, replay_errors = scan_replay(r.replay)
        if replay_errors:
            label = f"{label + ' and ' if errors else ''}the replay file {Path(r.replay).name}"
        errors += replay_errors
    raise_if_errors(errors, label)
    return train, valid, replay


def prepare_data(cfg: SFTConfig, tokenizer, rows=None):
    """(train examples, valid examples, report); raises DataError before any model load. Replay
    rows are encoded the same way and follow the training examples as ReplayExamples."""
    d = cfg.data
    train_rows, valid_rows, *rest = rows if rows is not None else read_rows(cfg)
    replay_rows = rest[0] if rest else None
    kw = {"mask": d.mask, "max_len": d.max_seq_len, "overlong": d.overlong}
    train, train_report = encode_all(train_rows, tokenizer, **kw)
    valid, valid_report = encode_all(valid_rows, tokenizer, **kw) if valid_rows else ([], {})
    if not train:
        raise MlxptError("E170", "no trainable rows left after encoding", d.data, "check max_seq_len and the mask mode")
    report = {"train": train_report, "valid": valid_report}
    if d.packing:  # real tokens / computed positions over one epoch, padded rows vs packed bins
        lengths = [len(e.tokens) for e in train]
        report["packing"] = packing_efficiency(lengths, d.batch_size, d.max_seq_len, cfg.train.seed)
    if replay_rows:
        replay, replay_report = encode_all(replay_rows, tokenizer, **kw)
        if not replay:
            raise MlxptError(
                "E170", "no trainable replay rows left after encoding", cfg.reg.replay,
                "check max_seq_len and the mask mode",
            )  # fmt: skip
        k = replay_count(cfg.reg.replay_ratio, d.batch_size)
        report["replay"] = {
            "file": cfg.reg.replay, "sha256": file_sha256(cfg.reg.replay), "ratio": cfg.reg.replay_ratio,
            "rows_per_batch": k, "train_rows_per_batch": d.batch_size - k, **replay_report,
        }  # fmt: skip
        train = train + [ReplayExample(e.tokens, e.mask, e.where) for e in replay]
    return train, valid, report


def iter_replay_batches(train: list, state: LoopState, cfg: SFTConfig, collate: Callable) -> Iterator[MicroBatch]:
    """Micro-batches of B - k training rows, drawn from the seeded plan at the saved position, each
    with k replay rows picked by (seed, epoch, batch index, position): a resume sees the same rows."""
    rows = [e for e in train if not isinstance(e, ReplayExample)]
    replay = [e for e in train if isinstance(e, ReplayExample)]
    t, k = cfg.train, replay_count(cfg.reg.replay_ratio, cfg.data.batch_size)
    plan = iter_batches([len(e.tokens) for e in rows], cfg.data.batch_size - k, t.seed, state.epoch, state.batch_index)
    orders: dict[int, object] = {}
    while True:
        window = [next(plan) for _ in range(t.grad_accum)]
        last_epoch, last_index, _ = window[-1]
        for j, (epoch, index, idx) in enumerate(window):
            if epoch not in orders:
                orders = {epoch: replay_order(len(replay), t.seed, epoch)}
            examples = [rows[i] for i in idx] + [replay[i] for i in replay_picks(orders[epoch], k, index)]
            tokens = sum(len(e.tokens) - 1 for e in examples)
            yield MicroBatch(collate(examples), tokens, j == len(window) - 1, (last_epoch, last_index + 1, 0))


def sft_task(ctx: TaskContext) -> Task:
    pad_id = pad_id_of(ctx.tokenizer)
    pad_collate = partial(collate, pad_id=pad_id)
    if ctx.layout == "packed":  # the same rows per micro-batch, packed into bins
        pad_collate = partial(collate_packed, pad_id=pad_id, capacity=ctx.cfg.data.max_seq_len)
    task = rows_task(
        collate=pad_collate,
        length=lambda e: len(e.tokens),
        tokens=lambda e: len(e.tokens) - 1,
    )
    if not ctx.cfg.reg.replay:
        return task
    return replace(task, batches=partial(iter_replay_batches, collate=pad_collate))


def _memory_shape(cfg: SFTConfig, longest: int):
    """Whole rows; with --kl-to-base the vocabulary head holds about three times as much (the
    base pass's logits and the KL's softmaxes beside the tuned ones)."""
    shape = rows_shape(1)(cfg, longest)
    if packs(cfg):
        shape = Shape.packed(cfg.data.batch_size, min(longest, cfg.data.max_seq_len), cfg.data.max_seq_len)
    return replace(shape, head_tokens=3 * shape.head_tokens) if cfg.reg.kl_to_base > 0 else shape


def packs(cfg: SFTConfig) -> bool:
    """Packing on, and a plain per-token objective (the KL pull scores whole rows)."""
    return cfg.data.packing and cfg.reg.kl_to_base == 0


def check_config(cfg: SFTConfig, resume_dir=None) -> None:
    """Refusals before anything is read: the KL pull needs an adapter to switch off for its base."""
    if cfg.reg.kl_to_base > 0 and cfg.adapter.fine_tune_type == "full":
        raise no_base_error("kl_to_base", "use lora/dora or --kl-to-base 0")


SFT = Method(
    name="sft",
    read=read_rows,
    encode=prepare_data,
    # --kl-to-base B: + B * KL(tuned || adapter-off) per trained token; 0 keeps the plain path
    objective=lambda cfg, layout: (
        partial(sft_kl_objective, beta=cfg.reg.kl_to_base) if cfg.reg.kl_to_base > 0 else sft_objective
    ),
    task=sft_task,
    packs=packs,
    length=lambda e: len(e.tokens),
    memory_shape=lambda cfg, longest: _memory_shape(cfg, longest),
    check=check_config,
    output=lambda cfg: "logp_kl" if cfg.reg.kl_to_base > 0 else "logp",
)


def run_sft(
    cfg: SFTConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one SFT run; return (run folder, "finished" | "interrupted")."""
    return run_training(SFT, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
