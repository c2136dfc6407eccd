"""The one training loop. SFT, DPO and GRPO differ in batch builder and loss, nothing else.

The loop takes an iterator of micro-batches (as mlx-lm's trainer takes `iterate_batches`): each
says whether it closes its accumulation window and where the data stands once that window is
done. `rows_task` makes it for methods that train on their examples as given; GRPO's yields
its rollouts (train/grpo.py). Both draw their windows from `iter_windows`, a seeded length-
bucketed plan that resumes from any data position.

Per optimiser step: `grad_accum` micro-batches are accumulated (losses are token sums, so the
window equals one big batch), the loss and global gradient norm are checked for finiteness
*before* the update (a bad step is skipped and counted; `max_bad_steps` in a row stop the run
with exit 4), then clip + update. The loop yields plain-number step reports through `emit`.
A stop request (Ctrl-C, SIGTERM, a TUI button) abandons the open window, so the checkpoint
always sits on a step boundary and resume replays exactly the same micro-batches. A user error
raised while a batch is built (GRPO: a reward function above its failure rate) does the same:
the window is abandoned, the last completed step is saved, and the error says so. A batch
source that prepares a window for long (RFT samples a whole round) may also raise `Stopped` on a
stop request before the window's first micro-batch: the loop stops as on any stop request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from mlxpt.backends.base import TrainBackend
from mlxpt.config import TrainConfig
from mlxpt.data.batching import batch_plan
from mlxpt.errors import MlxptError, NumericsError, ResourceError
from mlxpt.models.memory import low_memory
from mlxpt.train import distributed


class Stopped(Exception):
    """Raised by a task's batch source that stopped preparing a window on a stop request (RFT's
    sampling, between chunks): the loop stops there as it does on a stop request at a window's
    micro-batch, saving the last completed step."""


class StopSignal:
    """The Ctrl-C/SIGTERM flag (agreed over ranks) as a task may read it while it prepares a
    window: the runner sets `flag` once signals are handled; `requested` is False until then. A
    caller's own stop object (the Python API's `stop=`) is not in it: it is read by the loop only."""

    flag = None

    @property
    def requested(self) -> bool:
        return self.flag is not None and bool(self.flag.requested)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the loop consumes it."""

    arrays: tuple  # what backend.accumulate takes: (inputs, targets, *objective arrays) or a layout's
    tokens: int  # input tokens, for tokens/s
    last: bool  # it closes its window: the update follows
    position: tuple[int, int, int]  # (epoch, batch_index, repeat_index) once its window is done


@dataclass
class Task:
    """What a method gives the loop: its micro-batches and its validation; optionally extra
    step-report fields and what a checkpoint must hold besides the backend's arrays."""

    # (train examples, LoopState, method cfg) -> Iterator[MicroBatch] from the state's data position on
    batches: Callable[..., Iterator[MicroBatch]]
    evaluate: Callable  # (backend, examples, batch_size, max_batches) -> metrics dict
    report: Callable[[int], dict] | None = None  # (step) -> extra step-event fields (may override)
    # (loop state) -> ({name: array}, JSON), and its inverse on resume (GRPO: the rollouts a
    # window's remaining updates reuse)
    state: Callable[[LoopState], tuple[dict, dict]] | None = None
    load_state: Callable[[dict, dict], None] | None = None
    # (loop state) as a window opens, and () when it is abandoned: a task that counts while it
    # builds a window (GRPO's reward calls, distill's teacher tokens) puts its counters back, so a
    # checkpoint holds them as of the last completed step, like the data position
    begin_window: Callable[[LoopState], None] | None = None
    abandon_window: Callable[[], None] | None = None


@dataclass
class LoopState:
    """Where training stands; with the backend's arrays it is all exact resume needs."""

    step: int = 0  # optimiser steps done (skipped non-finite steps included)
    epoch: int = 0  # data position: epoch and next micro-batch index in its plan
    batch_index: int = 0
    repeat_index: int = 0  # which of a window's repeated updates comes next (GRPO's num_iterations)
    bad_in_row: int = 0
    bad_total: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    elapsed: float = 0.0
    best_val_loss: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def warmup_of(cfg: TrainConfig) -> int:
    """Warm-up steps as used: at most half the run (10 warm-up steps of an 8-step run would never
    reach the peak rate); the runner warns when this cuts `warmup_steps`."""
    return min(cfg.warmup_steps, cfg.steps // 2)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update with 0-based index `step`: linear warm-up, then decay."""
    peak, warm = cfg.learning_rate, warmup_of(cfg)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    span = max(1, cfg.steps - warm)
    t = min(1.0, (step - warm) / span)
    low = peak * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return peak + (low - peak) * t
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


def iter_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, index: int
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, index, example indices) from a data position on, across epochs, forever."""
    while True:
        plan = batch_plan(lengths, batch_size, seed, epoch)
        for i in range(index, len(plan)):
            yield epoch, i, plan[i]
        epoch, index = epoch + 1, 0


def iter_windows(
    lengths: list[int], batch_size: int, grad_accum: int, seed: int, epoch: int, index: int
) -> Iterator[tuple[tuple[int, int], list[list[int]]]]:
    """((epoch, index) after the window, example indices of its `grad_accum` micro-batches), from
    a data position on, forever."""
    batches = iter_batches(lengths, batch_size, seed, epoch, index)
    while True:
        window = [next(batches) for _ in range(grad_accum)]
        e, i, _ = window[-1]
        # with several ranks (train/distributed.py), this rank's part of each global micro-batch
        yield (e, i + 1), [distributed.shard(idx) for _, _, idx in window]


def validate(backend: TrainBackend, examples: list, batch_size: int, collate, length, max_batches: int) -> dict:
    """Mean loss (and metrics) over the first `max_batches` of a fixed plan of the validation split."""
    plan = batch_plan([length(e) for e in examples], batch_size, seed=0, epoch=0)
    if max_batches >= 0:
        plan = plan[:max_batches]
    total = weight = 0.0
    sums: dict[str, float] = {}
    for idx in plan:
        loss, n, aux = backend.evaluate(collate([examples[i] for i in idx]))
        total, weight = total + loss, weight + n
        for k, v in aux.items():
            sums[k] = sums.get(k, 0.0) + v
    w = max(weight, 1.0)
    return {"val_loss": total / w, **{f"val_{k}": v / w for k, v in sums.items()}}


def rows_task(collate: Callable, length: Callable, tokens: Callable) -> Task:
    """The Task of a method that trains on its examples as given: `collate(examples) -> arrays`,
    `length(example)` for bucketing, `tokens(example)` input tokens for tokens/s."""

    def batches(train: list, state: LoopState, cfg) -> Iterator[MicroBatch]:
        lengths = [length(e) for e in train]
        t = cfg.train
        for after, window in iter_windows(
            lengths, cfg.data.batch_size, t.grad_accum, t.seed, state.epoch, state.batch_index
        ):
            for k, idx in enumerate(window):
                examples = [train[i] for i in idx]
                yield MicroBatch(collate(examples), sum(tokens(e) for e in examples), k == len(window) - 1, (*after, 0))

    return Task(batches=batches, evaluate=lambda b, ex, bs, mb: validate(b, ex, bs, collate, length, mb))


def _abandon(backend, task: Task) -> None:
    """Drop the open window: its gradients, the RNG draws and the task's counts it made."""
    backend.discard(rewind=True)
    if task.abandon_window is not None:
        task.abandon_window()


def _accumulate(backend, task: Task, batches: Iterator[MicroBatch], state: LoopState, checkpoint, stop) -> tuple | None:
    """Gradients of one window's micro-batches: (input tokens, data position after it), or None
    once a stop is requested. A user error while a batch is made (GRPO: a reward function above
    its failure rate) abandons the window and saves the last completed step."""
    tokens = 0
    backend.begin_window()  # an abandoned window rewinds the RNG to here (sampling included)
    if task.begin_window is not None:
        task.begin_window(state)
    while True:
        try:
            mb = next(batches)
        except Stopped:  # a stop request while the window was prepared (RFT's sampling): as below
            return None
        except MlxptError as e:
            _abandon(backend, task)
            checkpoint(state)
            e.saved_step = state.step  # the runner adds the resume command to the hint
            raise
        backend.accumulate(mb.arrays)
        tokens += mb.tokens
        if stop is not None and stop.requested:
            return None
        if mb.last:
            return tokens, mb.position


def _stop_if_unsafe(state: LoopState, cfg: TrainConfig, loss: float, gnorm: float, checkpoint) -> None:
    """Too many non-finite steps in a row (exit 4) or a machine about to swap (exit 3): save, stop."""
    if state.bad_in_row >= cfg.max_bad_steps:
        checkpoint(state)
        raise NumericsError(
            "E402",
            f"{state.bad_in_row} non-finite steps in a row (loss {loss}, grad norm {gnorm})",
            f"step {state.step}",
            "lower the learning rate or check the data; the last finite state is saved",
        )
    if low_memory():
        checkpoint(state)
        raise ResourceError(
            "E311",
            "the machine is about to swap (under 3% of memory available)",
            f"step {state.step}",
            "a checkpoint is saved; close other programs or lower --batch-size, then resume",
        )


def _update(backend, task: Task, state: LoopState, cfg: TrainConfig, tokens: int, t0: float, emit) -> tuple:
    """Check the window's loss and gradient norm, update if finite (else skip and count), and
    emit the step report; (loss, grad norm)."""
    loss_sum, ntok, gnorm, aux = backend.reduce()
    loss = loss_sum / max(ntok, 1.0)
    metrics = {k: v / max(ntok, 1.0) for k, v in aux.items()}
    lr = lr_at(state.step, cfg)
    # the weight too: a NaN in an input's loss weights makes ntok NaN (and int(ntok) raise)
    finite = math.isfinite(loss) and math.isfinite(gnorm) and math.isfinite(ntok)
    trained = int(ntok) if finite else 0
    if finite:
        backend.apply(lr, cfg.clip_grad_norm)
        state.bad_in_row = 0
    else:
        backend.discard()
        state.bad_in_row += 1
        state.bad_total += 1
    state.step += 1
    dt = time.perf_counter() - t0
    state.elapsed += dt
    state.tokens_seen += tokens
    state.trained_tokens_seen += trained
    emit(
        {
            "event": "step",
            "step": state.step,
            "loss": loss if finite else None,
            "lr": lr,
            "grad_norm": gnorm if finite else None,
            "tokens": tokens,
            "trained_tokens": trained,  # the objective's weight: tokens for SFT, pairs for DPO
            "tokens_per_s": tokens / dt if dt > 0 else 0.0,
            "step_time_s": dt,
            "peak_memory_mb": backend.peak_memory() / 1e6,
            "epoch": state.epoch,
            "skipped": not finite,
            "bad_steps": state.bad_total,
            **(metrics if finite else {}),
            **(task.report(state.step) if task.report else {}),
        }
    )
    return loss, gnorm


def train_loop(
    backend: TrainBackend,
    batches: Iterator[MicroBatch],
    valid: list,
    cfg: TrainConfig,
    batch_size: int,
    task: Task,
    state: LoopState,
    emit: Callable[[dict], None],
    checkpoint: Callable[[LoopState], None],
    stop=None,
    monitor: Callable[[TrainBackend, int], dict] | None = None,
) -> str:
    """Train on `batches` until `cfg.steps`; return "finished" or "interrupted". Raises
    NumericsError (exit 4) and ResourceError (exit 3) after saving the last completed step.
    `monitor(backend, step)` (the forgetting monitor, train/regression.py) adds its numbers to
    every evaluation, step 0's included."""
    if cfg.eval_batches == 0:
        valid = []  # validation switched off

    def evaluate(step: int, validation: bool) -> None:
        if not distributed.is_main():  # validation and the monitor run on rank 0 only
            return
        result = task.evaluate(backend, valid, batch_size, cfg.eval_batches) if validation else {}
        if monitor is not None:
            result.update(monitor(backend, step))
        val = result.get("val_loss", math.nan)
        if step > 0 and math.isfinite(val):
            state.best_val_loss = val if state.best_val_loss is None else min(state.best_val_loss, val)
        if result:
            emit({"event": "eval", "step": step, **result})

    if state.step == 0:
        # the baseline (adapters start as a no-op) so a run shows how far validation moved
        evaluate(0, bool(valid) and cfg.eval_every > 0)
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        distributed.sync_rng()  # several ranks: rank 0's RNG, the one its checkpoints hold
        window = _accumulate(backend, task, batches, state, checkpoint, stop)
        if window is None:  # interrupted; the data position moves only when a window is done
            _abandon(backend, task)
            break
        tokens, (state.epoch, state.batch_index, state.repeat_index) = window
        tokens = int(distributed.sum_floats([tokens])[0])  # every rank's input tokens
        loss, gnorm = _update(backend, task, state, cfg, tokens, t0, emit)
        _stop_if_unsafe(state, cfg, loss, gnorm, checkpoint)
        if (cfg.eval_every > 0 and state.step % cfg.eval_every == 0) or state.step == cfg.steps:
            evaluate(state.step, bool(valid))
        if state.step % cfg.save_every == 0 or state.step == cfg.steps:
            checkpoint(state)
        if stop is not None and stop.requested:
            break
    if state.step < cfg.steps:
        checkpoint(state)  # re-saving the same step is safe: it replaces it atomically
        return "interrupted"
    return "finished"
