"""Supervised fine-tuning: validate data, load the model, add adapters, run the shared loop.

The order is the reliability contract: every row is read and validated (and tokenised with
the model's tokenizer) before any weights are read; a run folder is created only then.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from mlxpt import __version__
from mlxpt.config import SFTConfig
from mlxpt.data.encode import encode_all
from mlxpt.data.formats import load_splits
from mlxpt.errors import MlxptError
from mlxpt.runs import (
    append_jsonl,
    atomic_write_text,
    clean_temp,
    graceful_signals,
    latest_checkpoint,
    load_checkpoint,
    new_run_dir,
    read_jsonl,
    save_checkpoint,
    write_config,
    write_status,
)


def prepare_data(cfg: SFTConfig, tokenizer, rows=None):
    """(train examples, valid examples, report); raises DataError before any model load."""
    d = cfg.data
    train_rows, valid_rows = rows if rows is not None else load_splits(d.data, d.valid)
    kw = {"mask": d.mask, "max_len": d.max_seq_len, "overlong": d.overlong}
    train, train_report = encode_all(train_rows, tokenizer, **kw)
    valid, valid_report = encode_all(valid_rows, tokenizer, **kw) if valid_rows else ([], {})
    if not train:
        raise MlxptError("E170", "no trainable rows left after encoding", d.data, "check max_seq_len and the mask mode")
    return train, valid, {"train": train_report, "valid": valid_report}


def _trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_sft(
    cfg: SFTConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one SFT run; return (run folder, "finished" | "interrupted")."""
    from mlxpt.models.loader import load, load_tokenizer, resolve

    rows = load_splits(cfg.data.data, cfg.data.valid)  # JSON-level validation first
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    train, valid, data_report = prepare_data(cfg, tokenizer, rows)
    if not valid:
        emit({"event": "warning", "message": "no validation split: validation loss is not reported"})

    from mlxpt import _blas
    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.train.adapters import apply_adapters, save_adapter
    from mlxpt.train.loop import LoopState, train_loop
    from mlxpt.train.memory import check_fits
    from mlxpt.train.objectives import sft_objective

    t_load = time.perf_counter()
    model, tokenizer = load(cfg.model.model, quantize=cfg.model.quantize, trust_remote_code=cfg.model.trust_remote_code)
    adapter_config = apply_adapters(model, cfg.adapter, seed=cfg.train.seed)
    longest = max(len(e.tokens) for e in train + valid)
    memory = check_fits(model, cfg.data.batch_size, min(longest, cfg.data.max_seq_len))
    backend = MLXBackend(model, make_optimizer(cfg.train.optimizer, cfg.train.weight_decay), sft_objective)
    state = LoopState()
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        clean_temp(run_dir)
        ck = latest_checkpoint(run_dir)
        if ck is not None:
            arrays, saved = load_checkpoint(ck)
            backend.set_state(arrays)
            state = LoopState.from_dict(saved["loop"])
            _trim_metrics(run_dir, state.step)
    else:
        run_dir = new_run_dir(cfg.train.runs_dir, cfg.train.name or "sft")
    from mlx.utils import tree_flatten

    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    write_config(
        run_dir,
        {
            **cfg.to_dict(),
            "method": "sft",
            "mlxpt_version": __version__,
            "model_path": str(resolve(cfg.model.model)),
            "data_report": data_report,
            "adapter_config": adapter_config,
        },
    )
    write_status(run_dir, "running", step=state.step, steps=cfg.train.steps)

    def emit_and_log(event: dict) -> None:
        if event["event"] in ("step", "eval"):
            append_jsonl(run_dir / "metrics.jsonl", {**event, "time": time.time()})
        emit(event)

    def checkpoint(st: LoopState) -> None:
        arrays = backend.get_state()
        path = save_checkpoint(
            run_dir, st.step, arrays, {"loop": st.to_dict(), "adapter_config": adapter_config}, keep=cfg.train.keep
        )
        save_adapter(run_dir, model, adapter_config)
        write_status(run_dir, "running", step=st.step, steps=cfg.train.steps)
        emit({"event": "checkpoint", "step": st.step, "path": str(path)})

    emit(
        {
            "event": "start",
            "run_dir": str(run_dir),
            "model": cfg.model.model,
            "resumed_from_step": state.step,
            "steps": cfg.train.steps,
            "train_rows": len(train),
            "valid_rows": len(valid),
            "trainable_params": int(n_train),
            "total_params": int(n_total),
            "load_time_s": time.perf_counter() - t_load,
            "blas": _blas.status(),
            "memory_estimate_mb": memory["total"] / 1e6,
            "data": data_report,
        }
    )
    try:
        with graceful_signals() as flag:
            outcome = train_loop(
                backend,
                train,
                valid,
                cfg.train,
                cfg.data.batch_size,
                sft_task(_pad_id(tokenizer)),
                state,
                emit_and_log,
                checkpoint,
                stop=stop or flag,
            )
    except MlxptError as e:
        write_status(run_dir, "failed", step=state.step, error=e.line())
        raise
    except BaseException as e:
        write_status(run_dir, "failed", step=state.step, error=f"{type(e).__name__}: {e}")
        raise
    status = "finished" if outcome == "finished" else "interrupted"
    write_status(run_dir, status, step=state.step, steps=cfg.train.steps, best_val_loss=state.best_val_loss)
    emit(
        {
            "event": "done",
            "status": status,
            "run_dir": str(run_dir),
            "step": state.step,
            "best_val_loss": state.best_val_loss,
        }
    )
    return run_dir, outcome


def sft_task(pad_id: int):
    from functools import partial

    from mlxpt.data.batching import collate
    from mlxpt.train.loop import Task

    return Task(
        collate=partial(collate, pad_id=pad_id), length=lambda e: len(e.tokens), tokens=lambda e: len(e.tokens) - 1
    )


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = eos if eos is not None else 0
    return int(pad)


def resume_command(run_dir: Path) -> str:
    return f"mlxpt train --resume {run_dir}"
