"""One driver for every training method: validate → tokenizer → encode → backend → loop.

A `Method` says how to read and encode its data, which objective to train and how to batch; the
runner owns what all methods share: the order that keeps the reliability contract (every row
validated before any weights are read; no run folder for rejected input), the run folder,
checkpoints, resume, signals, status and metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt import __version__, _blas
from mlxpt.backends import create_backend
from mlxpt.errors import MlxptError
from mlxpt.models.loader import load_tokenizer, resolve
from mlxpt.models.memory import Shape
from mlxpt.runs import (
    append_jsonl,
    atomic_write_text,
    check_run_name,
    clean_temp,
    graceful_signals,
    latest_checkpoint,
    load_checkpoint,
    new_run_dir,
    read_jsonl,
    read_status,
    save_checkpoint,
    write_config,
    write_status,
)
from mlxpt.runs.guards import RunLock, check_writable
from mlxpt.runs.store import checkpoint_problems
from mlxpt.train import chain as chaining
from mlxpt.train import distributed
from mlxpt.train.loop import LoopState, StopSignal, Task, train_loop, warmup_of
from mlxpt.train.regression import ForgettingMonitor, baseline_from, load_probe


@dataclass(frozen=True)
class Method:
    """A training method as plain values: how to read and encode its data, its scoring layout,
    objective, batches and memory shape. Every callable takes the method's config; none mutates
    the backend or the task after they are built."""

    name: str
    read: Callable  # (cfg) -> rows; JSON-level validation, before any tokenizer or weights
    encode: Callable  # (cfg, tokenizer, rows) -> (train, valid, report)
    objective: Callable  # (cfg, layout) -> objective(outputs, *batch rest) -> (loss_sum, weight, aux)
    task: Callable  # (TaskContext) -> loop.Task
    length: Callable  # (example) -> tokens that size its pass (a row; GRPO: the prompt)
    memory_shape: Callable  # (cfg, longest length) -> models.memory.Shape of one training pass
    # whether the method wants the shared-prompt layout ("grouped": each prompt once per group of
    # responses); the runner asks the backend once, and it falls back to "rows" where it cannot
    shares_prompts: Callable = lambda cfg: False
    # whether the method wants its rows packed into bins ("packed": block-diagonal attention, no
    # padding); the runner asks the backend once, and it falls back to "rows" where not exact
    packs: Callable = lambda cfg: False
    check: Callable | None = None  # (cfg, resume_dir) -> None: refusals before anything is read
    # (TaskContext, train, valid, stop) after "start", e.g. reference log-probs; it returns early
    # once `stop.requested` (a signal), and the run then ends "interrupted" before its first step
    before_train: Callable | None = None
    # what the backend hands the objective: "logp" per token, "logp_kl" (logp, KL to the base per
    # token), "reward" per row; or a callable (cfg) -> one of those, when a setting decides
    output: str | Callable = "logp"
    extend_model: Callable | None = None  # backend hook: (model, seed) after the adapters (a reward head)
    save: Callable | None = None  # backend hook: (folder, model, adapter_config) instead of the adapter save


@dataclass(frozen=True)
class TaskContext:
    """What a method's task and before_train may use, settled before either is built."""

    cfg: object
    tokenizer: object
    layout: str  # "rows" (whole rows) or "grouped" (each prompt once, backends/shared_prefix.py)
    backend: object
    run_dir: Path
    emit: Callable[[dict], None]
    signal: StopSignal = field(default_factory=StopSignal)  # Ctrl-C/SIGTERM, readable while a window is prepared


def rows_shape(rows_per_example: int) -> Callable:
    """A memory_shape for methods that pass whole rows: `rows_per_example` rows a batch example,
    each as long as the longest example (capped at max_seq_len)."""
    return lambda cfg, longest: Shape.rows(cfg.data.batch_size * rows_per_example, min(longest, cfg.data.max_seq_len))


def choose_layout(backend, wanted: bool, emit: Callable[[dict], None], packs: bool = False) -> str:
    """ "grouped" where the method wants it and the backend reproduces this model's plain
    log-probs that way (checked once, on load); "packed" likewise for packed rows; else "rows",
    with a warning if another layout was wanted."""
    if packs and hasattr(backend, "pack_rows"):
        ok, found = backend.pack_rows()
        if not ok:
            emit({"event": "warning", "message": f"packing off (padded rows instead): packed rows do not "
                  f"reproduce this model's log-probs ({found})"})  # fmt: skip
        return "packed" if ok else "rows"
    if not wanted or not hasattr(backend, "share_prompts"):
        return "rows"
    ok, found = backend.share_prompts()
    if not ok:
        emit({"event": "warning", "message": f"scoring each response with its prompt (slower): running each "
              f"prompt once per group does not reproduce this model's log-probs ({found})"})  # fmt: skip
    return "grouped" if ok else "rows"


class RunFolder:
    """Every write of the runner to the run folder, in one place: rank 0 makes it, and on the
    other ranks (the same state, one writer a folder) each is a no-op. Status files carry the
    world size."""

    def __init__(self, locks: list[RunLock]):
        self.writes = distributed.is_main()
        self.locks = locks  # one writer per run folder, held until run_training returns
        self.path: Path | None = None

    def lock(self, path: str | Path) -> None:
        if self.writes:
            self.locks.append(RunLock(path).acquire())

    def reopen(self, path: Path) -> Path:
        """The folder of a resumed run (locked before anything was read)."""
        self.path = path
        if self.writes:
            clean_temp(path)  # the lock is ours: every temp file left here is a dead writer's
        return path

    def create(self, cfg, name: str, chain) -> Path:
        """A new run folder, made and locked by rank 0 (with --from's adapter copy); its path on
        every rank."""
        path = None
        if self.writes:
            path = new_run_dir(cfg.train.runs_dir, name)
            self.lock(path)
            if chain is not None:
                chaining.keep_copy(chain, path)  # before config.json names it in its lineage
        self.path = Path(distributed.broadcast_text(str(path)))  # rank 0's folder on every rank
        return self.path

    def config(self, cfg, method: str, data_report: dict, adapter_config: dict, chain) -> None:
        """config.json: the settings, and what this run was made from."""
        if self.writes:
            write_config(self.path, {
                **cfg.to_dict(), "method": method, "mlxpt_version": __version__,
                "model_path": str(resolve(cfg.model.model)), "data_report": data_report,
                "adapter_config": adapter_config, **({"lineage": chain.lineage} if chain else {}),
            })  # fmt: skip

    def status(self, status: str, **extra) -> None:
        if self.writes:
            write_status(self.path, status, **extra, world_size=distributed.size())

    def metrics(self, event: dict) -> None:
        if self.writes:
            append_jsonl(self.path / "metrics.jsonl", {**event, "time": time.time()})

    def trim_logs(self, step: int) -> None:
        """Drop the metric, sample and reward-failure lines of work the resumed run redoes: those
        of steps after the checkpoint's, and step 0's evaluation when it is step 0's (a run
        resumed at 0 evaluates again); also any line a crash tore. A line without a step (RFT's
        sampling: a round is never redone) stays."""
        if not self.writes:
            return

        def kept(r) -> bool:
            if not isinstance(r, dict):
                return False
            at = r.get("step")
            return at is None or at < step or 0 < at == step

        for name in ("metrics.jsonl", "samples.jsonl", "reward_failures.jsonl"):
            path = self.path / name
            if path.exists():
                rows = [r for r in read_jsonl(path) if kept(r)]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def checkpoint(self, st: LoopState, backend, task: Task, cfg) -> Path | None:
        """The checkpoint of step `st.step`, the adapter beside it and the status (None off rank 0:
        every rank holds the same state, so rank 0 saves it)."""
        if not self.writes:
            return None
        saved = {"loop": st.to_dict(), "adapter_config": backend.adapter_config}
        arrays = backend.get_state()
        if task.state is not None:
            extra, saved["task"] = task.state(st)
            if extra:
                arrays["task"] = extra
        path = save_checkpoint(self.path, st.step, arrays, saved, keep=cfg.train.keep)
        backend.save_adapter(self.path)
        self.status("running", step=st.step, steps=cfg.train.steps)
        return path


def run_training(
    method: Method,
    cfg,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one run; return (run folder, "finished" | "interrupted")."""
    locks: list[RunLock] = []  # one writer per run folder, held until this function returns
    try:
        return _run(method, cfg, resume_dir, emit, stop, locks)
    finally:
        for lock in locks:
            lock.release()


def _run(method: Method, cfg, resume_dir, emit, stop, locks: list) -> tuple[Path, str]:
    world = distributed.init(cfg.train.backend)  # one process, or a rank of mlx.launch
    distributed.check_method(method.name)
    folder = RunFolder(locks)  # rank 0 alone writes the run folder and prints
    emit = emit if folder.writes else (lambda e: None)
    if resume_dir is not None:  # before anything is read: a second writer, or a silent start over
        folder.lock(resume_dir)
        checkpoint = check_resumable(Path(resume_dir))  # verified once: restored below
    chain = chaining.prepare(cfg, resume_dir)  # --from: checked, its adapter's shape adopted
    tokenizer, train, valid, data_report, monitor = _read_data(method, cfg, resume_dir, emit)
    distributed.check_same(cfg.to_dict(), train, valid)  # every rank, same settings and data
    distributed.check_batches(len(train), cfg.data.batch_size)
    t_load = time.perf_counter()
    backend, layout, memory = _load_backend(method, cfg, train + valid, emit, chain)
    if world.size > 1:
        backend.sum_across = distributed.sum_window
    if resume_dir is not None:
        run_dir = folder.reopen(Path(resume_dir))
    else:  # only now: rejected data, settings or memory leave no run folder behind
        run_dir = folder.create(cfg, cfg.train.name or method.name, chain)
    world.run_dir = str(run_dir)
    ctx = TaskContext(cfg, tokenizer, layout, backend, run_dir, emit)
    task = method.task(ctx)
    state = _restore(folder, checkpoint, backend, task) if resume_dir is not None else LoopState()
    world.step = state.step  # the last saved step, for a lost peer's line
    if monitor is not None and state.step > 0:
        monitor.baseline = baseline_from(run_dir / "metrics.jsonl")
    folder.config(cfg, method.name, data_report, backend.adapter_config, chain)
    folder.status("running", step=state.step, steps=cfg.train.steps)
    n_train, n_total = backend.param_counts()
    emit({
        "event": "start", "method": method.name, "run_dir": str(run_dir), "model": cfg.model.model,
        "backend": cfg.train.backend, "layout": layout, "resumed_from_step": state.step, "steps": cfg.train.steps,
        "train_rows": data_report.get("train", {}).get("kept", len(train)), "valid_rows": len(valid), "trainable_params": n_train, "total_params": n_total,
        "load_time_s": time.perf_counter() - t_load, "blas": _blas.status(), "world_size": world.size,
        "memory_estimate_mb": memory["total"] / 1e6, "data": data_report,
        **({"from_run": cfg.adapter.from_run, "adopted": chain.adopted} if chain else {}),
    })  # fmt: skip
    _warn_setup(cfg, chain, emit)
    outcome = _train(method, ctx, folder, task, state, train, valid, stop, monitor)
    status = "finished" if outcome == "finished" else "interrupted"
    folder.status(status, step=state.step, steps=cfg.train.steps, best_val_loss=state.best_val_loss)
    emit({"event": "done", "status": status, "run_dir": str(run_dir), "step": state.step,
          "best_val_loss": state.best_val_loss, **distributed.report()})  # fmt: skip
    distributed.barrier()  # no rank leaves (mlx.launch would stop the others) before rank 0 has saved
    return run_dir, outcome


def check_resumable(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies. With none, a resume starts at step 0 only where nothing
    was ever trained; otherwise it is refused, naming each checkpoint and why it fails, touching nothing."""
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        return ck
    folder = run_dir / "checkpoints"
    found = sorted(p for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []
    broken = [(ck.name, checkpoint_problems(ck)) for ck in found]
    # a checkpoint was completed once: the status is written with its step at every checkpoint
    # (step events in metrics.jsonl alone only mean a process died before its first checkpoint)
    status = read_status(run_dir) or {}
    saved = isinstance(status.get("step"), int) and status["step"] > 0
    if broken or saved or status.get("status") == "finished":
        why = "; ".join(f"{name}: {reason}" for name, reason in broken) or "no checkpoint left"
        raise MlxptError(
            "E522",
            f"no checkpoint of this run verifies ({why}); resuming would start over at step 0 and overwrite it",
            str(run_dir),
            f"start a new run with the same settings: mlxpt train --config {run_dir} (a new folder; this one is left as it is)",
        )
    return None


def _read_data(method: Method, cfg, resume_dir, emit) -> tuple:
    """(tokenizer, train, valid, data report, forgetting monitor or None): every row, the
    regression set's included, validated before any weights are read."""
    if method.check is not None:
        method.check(cfg, resume_dir)
    if resume_dir is None:
        check_run_name(cfg.train.name or method.name)  # before anything slow happens
        check_writable(cfg.train.runs_dir, "--runs-dir", folder=True)
    rows = method.read(cfg)
    probe = load_probe(cfg.train.regression_data, cfg.train.regression_rows)
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    _warn_beyond_context(cfg, emit)
    train, valid, data_report = method.encode(cfg, tokenizer, rows)
    if not valid:
        emit({"event": "warning", "message": "no validation split: validation loss is not reported"})
    monitor = None if probe is None else ForgettingMonitor(probe, tokenizer, cfg.train.forgetting_warn, emit)
    return tokenizer, train, valid, data_report, monitor


def _warn_beyond_context(cfg, emit) -> None:
    """max_seq_len past the model's context: the positions beyond it were never trained."""
    try:
        context = json.loads((resolve(cfg.model.model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError, MlxptError):  # only a warning: never stop a run over it
        return
    if isinstance(context, int) and cfg.data.max_seq_len > context:
        emit({"event": "warning", "message": f"max_seq_len {cfg.data.max_seq_len} is beyond the model's context "
              f"({context} positions): rows longer than that train positions the model never saw"})  # fmt: skip


def _warn_setup(cfg, chain, emit) -> None:
    """Warnings about settings that work but may not do what was meant."""
    warm = warmup_of(cfg.train)
    if warm < cfg.train.warmup_steps:
        emit({"event": "warning", "message": f"warmup_steps {cfg.train.warmup_steps} is more than half of "
              f"{cfg.train.steps} steps: warming up over {warm} steps instead (set --warmup-steps to choose)"})  # fmt: skip
    if chain is None:
        return
    try:
        model_path = str(resolve(cfg.model.model))
    except MlxptError:  # the tokenizer load reports it
        model_path = None
    for message in chain.warnings + (chaining.model_warning(chain, model_path) if model_path else []):
        emit({"event": "warning", "message": message})


def _load_backend(method: Method, cfg, examples: list, emit, chain=None) -> tuple:
    """(backend with the method's objective, layout, memory estimate); refuses what cannot fit.
    With `chain` (--from), the adapter starts from its weights."""
    output = method.output(cfg) if callable(method.output) else method.output
    backend = create_backend(
        cfg.train.backend, cfg.model, cfg.adapter, cfg.train, output=output,
        extend_model=method.extend_model, save=method.save,
    )  # fmt: skip
    if chain is not None:
        backend.start_from(chaining.start_arrays(chain))
    # per rank: a rank holds its shard of each micro-batch (train/distributed.py)
    longest = max(method.length(e) for e in examples)
    memory = backend.check_memory(method.memory_shape(distributed.per_rank(cfg), longest))
    layout = choose_layout(backend, method.shares_prompts(cfg), emit, method.packs(cfg))
    backend.set_objective(method.objective(cfg, layout))
    return backend, layout, memory


def _restore(folder: RunFolder, ck: Path | None, backend, task: Task) -> LoopState:
    """Checkpoint `ck` (check_resumable's) into the backend and the task (a fresh state if none)."""
    if ck is None:  # nothing was trained: a run stopped before its first checkpoint starts over
        folder.trim_logs(0)
        return LoopState()
    arrays, saved = load_checkpoint(ck)
    _check_shapes(ck, arrays.get("adapters", {}), backend.get_state()["adapters"])
    backend.set_state(arrays)
    state = LoopState.from_dict(saved["loop"])
    if task.load_state is not None:
        task.load_state(arrays.get("task", {}), saved.get("task", {}))
    folder.trim_logs(state.step)
    return state


def _check_shapes(ck: Path, saved: dict, model: dict) -> None:
    """The checkpoint's adapter arrays are the ones this model has, name for name and shape for
    shape: a run whose config was edited to another model is refused (E524), never half-loaded."""
    want = {k: tuple(v.shape) for k, v in model.items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if want == got:
        return
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shape = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    what = (
        f"{len(missing)} adapter arrays of this model are not in it (e.g. {missing[0]})" if missing
        else f"it has {len(extra)} adapter arrays this model lacks (e.g. {extra[0]})" if extra
        else f"{shape[0]} is {got[shape[0]]} in it and {want[shape[0]]} in this model"
    )  # fmt: skip
    raise MlxptError(
        "E524", f"the checkpoint does not fit the model: {what}", str(ck),
        "resume with the model the run was trained on (its config.json was changed?), or start a new run",
    )  # fmt: skip


def _checkpointer(ctx: TaskContext, folder: RunFolder, task: Task) -> Callable[[LoopState], None]:
    def checkpoint(st: LoopState) -> None:
        distributed.WORLD.step = st.step
        path = folder.checkpoint(st, ctx.backend, task, ctx.cfg)
        if path is not None:
            ctx.emit({"event": "checkpoint", "step": st.step, "path": str(path)})

    return checkpoint


def _train(
    method: Method, ctx: TaskContext, folder: RunFolder, task: Task, state: LoopState, train, valid, stop, monitor
) -> str:
    """before_train, then the loop, under signal handling; a failure is written to the status."""
    cfg, run_dir = ctx.cfg, ctx.run_dir

    def emit_and_log(event: dict) -> None:
        if event["event"] in ("step", "eval", "forgetting"):
            folder.metrics(event)
        ctx.emit(event)

    if monitor is not None:
        monitor.emit = emit_and_log

    try:
        with graceful_signals() as local:
            # a signal to any rank stops them all at the same point (the flag itself on one rank)
            flag = distributed.agreed(local)
            ctx.signal.flag = flag
            if method.before_train is not None:  # after "start", so a long reference pass is visible
                method.before_train(ctx, train, valid, local)
            if flag.requested:  # stopped before step 1 of this session: nothing new to save
                return "interrupted"
            return train_loop(
                ctx.backend, task.batches(train, state, cfg), valid, cfg.train, cfg.data.batch_size, task, state,
                emit_and_log, _checkpointer(ctx, folder, task), stop=flag if stop is None else distributed.agreed(_Either(stop, local)),
                monitor=monitor,
            )  # fmt: skip
    except MlxptError as e:
        if e.saved_step is not None and Path(run_dir).is_dir():
            e.hint = f"{e.hint + '; ' if e.hint else ''}step {e.saved_step} is saved: {resume_command(run_dir)}"
        if Path(run_dir).is_dir():
            folder.status("failed", step=state.step, error=e.line())
        raise
    except BaseException as e:
        if isinstance(e, OSError) and not Path(run_dir).is_dir():  # deleted or moved under the running run
            raise MlxptError(
                "E305", f"the run folder was removed or moved while the run was going ({type(e).__name__})",
                str(run_dir), "nothing more of this run can be saved: start a new one, and stop a run "
                "(Ctrl-C, or s in the TUI) before deleting or moving its folder",
            ) from e  # fmt: skip
        folder.status("failed", step=state.step, error=f"{type(e).__name__}: {e}")
        raise


class _Either:
    """Requested when the caller's stop or the signal flag is (`stop or flag` would drop a caller's
    StopFlag that is not yet requested: its truth value is `requested`)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    @property
    def requested(self) -> bool:
        return self.first.requested or self.second.requested


def resume_command(run_dir: Path) -> str:
    return f"mlxpt train --resume {run_dir}"
