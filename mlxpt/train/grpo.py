"""GRPO family on the shared runner and loop: sample a group of completions per prompt, score them
with verifiable rewards, and push up the ones better than their group.

Per micro-batch of prompts (`batch_size`): `num_generations` (G) completions of each prompt are
sampled, all prompts' groups in one batched generation (each prompt prefilled once, its KV cache
copied to G rows: decode/batch.py) and kept as token ids exactly as sampled. They are scored the
same way: each prompt runs through the model once, and the G completions attend to its keys and
values (backends/shared_prefix.py; checked against the plain pass on load, `plain_scoring` turns
it off). Rewards come from guarded plain functions (rewards.py). Advantages are group-relative,
A = (r - mean_group) / (std + 1e-4) with std over the group, the batch, or none (`scale_rewards`); std is the unbiased one, as in TRL.
The loss is the clipped surrogate with an optional k3 KL to the reference (objectives.py), the
reference being the model with its adapter as created (the base model for LoRA/DoRA) swapped in
for one no-gradient pass: no second copy of the weights. `num_iterations` (mu) > 1 reuses each
generated batch for mu optimiser steps against the log-probs it was sampled with.

Deviations and simplifications:
- Completions end with their EOS / end-of-turn token, which is trained (TRL does the same);
  truncated completions (max length) have none, and `mask_truncated_completions` drops them.
- `skip_zero_std_groups` drops groups whose rewards are all equal (their advantages are 0, so
  they only dilute the normalisation); if every group is such, the batch keeps them, masked.
- `dynamic_sampling` N (DAPO's dynamic sampling): a micro-batch keeps drawing the next batch of
  prompts from the data plan, up to N draws beyond its first, until `batch_size` groups have
  unequal rewards, and trains on the first `batch_size` of those (extra ones are dropped, as in
  DAPO). A step then learns from a full batch of prompts when an easy or a hard stretch of data
  would leave it a few; the data position moves by the batches drawn, so a step consumes a varying
  number of prompts, and the checkpoint holds where the draws stopped. Each draw samples with the
  keys of its own data position. On several ranks each draw is split over them, their
  equal-reward flags are gathered, and every rank chooses the groups one process would; each
  trains on its own (a rank left with none adds a zero-weight batch), so 2 ranks equal 1.
- Validation is greedy decoding of the held-out prompts scored by the same rewards (val_reward,
  val_accuracy), not a loss: a GRPO "loss" says little about progress.
- A run started `--from` an earlier run (models/chaining.py) starts with that run's adapter, and
  the KL reference is that model (base + the earlier adapter), kept as a copy of its small arrays.
- Sampling keys: each completion draws from keys of its own, a function of the run's seed, the
  window's data position and the prompt's index in the data (`sample_keys`,
  `sampling.make_keyed_sampler`). A resumed run samples the completions the straight run sampled,
  and a step split over several ranks (train/distributed.py) samples those of one rank, so
  2 ranks equal 1 like every other method. With mu > 1, a run stopped between the mu updates of
  one window resumes with the checkpoint's rollouts.
- The NumPy backend has the closed-form gradients of every loss type (objectives.GRADS) but no
  sampler, so `mlxpt train grpo` needs the MLX backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from mlxpt import objectives
from mlxpt.config import GRPOConfig
from mlxpt.data.encode import pad_id_of
from mlxpt.data.prompts import PromptExample, encode_prompts, load_prompts
from mlxpt.errors import ConfigError, MlxptError
from mlxpt.rewards import RewardGuard, parse_rewards
from mlxpt.runs.atomic import append_jsonl
from mlxpt.train import distributed
from mlxpt.train.loop import MicroBatch, Task, iter_batches, iter_windows
from mlxpt.train.rollouts import Rollout, RolloutSpec, sample_dynamic, sample_rollout, score
from mlxpt.train.runner import Method, TaskContext, run_training

SAMPLES_FILE = "samples.jsonl"
FAILURES_FILE = "reward_failures.jsonl"
EVAL_BATCH = 16  # held-out prompts decoded together


def check_config(cfg: GRPOConfig) -> None:
    """Everything about the settings that can be wrong, before any data or weights are read."""
    g = cfg.grpo
    if cfg.train.backend != "mlx":
        raise ConfigError(
            "E551",
            "GRPO samples completions, which the numpy backend cannot do",
            "backend",
            "use --backend mlx (the numpy backend has GRPO's gradients, for testing only)",
        )
    if g.beta > 0 and cfg.adapter.fine_tune_type == "full":
        raise ConfigError(
            "E550",
            "full fine-tuning has no adapter to switch off for the KL reference",
            "beta",
            "use lora/dora or --beta 0",
        )
    check_rewards(g)


def check_rewards(g) -> None:
    """The answer extraction, format regex and reward functions of a section (GRPO's, RFT's)."""
    from mlxpt.rewards.extract import check_method, compile_regex

    check_method(g.extract)
    if g.extract.startswith("re:"):
        compile_regex(g.extract[3:])
    if g.format_regex:
        compile_regex(g.format_regex)
    parse_rewards(g.rewards, g.reward_weights)  # imports user reward files: errors now, not at step 1


def read_rows(cfg: GRPOConfig):
    check_config(cfg)
    return read_prompts(cfg, cfg.grpo)


def read_prompts(cfg, g):
    """(train, valid) prompt rows; an `answer` is required where the accuracy reward reads it,
    or RFT's rationalization hints it."""
    names = [n for n, _, _ in parse_rewards(g.rewards, g.reward_weights)]
    require = ("answer",) if "accuracy" in names or getattr(g, "rationalize", False) else ()
    return load_prompts(cfg.data.data, cfg.data.valid, require=require)


def prepare_data(cfg: GRPOConfig, tokenizer, rows=None, g=None):
    """(train, valid, report) prompt examples; `g` is the section with max_completion_length
    (default: `cfg.grpo`)."""
    d, g = cfg.data, cfg.grpo if g is None else g
    train_rows, valid_rows = rows if rows is not None else read_rows(cfg)
    train, train_report = encode_prompts(train_rows, tokenizer, d.max_seq_len, g.max_completion_length, d.overlong)
    valid, valid_report = (
        encode_prompts(valid_rows, tokenizer, d.max_seq_len, g.max_completion_length, d.overlong)
        if valid_rows
        else ([], {})
    )
    if not train:
        raise MlxptError("E178", "no prompts left after encoding", d.data, "raise --max-seq-len or shorten the prompts")
    return train, valid, {"train": train_report, "valid": valid_report}


def make_objective(cfg: GRPOConfig) -> Callable:
    g = cfg.grpo
    return partial(
        objectives.grpo_objective,
        loss_type=g.loss_type,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high,
        beta=g.beta,
        max_completion_length=g.max_completion_length,
    )


def make_spec(ctx: TaskContext, g) -> RolloutSpec:
    """The sampler, guarded rewards and layout the rollouts of section `g` (GRPO's, RFT's) use."""
    guard = RewardGuard(
        parse_rewards(g.rewards, g.reward_weights),
        policy=g.reward_on_error,
        max_failure_rate=g.max_reward_failure_rate,
        timeout_s=g.reward_timeout,
        log_path=Path(ctx.run_dir) / FAILURES_FILE,
    )
    from mlxpt.decode.sampling import make_keyed_sampler  # imports MLX (after the BLAS is chosen)

    # each completion draws from keys of its own (sample_keys), not from a shared generator
    sampler = make_keyed_sampler(g.temperature, g.top_p, g.top_k, g.min_p)
    pad = pad_id_of(ctx.tokenizer)
    return RolloutSpec(ctx.cfg, ctx.tokenizer, ctx.backend, guard, sampler, pad, ctx.layout == "grouped", g)


class RewardCounts:
    """The reward guard's calls and failures on every rank, as a checkpoint holds them (the failure
    rate check counts over the whole run). Rank 0 writes checkpoints, so the other ranks' counts
    reach it where every rank sends them (`gather`: GRPO after each update, RFT after each round's
    sampling); they change nowhere else (only rank 0 validates)."""

    def __init__(self, guard: RewardGuard):
        self.guard = guard
        self.ranks: list[dict] = [guard.counts()] * distributed.size()
        self.step0: dict | None = None  # what step 0's validation counted: a resume at step 0 validates again

    def gather(self) -> None:
        if distributed.size() > 1:
            self.ranks = [json.loads(t) for t in distributed.gather_texts(json.dumps(self.guard.counts()))]

    def validate(self, step: int, evaluate: Callable[[], dict]) -> dict:
        """`evaluate()` (validation, scored by the guard) after step `step`: its failure lines carry
        the step, and step 0's counts are kept aside."""
        self.guard.log_fields = {"step": step}
        before = self.guard.counts()
        out = evaluate()
        if step == 0:
            after = self.guard.counts()
            self.step0 = {k: {n: v - before[k][n] for n, v in per_fn.items()} for k, per_fn in after.items()}
        return out

    def state(self, step: int) -> list[dict]:
        """Every rank's counts at a checkpoint of step `step`, in rank order: this rank's (rank 0's)
        now, less step 0's validation at step 0 (a resume does it again), the others' as gathered."""
        mine = self.guard.counts()
        if step == 0 and self.step0 is not None:
            mine = {k: {n: v - self.step0[k][n] for n, v in per_fn.items()} for k, per_fn in mine.items()}
        return [mine, *self.ranks[1:]]

    def load(self, saved: list[dict] | None) -> None:
        """This rank's counts from a checkpoint's `state()`. Resumed on another number of ranks,
        rank 0 takes the run's totals (what one process would have counted), the others 0; a
        checkpoint from before the counts were kept leaves every rank at 0."""
        if not saved:
            return
        if len(saved) != distributed.size():
            total: dict = {"calls": {}, "failures": {}}
            for counts in saved:
                for key, per_fn in total.items():
                    for name, n in (counts.get(key) or {}).items():
                        per_fn[name] = per_fn.get(name, 0) + int(n)
            saved = [total] + [{}] * (distributed.size() - 1)
        self.guard.restore(saved[distributed.rank()])
        self.ranks = list(saved)


class GRPOTask:
    """The loop's view of GRPO: a window's rollouts (sampled once, reused for its mu updates and
    kept in checkpoints between them), the step report and greedy validation."""

    def __init__(self, ctx: TaskContext):
        self.cfg, self.g, self.tokenizer = ctx.cfg, ctx.cfg.grpo, ctx.tokenizer
        self.run_dir, self.emit = Path(ctx.run_dir), ctx.emit
        self.spec = make_spec(ctx, self.g)
        self.guard = self.spec.guard
        self.counts = RewardCounts(self.guard)
        self.settled = self.guard.counts()  # the counts as the open window began
        self.step = 0  # the last step reported: the one a validation follows
        # the current window's rollouts, in micro-batch order: reused for its mu updates, saved
        # in checkpoints between them, read by the step report
        self.window: list[Rollout] = []
        self.said_equal = False  # "every group had equal rewards" is said once a session

    def task(self) -> Task:
        return Task(
            batches=lambda train, state, cfg: iter_rollouts(
                self.spec, train, state, self.window, str(self.run_dir), self.progress
            ),
            evaluate=self.evaluate,
            report=self.report,
            state=self.state,
            load_state=self.load_state,
            begin_window=self.begin_window,
            abandon_window=self.abandon_window,
        )

    # -- checkpoint state --------------------------------------------------------------------
    def begin_window(self, loop) -> None:
        self.settled = self.guard.counts()
        self.guard.log_fields = {"step": loop.step + 1}

    def abandon_window(self) -> None:
        """A window given up (a stop, a reward error) is sampled again on resume: its reward calls
        are not counted twice (its failure lines carry its step: the resume drops them)."""
        self.guard.restore(self.settled)

    def state(self, loop) -> tuple[dict[str, np.ndarray], dict]:
        """The reward guard's counts (every rank's) and, between the mu updates of one window, the
        window's rollouts (arrays, stats, in micro-batch order): resume then reuses them instead
        of sampling again from a policy that has moved, and equals the uninterrupted run. On
        several ranks, every rank's (gathered when sampled: `_kept`), so each rank resumes with
        its own."""
        counts = {"reward_counts": self.counts.state(loop.step)}
        if loop.repeat_index == 0 or not self.window:
            return {}, counts
        arrays, meta = {}, []
        for i, r in enumerate(self.window):
            parts = r.ranks if r.ranks is not None else [(r.batch, r.stats)]
            for rank, (batch, _) in enumerate(parts):
                tag = f"b{i}" if rank == 0 else f"b{i}r{rank}"
                arrays.update({f"{tag}_{j}": np.asarray(a) for j, a in enumerate(batch)})
            entry = {"n": len(r.batch), "stats": parts[0][1]}
            if len(parts) > 1:
                entry["ranks"] = [{"n": len(b), "stats": st} for b, st in parts[1:]]
            meta.append(entry)
        return arrays, {"rollouts": meta, "world": distributed.size(), **counts}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.counts.load(meta.get("reward_counts"))
        saved = meta.get("rollouts", [])
        world, here = meta.get("world"), distributed.size()
        if saved and world is not None and world != here:  # (no "world": saved before ranks were kept)
            mu = self.g.num_iterations
            raise ConfigError(
                "E554",
                f"this checkpoint is between the {mu} updates of a window sampled on {world} rank(s), and "
                f"{here} would split its prompts otherwise",
                str(self.run_dir),
                f"resume it on {world} rank(s) ({'one process' if world == 1 else f'--ranks {world}'}); "
                "a checkpoint at the end of a window resumes on any number",
            )  # fmt: skip
        rank = distributed.rank()
        window = []
        for i, m in enumerate(saved):
            if rank > 0 and "ranks" in m:
                m, tag = m["ranks"][rank - 1], f"b{i}r{rank}"
            else:
                tag = f"b{i}"
            window.append(Rollout(tuple(arrays[f"{tag}_{j}"] for j in range(m["n"])), m["stats"]))
        self.window[:] = window

    # -- reporting -------------------------------------------------------------------------
    def progress(self, step: int, k: int, n: int, prompts: int) -> None:
        """A "progress" event before each micro-batch of a session's first window is sampled:
        the first step's sampling can take minutes with nothing else to show."""
        g = self.g
        self.emit({
            "event": "progress", "stage": "sampling", "step": step, "done": k - 1, "total": n,
            "message": f"step {step}: sampling group {k}/{n} ({prompts} prompts x {g.num_generations} completions, "
            f"up to {g.max_completion_length} tokens each)",
        })  # fmt: skip

    def _say_equal_rewards(self, w: list[dict]) -> None:
        if self.said_equal or sum(s["zero_std"] for s in w) < sum(s["groups"] for s in w):
            return
        self.said_equal = True
        self.emit({"event": "warning", "message": "every group had equal rewards: nothing to learn this step "
                   "(all completions of each prompt scored the same; try harder or easier prompts, a higher "
                   "--temperature, more --num-generations, or a reward with partial credit)"})  # fmt: skip

    def report(self, step: int) -> dict:
        """Step-event fields from the rollouts of this step's window (TRL's metric names)."""
        self.step = step
        self.counts.gather()  # every rank reports each update: the other ranks' counts for checkpoints
        w = [r.stats for r in self.window]
        if not w:
            return {}
        self._say_equal_rewards(w)
        rewards = np.array([r for s in w for r in s["rewards"]], dtype=np.float64)
        lengths = [n for s in w for n in s["lengths"]]
        out = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(ddof=1)) if rewards.size > 1 else 0.0,
            "zero_std_fraction": sum(s["zero_std"] for s in w) / max(1, sum(s["groups"] for s in w)),
            "completion_len_mean": float(np.mean(lengths)),
            "completion_len_max": int(max(lengths)),
            "truncated_fraction": sum(s["truncated"] for s in w) / max(1, len(lengths)),
            "gen_time_s": sum(s["gen_s"] for s in w),
            "gen_tokens_per_s": sum(s["gen_tokens"] for s in w) / max(1e-9, sum(s["gen_s"] for s in w)),
        }
        for name in self.guard.names:
            vals = [sc[name] for s in w for sc in s["per_fn"] if sc[name] is not None]
            out[f"reward/{name}"] = float(np.mean(vals)) if vals else None
            out[f"reward_std/{name}"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        if self.g.dynamic_sampling:  # batches of prompts drawn, groups trained on (every rank's)
            out["draws"] = sum(s["draws"] for s in w)
            out["kept_groups"] = int(distributed.sum_floats([sum(s["kept_groups"] for s in w)])[0])
        out.update(distributed.rollout_stats(w, self.guard.names))  # every rank's groups
        fails = self.guard.failure_counts()
        if any(fails.values()):
            out["reward_failures"] = fails
        every = self.g.log_completions_every
        if every and (step % every == 0 or step == 1) and self.run_dir is not None and distributed.is_main():
            samples = [{"step": step, **x} for x in w[0]["samples"]]
            for x in samples:
                append_jsonl(self.run_dir / SAMPLES_FILE, x)
            self.emit({"event": "samples", "step": step, "samples": samples})
        return out

    # -- validation ------------------------------------------------------------------------
    def evaluate(self, backend, examples: list[PromptExample], batch_size: int, max_batches: int) -> dict:
        return self.counts.validate(
            self.step, lambda: evaluate_greedy(self.spec, backend, examples, batch_size, max_batches)
        )


def evaluate_greedy(
    spec: RolloutSpec, backend, examples: list[PromptExample], batch_size: int, max_batches: int
) -> dict:
    """Greedy completions of the first `max_batches * batch_size` held-out prompts (decoded
    as one batch), scored by the training rewards."""
    from mlxpt.decode.batch import generate_many

    n = len(examples) if max_batches < 0 else min(len(examples), max_batches * batch_size)
    backend.model.eval()
    totals, per_fn, lengths = [], {name: [] for name in spec.guard.names}, []
    for i in range(0, n, EVAL_BATCH):
        part = examples[i : min(n, i + EVAL_BATCH)]
        for e, c in zip(
            part,
            generate_many(backend.model, spec.tokenizer, [e.tokens for e in part], spec.g.max_completion_length),
            strict=True,
        ):
            total, scores = score(spec, e, c.text, len(c.tokens))
            totals.append(total)
            lengths.append(len(c.tokens))
            for name, v in scores.items():
                if v is not None:
                    per_fn[name].append(v)
    out = {"val_reward": float(np.mean(totals)) if totals else math.nan, "val_prompts": n}
    out["val_completion_len"] = float(np.mean(lengths)) if lengths else 0.0
    for name, vals in per_fn.items():
        out[f"val_reward/{name}"] = float(np.mean(vals)) if vals else None
    if per_fn.get("accuracy"):
        out["val_accuracy"] = float(np.mean(per_fn["accuracy"]))
    return out


def iter_rollouts(
    spec: RolloutSpec, train: list, state, window: list[Rollout], where: str = "checkpoint", progress=None
):
    """The loop's micro-batches for GRPO, from the state's data position on: each window's
    prompts are sampled and scored once (`window` holds its rollouts, in micro-batch order) and
    yielded again for each of its `num_iterations` updates. A run resumed between those updates
    starts at the saved repeat with the checkpoint's rollouts (E552 if they are for other prompts).
    `progress(step, k, n, prompts)` before each micro-batch of this session's first window is sampled."""
    cfg = spec.cfg
    g, t = cfg.grpo, cfg.train
    if g.dynamic_sampling:
        yield from iter_dynamic_rollouts(spec, train, state, window, where, progress)
        return
    mu = max(1, g.num_iterations)
    lengths = [len(e.tokens) + g.max_completion_length for e in train]
    start, repeat = (state.epoch, state.batch_index), state.repeat_index
    first = True
    for after, idxs in iter_windows(lengths, cfg.data.batch_size, t.grad_accum, t.seed, *start):
        groups = [[train[i] for i in idx] for idx in idxs]
        keys = [sample_keys(t.seed, start, k, idx) for k, idx in enumerate(idxs)]
        if repeat == 0:
            window.clear()
        else:
            _check_saved_prompts(window, groups, where)
        for r in range(repeat, mu):
            for k, examples in enumerate(groups):
                if r == 0:
                    if first and progress is not None:
                        progress(state.step + 1, k + 1, len(groups), len(examples))
                    window.append(_kept(sample_rollout(spec, examples, keys[k]), mu))
                rollout = window[k]
                tokens = rollout.stats["seq_tokens"] // max(1, len(examples)) * len(examples)
                position = (*after, 0) if r == mu - 1 else (*start, r + 1)
                yield MicroBatch(rollout.batch, tokens, k == len(groups) - 1, position)
        start, repeat, first = after, 0, False


def iter_dynamic_rollouts(
    spec: RolloutSpec, train: list, state, window: list[Rollout], where: str = "checkpoint", progress=None
):
    """`iter_rollouts` with dynamic sampling: each of a window's `grad_accum` micro-batches draws
    batches of prompts from the data plan until it holds `batch_size` groups with unequal rewards
    (`rollouts.sample_dynamic`), so the window ends where its last draw stopped; the rollouts
    record it, and a run resumed between a window's mu updates reads it from the checkpoint's."""
    cfg = spec.cfg
    g, t = cfg.grpo, cfg.train
    mu = max(1, g.num_iterations)
    lengths = [len(e.tokens) + g.max_completion_length for e in train]
    start, repeat = (state.epoch, state.batch_index), state.repeat_index
    first = True
    while True:
        if repeat == 0:
            window.clear()
            draws = _draws(train, lengths, cfg.data.batch_size, t.seed, start)
        elif len(window) != t.grad_accum or any("after" not in r.stats for r in window):
            raise ConfigError(
                "E552",
                "the checkpoint's saved rollouts are not those of a dynamic-sampling window of this run",
                str(where),
                "resume with the run's own data and settings",
            )
        for r in range(repeat, mu):
            for k in range(t.grad_accum):
                if r == 0:
                    if first and progress is not None:
                        progress(state.step + 1, k + 1, t.grad_accum, cfg.data.batch_size)
                    rollout = sample_dynamic(spec, draws, cfg.data.batch_size, g.dynamic_sampling, _agree)
                    window.append(_kept(rollout, mu))
                rollout = window[k]
                last = k == t.grad_accum - 1
                position = (*rollout.stats["after"], 0) if r == mu - 1 else (*start, r + 1)
                yield MicroBatch(rollout.batch, rollout.stats["seq_tokens"], last, position)
        start, repeat, first = tuple(window[-1].stats["after"]), 0, False


def _kept(rollout: Rollout, mu: int) -> Rollout:
    """`rollout`, with every rank's on several ranks when a window is reused (mu > 1): rank 0's
    checkpoint between the window's updates then holds what each rank resumes with."""
    if mu <= 1 or distributed.size() == 1:
        return rollout
    return replace(rollout, ranks=distributed.gather_parts(rollout.batch, rollout.stats))


def _draws(train: list, lengths: list[int], batch_size: int, seed: int, start: tuple[int, int]):
    """(prompts, their sampling keys, data position after them) of each batch of the data plan
    from `start` on: a draw samples as the first micro-batch of a window at its position would."""
    for epoch, i, idx in iter_batches(lengths, batch_size, seed, *start):
        mine = distributed.shard(idx)  # several ranks: this rank's part of the batch
        yield [train[j] for j in mine], sample_keys(seed, (epoch, i), 0, mine), (epoch, i + 1)


def _agree(zero: np.ndarray) -> tuple[np.ndarray, int]:
    """Every rank's equal-reward flags of one draw, in data order (the ranks' parts are
    contiguous, in rank order), and this rank's offset in them (`rollouts.sample_dynamic`)."""
    if distributed.size() == 1:
        return zero, 0
    parts = [json.loads(t) for t in distributed.gather_texts(json.dumps([bool(z) for z in zero]))]
    offset = sum(len(p) for p in parts[: distributed.rank()])
    return np.array([z for p in parts for z in p], dtype=bool), offset


def sample_keys(seed: int, start: tuple[int, int], k: int, idx: list[int]) -> list[int]:
    """The sampling keys of micro-batch `k` of the window that starts at data position `start`
    (epoch, batch): one per prompt, from the prompt's index in the training data. They do not
    depend on how the micro-batch is split over ranks, so 2 ranks sample what 1 rank samples."""
    from mlxpt.decode.sampling import row_key

    return [row_key(seed, *start, k, i) for i in idx]


def _check_saved_prompts(window: list[Rollout], groups: list[list[PromptExample]], where) -> None:
    saved = [r.stats.get("prompt_tokens") for r in window]
    if saved != [[list(e.tokens) for e in examples] for examples in groups]:
        raise ConfigError(
            "E552",
            "the checkpoint's saved rollouts are for other prompts than the resumed window",
            str(where),
            "resume with the run's own data and settings",
        )


def memory_shape(cfg: GRPOConfig, prompt: int):
    """One training pass on prompts of up to `prompt` tokens: with shared-prompt scoring (the
    default) each prompt runs once per group and the vocabulary head only on completion
    positions; else G whole rows a prompt. (The runner and the TUI's estimate both use this.)"""
    from mlxpt.models.memory import Shape

    g = cfg.grpo
    if g.plain_scoring:
        return Shape.rows(cfg.data.batch_size * g.num_generations, prompt + g.max_completion_length)
    return Shape.shared_prompts(cfg.data.batch_size, g.num_generations, prompt, g.max_completion_length)


GRPO = Method(
    name="grpo",
    read=read_rows,
    encode=prepare_data,
    objective=lambda cfg, layout: make_objective(cfg),
    task=lambda ctx: GRPOTask(ctx).task(),
    length=lambda e: len(e.tokens),
    memory_shape=memory_shape,
    shares_prompts=lambda cfg: not cfg.grpo.plain_scoring,
)


def run_grpo(
    cfg: GRPOConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one GRPO run; return (run folder, "finished" | "interrupted")."""
    return run_training(GRPO, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
