"""Preference optimisation on the shared runner: DPO (sigmoid / IPO / hinge), SimPO and ORPO.

Objective (DPO): -log σ(β[(log π(c|x) - log π_ref(c|x)) - (log π(r|x) - log π_ref(r|x))]).

Deviations and simplifications:
- π_ref is the same model with the adapter at its initial state (LoRA/DoRA start as a no-op, so
  that is the base model; for `full` it is the initial weights): no second copy of the weights.
  A run started `--from` an earlier run starts with that run's adapter, so π_ref is that model
  (base + the earlier adapter): the initial loss is log 2 and the margins 0, as with a fresh run.
  Its summed log-probs are computed once per pair before step 1 and cached in the run folder
  (`reference_logps.safetensors`); resume reuses the cache, and a run with checkpoints but no
  cache is refused, since the reference can no longer be recomputed.
- On the MLX backend each prompt runs once per pair: its keys/values serve both responses, and
  the vocabulary head runs only where a response token is predicted (backends/shared_prefix.py;
  checked against whole rows when the run starts; `plain_scoring` turns it off). The training
  pass, validation and the reference pass all use it. Otherwise chosen and rejected go through one
  concatenated pass: B chosen rows, then B rejected. The pre-flight memory estimate stays that of
  whole rows (an upper bound; the TUI's estimate is the same).
- Log-probs are summed over response tokens (the end-of-turn token included); IPO uses the sums
  too (TRL averages them per token for IPO). SimPO and ORPO average them per token as in their
  papers; ORPO's SFT term is the per-pair mean NLL of the chosen response (TRL: a token mean
  over the batch), and its λ is `orpo_lambda` (TRL calls it `beta`).
- Over-long pairs lose response tokens, never prompt tokens (data/preference.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from mlxpt import objectives
from mlxpt.config import DPOConfig
from mlxpt.data.batching import collate
from mlxpt.data.encode import pad_id_of
from mlxpt.data.preference import PrefExample, encode_preference, load_preference
from mlxpt.errors import MlxptError
from mlxpt.runs import latest_checkpoint, save_safetensors_atomic
from mlxpt.train import distributed
from mlxpt.train.loop import Task, rows_task
from mlxpt.train.runner import Method, TaskContext, rows_shape, run_training

REFERENCE_FILE = "reference_logps.safetensors"
REFERENCE_FREE = ("simpo", "orpo")


def read_rows(cfg: DPOConfig):
    return load_preference(cfg.data.data, cfg.data.valid)


def prepare_data(cfg: DPOConfig, tokenizer, rows=None):
    """(train pairs, valid pairs, report); raises DataError before any model load."""
    d = cfg.data
    train_rows, valid_rows, identical = rows if rows is not None else read_rows(cfg)
    train, train_report = encode_preference(train_rows, tokenizer, d.max_seq_len, d.overlong)
    valid, valid_report = (
        encode_preference(valid_rows, tokenizer, d.max_seq_len, d.overlong) if valid_rows else ([], {})
    )
    train_report["dropped_identical"] = identical["train"]
    if valid_rows:
        valid_report["dropped_identical"] = identical.get("valid", 0)
    if not train:
        raise MlxptError("E191", "no preference pairs left after encoding", d.data, "check max_seq_len and the data")
    return train, valid, {"train": train_report, "valid": valid_report}


def collate_pairs(pairs: list[PrefExample], pad_id: int, grouped: bool = False):
    """(inputs, targets, mask, ref_chosen, ref_rejected): 2B rows, B chosen then B rejected.

    grouped: (prompts, left_pad, responses, mask, ref_chosen, ref_rejected) for the backend's
    shared-prompt pass (each prompt once, its two responses attending to it; shared_prefix.py):
    B left-padded prompts, 2B right-padded responses interleaved (pair i: rows 2i chosen, 2i + 1
    rejected), and `mask` over the responses in that order (`interleaved` restores the order)."""
    ref_c = np.array([p.ref_chosen for p in pairs], dtype=np.float32)
    ref_r = np.array([p.ref_rejected for p in pairs], dtype=np.float32)
    if grouped:
        from mlxpt.backends.shared_prefix import layout  # imports MLX (after the BLAS is chosen)

        responses = [r for p in pairs for r in (p.chosen, p.rejected)]
        prompts, left_pad, completions = layout([p.prompt for p in pairs], responses, pad_id, pad_to=8)
        mask = np.zeros(completions.shape, np.float32)
        for i, r in enumerate(responses):
            mask[i, : len(r)] = 1.0
        return prompts, left_pad, completions, mask, ref_c, ref_r
    rows = [p.rows()[0] for p in pairs] + [p.rows()[1] for p in pairs]
    inputs, targets, mask = collate(rows, pad_id)
    return inputs, targets, mask, ref_c, ref_r


def chosen_first(a):
    """Rows of the grouped layout (c0, r0, c1, r1, ...) reordered to (c0, c1, ..., r0, r1, ...),
    the order the preference losses read (NumPy or MLX arrays)."""
    return objectives._xp(a).concatenate([a[0::2], a[1::2]], axis=0)


def interleaved(objective: Callable) -> Callable:
    """`objective` on the grouped layout (see chosen_first)."""

    def wrapped(logp, mask, *rest):
        return objective(chosen_first(logp), chosen_first(mask), *rest)

    return wrapped


def pair_length(p: PrefExample) -> int:
    return len(p.prompt) + max(len(p.chosen), len(p.rejected))


def pair_task(ctx: TaskContext) -> Task:
    pad_id, grouped = pad_id_of(ctx.tokenizer), ctx.layout == "grouped"
    return rows_task(
        collate=lambda pairs: collate_pairs(pairs, pad_id, grouped),
        length=pair_length,
        tokens=lambda p: 2 * len(p.prompt) + len(p.chosen) + len(p.rejected) - 2,
    )


def make_objective(cfg: DPOConfig, layout: str = "rows") -> Callable:
    """The configured loss as `objective(logp, mask, ref_chosen, ref_rejected)`; on the grouped
    layout its rows are put back in chosen-then-rejected order first."""
    p = cfg.pref
    if p.loss_type == "simpo":
        loss = partial(objectives.simpo_objective, beta=p.beta, gamma=p.simpo_gamma, label_smoothing=p.label_smoothing)
    elif p.loss_type == "orpo":
        loss = partial(objectives.orpo_objective, orpo_lambda=p.orpo_lambda)
    else:
        loss = partial(objectives.dpo_objective, loss_type=p.loss_type, beta=p.beta, label_smoothing=p.label_smoothing)
    return interleaved(loss) if layout == "grouped" else loss


def fingerprint(pairs: list[PrefExample]) -> str:
    """A hash of the token ids of every pair, in order: the cache key of the reference log-probs."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


def reference_logps(
    backend, pairs: list[PrefExample], batch_size: int, pad_id: int, stop=None, progress=None, grouped: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Summed response log-probs of each pair under the model as it is now (no gradient), in
    the backend's layout (`grouped`: each prompt once, see collate_pairs).

    `progress(pairs done)` after each batch; None once `stop.requested` (checked per batch)."""
    chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    for i in range(0, len(pairs), batch_size):
        if stop is not None and stop.requested:
            return None
        if (i // batch_size) % distributed.size() != distributed.WORLD.rank:
            continue  # another rank's batch (train/distributed.py: gathered by _compute_reference)
        part = pairs[i : i + batch_size]
        *arrays, mask, _, _ = collate_pairs(part, pad_id, grouped)
        seq = (backend.token_logps(*arrays).astype(np.float32) * mask).sum(axis=1)
        seq = chosen_first(seq) if grouped else seq
        chosen[i : i + len(part)], rejected[i : i + len(part)] = seq[: len(part)], seq[len(part) :]
        if progress is not None:
            progress(i + len(part))
    return chosen, rejected


def _progress_events(emit, total: int, every: float = 0.1) -> Callable[[int], None]:
    """`emit` a "reference" event with status "computing" each `every` of `total` pairs."""
    t0, shown = time.perf_counter(), [0]

    def progress(done: int) -> None:
        if done >= total or done - shown[0] >= every * total:
            shown[0] = done
            elapsed = time.perf_counter() - t0
            emit({"event": "reference", "status": "computing", "done": done, "pairs": total, "elapsed_s": elapsed})

    return progress


def before_train(ctx: TaskContext, train, valid, stop=None) -> None:
    """Load the cached reference log-probs, or compute and cache them on a fresh run (in the
    run's layout, see collate_pairs)."""
    cfg, backend, run_dir, emit = ctx.cfg, ctx.backend, Path(ctx.run_dir), ctx.emit
    if cfg.pref.loss_type in REFERENCE_FREE:
        return
    path = run_dir / REFERENCE_FILE
    keys = {"train": fingerprint(train), "valid": fingerprint(valid)}
    if path.exists():
        arrays = _read_reference(path, keys)
        how = "loaded"
    else:
        if latest_checkpoint(run_dir) is not None or not backend.at_start():
            raise MlxptError(
                "E196",
                "no cached reference log-probs, and the adapter is no longer at its initial state",
                str(run_dir),
                "the reference is the model as the run started: start a new run",
            )
        arrays = _compute_reference(ctx, train, valid, stop)
        if arrays is None:  # stopped: nothing is cached, and a resume computes it again
            return
        meta = {f"fingerprint_{s}": v for s, v in keys.items()}
        if distributed.is_main():
            save_safetensors_atomic(path, arrays, {**meta, "model": cfg.model.model})
        how = "computed"
    for split, pairs in (("train", train), ("valid", valid)):
        for p, c, r in zip(pairs, arrays[f"{split}_chosen"], arrays[f"{split}_rejected"], strict=True):
            p.ref_chosen, p.ref_rejected = float(c), float(r)
    emit({"event": "reference", "status": how, "path": str(path), "pairs": len(train) + len(valid)})


def _read_reference(path: Path, keys: dict) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    if any(meta.get(f"fingerprint_{s}") != keys[s] for s in keys):
        raise MlxptError(
            "E195",
            "cached reference log-probs do not match the encoded data (data, tokenizer or max_seq_len changed)",
            str(path),
            "resume with the same data and model, or start a new run",
        )
    return arrays


def _compute_reference(ctx: TaskContext, train, valid, stop) -> dict[str, np.ndarray] | None:
    """Reference log-probs of both splits with progress events; None once stopped."""
    pad_id, grouped = pad_id_of(ctx.tokenizer), ctx.layout == "grouped"
    arrays = {}
    progress = _progress_events(ctx.emit, len(train) + len(valid))
    for split, pairs, before in (("train", train, 0), ("valid", valid, len(train))):
        done = reference_logps(
            ctx.backend, pairs, ctx.cfg.data.batch_size, pad_id, stop,
            lambda n, before=before: progress(before + n), grouped,
        )  # fmt: skip
        if done is None and distributed.size() == 1:
            return None
        zeros = np.zeros(len(pairs), np.float32)
        arrays[f"{split}_chosen"], arrays[f"{split}_rejected"] = done or (zeros, zeros)
    if distributed.size() > 1:  # each rank scored its batches: stop together, or gather them all
        if distributed.any_rank(stop is not None and stop.requested):
            return None
        arrays = distributed.sum_arrays(arrays)
    return arrays


DPO = Method(
    name="dpo",
    read=read_rows,
    encode=prepare_data,
    objective=make_objective,
    task=pair_task,
    length=pair_length,
    memory_shape=rows_shape(2),  # whole rows: an upper bound of the shared-prompt pass
    shares_prompts=lambda cfg: not cfg.pref.plain_scoring,
    before_train=before_train,
)


def run_dpo(
    cfg: DPOConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
    name: str = "dpo",
) -> tuple[Path, str]:
    """Train (or resume) one preference run; return (run folder, "finished" | "interrupted")."""
    return run_training(replace(DPO, name=name), cfg, resume_dir=resume_dir, emit=emit, stop=stop)
