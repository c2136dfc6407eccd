"""Distillation from a teacher on the shared runner and loop: a reader (SFT's rows), a layout (the
teacher's log-probs at each trained position) and an objective (objectives.distill_objective).

Token level (`--mode token`, GKD, Agarwal et al. 2023): minimise sum(mask * D(p_teacher, q_student))
/ sum(mask) over the trained tokens (SFT's mask), D = forward KL, reverse KL or TRL's generalised
JSD at `temperature`. With `on_policy_ratio` R each micro-batch's responses are, with probability
R (a draw seeded by the batch's data position), replaced by the student's own samples from its
prompts (GKD's lambda). Sequence level (`--mode sequence`, Kim & Rush 2016): the teacher answers
every training prompt once (greedy, or sampled at `temperature`), the answers are cached in the
run folder, and the run is SFT on them.

The teacher is a model (`--teacher MODEL`) or an mlxpt run / adapter folder (its base + adapter).
Where it is this run's own base (with another adapter, or none), its log-probs come from the
student's model with the teacher's adapter arrays swapped in for one no-gradient pass (no second
copy of the base); otherwise it is loaded once, frozen. Its tokenizer must be the student's
(train/teacher.py).

Deviations and simplifications:
- `--teacher-cache top-k`: the teacher's top-k log-probs at each trained position of the training
  rows are computed once before the first step (run folder, distill/topk-K.safetensors); both
  distributions are renormalised over those k ids (no tail bucket). Validation and on-policy
  batches always use the full teacher distribution, computed on the fly.
- Sequence mode regenerates only the first assistant turn of a row (the prompt is everything
  before the first trained token); a run killed while the teacher answers starts them again.
- Sampling (sequence mode sampled, on-policy) needs the MLX backend; so does a teacher that is
  not this run's base.
- On several ranks (train/distributed.py) each rank scores its shard of every micro-batch with the
  teacher; the top-k cache and the teacher's answers are computed in parts (row batch or prompt
  chunk k on rank k mod N), gathered to every rank and written by rank 0. On-policy rows draw
  from keys of their own (data position, row index), so 2 ranks train what 1 rank trains.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from mlxpt.config.distill import DistillConfig, check_settings
from mlxpt.data.batching import collate, trained_positions
from mlxpt.data.encode import Example, pad_id_of
from mlxpt.data.formats import raise_if_errors, scan_splits
from mlxpt.errors import ConfigError, DataError, MlxptError
from mlxpt.models.loader import resolve
from mlxpt.objectives import distill_objective, sft_objective
from mlxpt.runs import atomic_write_json
from mlxpt.runs.atomic import save_safetensors_atomic
from mlxpt.train import distributed, sft
from mlxpt.train.loop import LoopState, MicroBatch, Task, iter_windows, rows_task, validate
from mlxpt.train.runner import Method, TaskContext, rows_shape, run_training
from mlxpt.train.teacher import Teacher, check_tokenizers, resolve_teacher, same_base, top_k

__all__ = ["DISTILL", "CACHE_DIR", "run_distill", "top_k"]

CACHE_DIR = "distill"  # in the run folder: answers.json (sequence mode), topk-K.safetensors + .json
GEN_CHUNK = 16  # prompts answered together in one batched generation


def check_config(cfg: DistillConfig, resume_dir=None) -> None:
    """Refusals before anything is read: the settings, the teacher's folder, what needs MLX."""
    check_settings(cfg)
    spec = resolve_teacher(cfg)
    d, t = cfg.distill, cfg.train
    samples = d.mode == "sequence" or d.on_policy_ratio > 0
    if samples and cfg.data.mask == "none":  # every token trained: no prompt left to answer
        raise ConfigError(
            "E746", f"{_sampling(d)} answers each row's prompt, and --mask none trains the whole row, leaving none",
            "--mask", "use --mask assistant (the default) or --mask prompt",
        )  # fmt: skip
    if t.backend != "mlx" and (samples or not same_base(cfg, spec)):
        what = "samples answers" if samples else "loads a teacher that is not this run's base"
        raise ConfigError(
            "E745", f"this distillation {what}, which the numpy backend cannot do", "--backend", "use --backend mlx"
        )


def _sampling(d) -> str:
    return "--mode sequence" if d.mode == "sequence" else "--on-policy-ratio"


def read_rows(cfg: DistillConfig):
    """(train rows, valid rows): SFT's rows, every one validated before any weights are read.
    Where answers are sampled (sequence mode, on-policy), text rows are refused (E746): they have
    no prompt, so every row once got the teacher's answer to the same empty context."""
    train, valid, errors = scan_splits(cfg.data.data, cfg.data.valid)
    raise_if_errors(errors, Path(cfg.data.data).name)
    d = cfg.distill
    if d.mode == "sequence" or d.on_policy_ratio > 0:
        text = next((r for r in [*train, *valid] if r.kind == "text"), None)
        if text is not None:
            raise DataError(
                "E746", f"{_sampling(d)} answers each row's prompt, and a text row has none", text.where,
                "give prompt/completion or chat rows, or use --mode token without --on-policy-ratio",
            )  # fmt: skip
    return train, valid


def prepare_data(cfg: DistillConfig, tokenizer, rows=None):
    """The tokenizer check, then SFT's encoding (chat template, mask, over-length policy)."""
    rows = rows if rows is not None else read_rows(cfg)
    check_tokenizers(tokenizer, cfg, resolve_teacher(cfg), rows[0])
    return sft.prepare_data(cfg, tokenizer, rows)


def prompt_of(e: Example) -> list[int]:
    """The tokens before the first trained one (a one-turn chat: the rendered prompt)."""
    return list(e.tokens[: e.mask.index(1)]) if 1 in e.mask else list(e.tokens)


def _with_teacher_weights(fp: str, spec) -> str:
    """`fp` with the teacher adapter's file identity (a teacher run resumed and trained on once
    matched its old cache, so training and validation used two teachers without a word). A cache
    written before this reads as changed, and is computed again."""
    from mlxpt.models.adapters import adapter_stamp

    stamp = adapter_stamp(spec.adapter)
    return fp if stamp is None else _fingerprint(fp, *stamp[1:])  # size and mtime: a copied run keeps its cache


def _read_topk(path: Path, meta: Path, fp: str, offsets: np.ndarray, k: int) -> dict | None:
    """The saved top-k cache if it is this one and whole; None (compute it again) for anything
    else: another fingerprint, a torn or hand-edited file (once E001 at the resume)."""
    from mlxpt.backends.numpy_weights import read_safetensors

    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or info.get("fingerprint") != fp:
            return None
        saved = {name: np.array(v) for name, v in read_safetensors(path).items()}
    except (OSError, ValueError, KeyError, TypeError, MlxptError):
        return None
    n = int(offsets[-1])
    ok = (
        {"offsets", "ids", "logp"} <= set(saved)
        and np.array_equal(saved["offsets"], offsets)
        and saved["ids"].shape[0] == saved["logp"].shape[0] == n
        and saved["ids"].shape[1:] == saved["logp"].shape[1:]
        and (n == 0 or saved["ids"].shape[1] <= k)
    )
    return saved if ok else None


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DistillTask:
    """The loop's view of distillation: micro-batches with the teacher's log-probs (token mode)
    or SFT on the teacher's cached answers (sequence mode)."""

    def __init__(self, ctx: TaskContext):
        self.cfg, self.d, self.ctx = ctx.cfg, ctx.cfg.distill, ctx
        self.tokenizer, self.backend, self.emit = ctx.tokenizer, ctx.backend, ctx.emit
        self.run_dir, self.pad = Path(ctx.run_dir), pad_id_of(ctx.tokenizer)
        self.spec = resolve_teacher(ctx.cfg)
        self.teacher = Teacher(ctx, self.spec)
        self.cache: dict | None = None  # top-k: {"offsets", "ids", "logp"} over the training rows
        self.teacher_tokens = 0  # trained positions scored by the teacher (token) or answer tokens (sequence)
        self.on_policy = 0
        self.settled = (0, 0)  # both as the open window began: an abandoned window's are given back

    def task(self) -> Task:
        state = lambda loop: ({}, {"teacher_tokens": self.teacher_tokens, "on_policy": self.on_policy})  # noqa: E731
        hooks = {"report": self.report, "state": state, "load_state": self.load,
                 "begin_window": self.begin_window, "abandon_window": self.abandon_window}  # fmt: skip
        if self.d.mode == "sequence":
            plain = rows_task(partial(collate, pad_id=self.pad), lambda e: len(e.tokens), lambda e: len(e.tokens) - 1)
            return replace(plain, batches=self.answer_batches, **hooks)
        return Task(
            batches=self.token_batches,
            evaluate=lambda b, ex, bs, mb: validate(b, ex, bs, self.arrays, lambda e: len(e.tokens), mb),
            **hooks,
        )

    def load(self, arrays: dict, meta: dict) -> None:
        self.teacher_tokens, self.on_policy = meta.get("teacher_tokens", 0), meta.get("on_policy", 0)

    def begin_window(self, loop: LoopState) -> None:
        self.settled = (self.teacher_tokens, self.on_policy)

    def abandon_window(self) -> None:
        """The counters are added to as micro-batches are built: a window given up (and built
        again on resume) must not count in the checkpoint."""
        self.teacher_tokens, self.on_policy = self.settled

    def report(self, step: int) -> dict:
        return {"teacher_tokens": self.teacher_tokens, "on_policy_batches": self.on_policy}

    # -- token mode ------------------------------------------------------------------------
    def arrays(self, examples: list, cached: list[int] | None = None) -> tuple:
        """(inputs, targets, index, weight, ids, teacher): the trained positions of the rows and
        the teacher's log-probs there, full (ids empty) or its cached top-k of rows `cached`."""
        inputs, targets, mask = collate(examples, self.pad)
        index, weight = trained_positions(mask)
        if cached is None:
            return inputs, targets, index, weight, np.zeros((0,), np.int32), self.teacher.logprobs(inputs, index)
        c, k = self.cache, self.cache["ids"].shape[1]
        ids, logp = np.zeros((len(index), k), np.int32), np.zeros((len(index), k), np.float32)
        at = 0
        for i in cached:  # the batch's trained positions are its rows' in order (C order of the mask)
            a, b = int(c["offsets"][i]), int(c["offsets"][i + 1])
            ids[at : at + b - a], logp[at : at + b - a] = c["ids"][a:b], c["logp"][a:b]
            at += b - a
        ids[at:] = np.arange(k, dtype=np.int32)  # padding rows (weight 0): any distinct ids
        return inputs, targets, index, weight, ids, logp

    def token_batches(self, train: list, state: LoopState, cfg: DistillConfig) -> Iterator[MicroBatch]:
        if self.d.teacher_cache == "top-k" and self.cache is None:
            self.cache = self._topk_cache(train)
        t = cfg.train
        lengths = [len(e.tokens) for e in train]
        for after, window in iter_windows(lengths, cfg.data.batch_size, t.grad_accum, t.seed, *(state.epoch, state.batch_index)):  # fmt: skip
            for j, idx in enumerate(window):
                examples = [train[i] for i in idx]
                cached = idx if self.cache is not None else None
                draw = np.random.default_rng([t.seed % 2**32, *after, j]).random()  # one draw a global micro-batch
                if draw < self.d.on_policy_ratio:
                    examples, cached = self._student_samples(examples, idx, [t.seed % 2**32, *after, j]), None
                    self.on_policy += 1
                arrays = self.arrays(examples, cached)
                # every rank's share (this rank's on one): the count a checkpoint holds is the run's
                self.teacher_tokens += int(distributed.sum_floats([float((arrays[3] > 0).sum())])[0])
                tokens = sum(len(e.tokens) - 1 for e in examples)
                yield MicroBatch(arrays, tokens, j == len(window) - 1, (*after, 0))

    def _sampler(self):
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.d.temperature)

    def _student_samples(self, examples: list, idx: list[int], position: list[int]) -> list[Example]:
        """The rows with their responses replaced by the student's samples. Each row draws from
        keys of its own (the micro-batch's data position and the row's index in the data:
        `sampling.make_keyed_sampler`), so a row samples the same on any rank and whatever rows
        share its batch, and training draws nothing from the global RNG here."""
        from mlxpt.decode.batch import generate_groups
        from mlxpt.decode.sampling import make_keyed_sampler, row_key

        model = self.backend.model
        model.eval()
        prompts = [prompt_of(e) for e in examples]
        keys = [row_key(*position, i) for i in idx]
        sampler = make_keyed_sampler(self.d.temperature)
        groups = generate_groups(model, self.tokenizer, prompts, 1, self.d.max_completion_length, sampler, keys=keys)
        done = [g[0] for g in groups]
        return [self._answered(e, p, c) for e, p, c in zip(examples, prompts, done, strict=True)]

    def _answered(self, e: Example, prompt: list[int], c) -> Example:
        """A row of `prompt` + the generated answer (its stop token too when it stopped), trained on the answer."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        answer = list(c.tokens) + ([eos] if c.finish_reason == "stop" and eos is not None else [])
        tokens = (prompt + answer)[: self.cfg.data.max_seq_len]
        return Example(tokens, [0] * len(prompt) + [1] * (len(tokens) - len(prompt)), e.where)

    def _topk_cache(self, train: list) -> dict:
        """The teacher's top-k at every trained position of the training rows, read back from the
        run folder when it was computed before (same teacher, k and rows). On several ranks, row
        batch b is rank b mod N's, the parts are summed into the whole cache on every rank, and
        rank 0 writes it (a resume on any number of ranks reads it back)."""
        k = self.d.top_k
        path = self.run_dir / CACHE_DIR / f"topk-{k}.safetensors"
        fp = _fingerprint(self.spec.ref, k, [e.tokens for e in train], [e.mask for e in train])
        fp = _with_teacher_weights(fp, self.spec)
        meta = path.with_suffix(".json")
        offsets = np.cumsum([0] + [int(np.count_nonzero(e.mask[1:])) for e in train]).astype(np.int64)
        saved = _read_topk(path, meta, fp, offsets, k)
        if not distributed.any_rank(saved is None):  # every rank read it (else all compute it again)
            return saved
        parts, bs, ranks, me = {}, self.cfg.data.batch_size, distributed.size(), distributed.WORLD.rank
        for b, s in enumerate(range(0, len(train), bs)):
            if b % ranks != me:
                continue
            self.emit({"event": "progress", "stage": "teacher", "done": s, "total": len(train),
                       "message": f"teacher top-{k}: rows {s + 1}-{min(s + bs, len(train))} of {len(train)}"})  # fmt: skip
            inputs, _, mask = collate(train[s : s + bs], self.pad)
            index, weight = trained_positions(mask)
            n = int((weight > 0).sum())
            parts[s] = top_k(self.teacher.logprobs(inputs, index)[:n], k)
        cache = {"offsets": offsets, **self._whole(parts, offsets, train, bs)}
        if distributed.is_main():
            path.parent.mkdir(exist_ok=True)  # not the run folder: a deleted run stays deleted
            save_safetensors_atomic(path, cache, {"format": "mlxpt-distill"})
            atomic_write_json(
                meta, {"fingerprint": fp, "teacher": self.spec.ref, "k": k, "positions": int(offsets[-1])}
            )
        return cache

    @staticmethod
    def _whole(parts: dict, offsets: np.ndarray, train: list, bs: int) -> dict:
        """{"ids", "logp"} of every trained position from the batches this rank computed ({row
        start: (ids, logp)}); on several ranks summed over the ranks (each fills its own rows,
        zeros elsewhere: exact; ids stay below 2^24, exact in float32)."""
        if distributed.size() == 1:
            return {"ids": np.concatenate([parts[s][0] for s in sorted(parts)]),
                    "logp": np.concatenate([parts[s][1].astype(np.float32) for s in sorted(parts)])}  # fmt: skip
        k = parts[min(parts)][0].shape[1] if parts else 0
        have = distributed.sum_floats([float(k), float(bool(parts))])
        k = round(have[0] / have[1])  # the ranks that computed a batch agree on k = min(top_k, vocabulary)
        ids, logp = np.zeros((int(offsets[-1]), k), np.int32), np.zeros((int(offsets[-1]), k), np.float32)
        for s, (i, v) in parts.items():
            a, b = int(offsets[s]), int(offsets[min(s + bs, len(train))])
            ids[a:b], logp[a:b] = i, v
        return distributed.sum_arrays({"ids": ids, "logp": logp})

    # -- sequence mode ---------------------------------------------------------------------
    def answer_batches(self, train: list, state: LoopState, cfg: DistillConfig) -> Iterator[MicroBatch]:
        answered = self._answers(train)
        plain = rows_task(partial(collate, pad_id=self.pad), lambda e: len(e.tokens), lambda e: len(e.tokens) - 1)
        yield from plain.batches(answered, state, cfg)

    def _answers(self, train: list) -> list[Example]:
        """The teacher's answer to every training prompt: generated once, then read back from the
        run folder (rank 0 reads it and writes it; every rank gets its text)."""
        d = self.d
        path = self.run_dir / CACHE_DIR / "answers.json"
        prompts = [prompt_of(e) for e in train]
        fp = _fingerprint(self.spec.ref, d.teacher_greedy, d.temperature, d.max_completion_length,
                          self.cfg.train.seed, prompts)  # fmt: skip
        fp = _with_teacher_weights(fp, self.spec)
        text = "null"
        if distributed.is_main():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, ValueError):
                pass
        try:
            saved = json.loads(distributed.broadcast_text(text))
        except ValueError:
            saved = None
        if not (isinstance(saved, dict) and saved.get("fingerprint") == fp):
            saved = {"fingerprint": fp, "teacher": self.spec.ref, "answers": self._teacher_answers(prompts)}
            if distributed.is_main():
                path.parent.mkdir(exist_ok=True)  # not the run folder: a deleted run stays deleted
                atomic_write_json(path, saved)
        out = []
        for e, p, a in zip(train, prompts, saved["answers"], strict=True):
            out.append(self._answered(e, p, _Answer(a["tokens"], a["finish_reason"])))
        self.teacher_tokens = sum(len(a["tokens"]) for a in saved["answers"])
        return out

    def _teacher_answers(self, prompts: list) -> list[dict]:
        """One answer per prompt, GEN_CHUNK prompts a batched generation. Chunk c is sampled under
        its own seed (train.seed, c), so it is the same whichever rank answers it: on several
        ranks chunk c is rank c mod N's and the answers are gathered to every rank. The training
        RNG is put back afterwards."""
        import mlx.core as mx

        d, ranks, me = self.d, distributed.size(), distributed.WORLD.rank
        sampler = None if d.teacher_greedy else self._sampler()
        key = mx.array(mx.random.state[0])
        mine: dict[int, list] = {}
        try:
            for c, s in enumerate(range(0, len(prompts), GEN_CHUNK)):
                if c % ranks != me:
                    continue
                self.emit({"event": "progress", "stage": "teacher", "done": s, "total": len(prompts),
                           "message": f"teacher answers: prompts {s + 1}-{min(s + GEN_CHUNK, len(prompts))} of {len(prompts)}"})  # fmt: skip
                seed = hashlib.sha256(f"{self.cfg.train.seed}:teacher:{c}".encode()).digest()[:4]
                mx.random.seed(int.from_bytes(seed, "little"))
                done = self.teacher.generate(
                    self.tokenizer, prompts[s : s + GEN_CHUNK], d.max_completion_length, sampler
                )
                mine[c] = [{"tokens": list(map(int, a.tokens)), "finish_reason": a.finish_reason} for a in done]
        finally:
            self.backend._set_rng(key)
        if ranks > 1:  # JSON keys are text: back to chunk numbers
            parts = [json.loads(text) for text in distributed.gather_texts(json.dumps(mine))]
            mine = {int(c): a for part in parts for c, a in part.items()}
        return [a for c in sorted(mine) for a in mine[c]]


@dataclass
class _Answer:
    tokens: list
    finish_reason: str


def teacher_bytes(cfg: DistillConfig) -> int:
    """Memory of a teacher held beside the student: its weight files (0 where it shares the base)."""
    if not cfg.distill.teacher:
        return 0
    try:
        spec = resolve_teacher(cfg)
        if same_base(cfg, spec):
            return 0
        return sum(f.stat().st_size for f in resolve(spec.base).glob("*.safetensors"))
    except MlxptError:
        return 0


def memory_shape(cfg: DistillConfig, longest: int):
    """Whole rows; token mode holds about three times the head's logits (the teacher's
    log-probs and the divergence's softmaxes beside the student's), plus the teacher's weights."""
    shape = rows_shape(1)(cfg, longest)
    if cfg.distill.mode == "token":
        shape = replace(shape, head_tokens=3 * shape.head_tokens)
    extra = teacher_bytes(cfg)
    return replace(shape, teacher_bytes=extra)


def objective(cfg: DistillConfig, layout: str) -> Callable:
    d = cfg.distill
    if d.mode == "sequence":
        return sft_objective
    return partial(distill_objective, divergence=d.divergence, beta=d.jsd_beta, temperature=d.temperature)


DISTILL = Method(
    name="distill",
    read=read_rows,
    encode=prepare_data,
    objective=objective,
    task=lambda ctx: DistillTask(ctx).task(),
    length=lambda e: len(e.tokens),
    memory_shape=memory_shape,
    check=check_config,
    output=lambda cfg: "distill" if cfg.distill.mode == "token" else "logp",
)


def run_distill(
    cfg: DistillConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one distillation run; return (run folder, "finished" | "interrupted")."""
    return run_training(DISTILL, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
