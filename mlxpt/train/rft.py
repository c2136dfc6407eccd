"""Rejection-sampling fine-tuning (expert iteration, STaR/RFT) on the shared runner and loop:
sample the current model, keep what the verifier accepts, fine-tune on it with the SFT objective.

Objective: minimise -sum(mask * log p(token | prefix)) / sum(mask) over the kept completions (the
SFT objective, objectives.sft_objective), the mask covering each completion and its stop token.

Rounds: the run's `steps` split into rounds of `steps_per_round` optimiser steps. At the start of
a round, `samples_per_prompt` (N) completions of each of the round's prompts (all training
prompts, or a seeded draw of `prompts_per_round`) are sampled from the current adapter, prompts
batched with each prompt prefilled once (GRPO's rollout code: train/rollouts.py, decode/batch.py)
and scored by the guarded reward functions (GRPO's registry and guard). A completion is accepted
when its total reward is >= `accept`, or by default when the accuracy reward is 1; accepted
completions that finished (not cut at max_completion_length) are deduplicated by text and at most
`keep_per_prompt` of them per prompt are kept. The round's steps then train on the kept set in
seeded length-bucketed windows, like SFT rows. The sampling is the task's batch source: the loop
sees micro-batches, nothing else.

Deviations and simplifications:
- The kept completions are trained as sampled (token ids, never re-tokenised text), after the
  prompt as the chat template rendered it: SFT's "assistant" mask for a one-turn chat.
- Each prompt's completions draw from keys of their own (train.seed, round, prompt index:
  `sampling.make_keyed_sampler`), and the training RNG is re-seeded from (train.seed, round) after
  sampling, so a round's samples depend neither on how the run was interrupted nor on how the
  prompts were chunked. Chunks are appended to `rft/round-NNN.part.jsonl` as they finish
  and the round's kept set is written atomically to `rft/round-NNN.json`: a resume (even after
  SIGKILL mid-sampling) reads them back instead of sampling again.
- Ctrl-C / SIGTERM while a round samples stops between chunks (the finished ones are in the part
  file) instead of after the whole round: the run ends "interrupted" at the round's first step,
  whose checkpoint the previous round closed, and a resume samples only the rest.
- A round that accepts nothing stops the run (`on_empty stop`: the round file and the last
  checkpoint stay) or samples the next round for the same steps (`continue`); `rounds` empty
  rounds in a row stop it in either case.
- `steps_per_round` counts optimiser steps, not epochs over the kept set: the schedule needs the
  run's length before the first sample.
- Like GRPO it needs the MLX backend (the numpy backend has no sampler).
- On several ranks (train/distributed.py) the round's chunks are sampled in waves, chunk k of a
  wave on rank k, each wave's results gathered to every rank; rank 0 alone reads and writes the
  round files and sends what it read. Every rank trains on the same kept set, each on its shard
  of each micro-batch; a rank whose shard is empty (a last batch with fewer rows than ranks)
  adds a batch that trains nothing. Keyed sampling makes 2 ranks sample what 1 rank samples.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mlxpt.config import RFTConfig
from mlxpt.config.rft import round_plan
from mlxpt.data.batching import collate
from mlxpt.data.encode import Example, pad_id_of
from mlxpt.data.prompts import PromptExample, PromptRow, encode_prompts
from mlxpt.errors import ConfigError, MlxptError
from mlxpt.models.memory import Shape
from mlxpt.objectives import sft_objective
from mlxpt.rewards import parse_rewards
from mlxpt.runs.atomic import append_jsonl, atomic_write_text, read_jsonl
from mlxpt.train import distributed, grpo
from mlxpt.train.loop import LoopState, MicroBatch, Stopped, Task, iter_windows
from mlxpt.train.rollouts import sample_scored
from mlxpt.train.runner import Method, TaskContext, run_training

ROUNDS_DIR = "rft"  # in the run folder: round-NNN.json (kept samples), round-NNN.part.jsonl (in progress)
HINT_KEY = 0x48494E54  # the last part of a hinted prompt's sampling key ("HINT"): draws of their own
SAMPLE_ROWS = 32  # completions decoded together when --sample-batch is 0


def check_config(cfg: RFTConfig, resume_dir=None) -> None:
    """Everything about the settings that can be wrong, before any data or weights are read."""
    r = cfg.rft
    if cfg.train.backend != "mlx":
        raise ConfigError(
            "E587", "RFT samples completions, which the numpy backend cannot do", "--backend", "use --backend mlx"
        )
    _, per_round = round_plan(cfg)
    if per_round % cfg.train.save_every:
        raise ConfigError(
            "E588",
            f"--save-every {cfg.train.save_every} does not divide the {per_round} steps of a round "
            "(a checkpoint closes every round)",
            "--save-every",
            f"give --save-every {per_round} or a divisor of it",
        )
    grpo.check_rewards(r)
    if r.strategy != "sample":
        from mlxpt.decode.options import check_decode

        check_decode(search_config(r, 0))  # scorer spec, search settings, temperature (E62x/E63x)
    if r.rationalize:
        check_hint(r)
    names = [n for n, _, _ in parse_rewards(r.rewards, r.reward_weights)]
    if r.accept is None and "accuracy" not in names:
        raise ConfigError(
            "E589",
            f"the default acceptance (accuracy reward == 1) needs the accuracy reward, not only {', '.join(names)}",
            "--accept",
            "give --accept T (accept a total reward >= T), or add accuracy to --rewards",
        )


def check_hint(r) -> None:
    """--rationalize: plain sampling only, and a hint that names {answer} and nothing else (E592)."""
    import string

    if r.strategy != "sample":
        raise ConfigError(
            "E592", f"--rationalize samples the hinted prompts; it does not combine with --strategy {r.strategy}",
            "--rationalize", "drop --rationalize, or use --strategy sample",
        )  # fmt: skip
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(r.hint) if f is not None]
        what = "" if fields == ["answer"] else f"has {', '.join('{' + f + '}' for f in fields) or 'no field'}"
    except ValueError as e:
        what = f"is not a template ({str(e).lower()})"
    if what:
        raise ConfigError(
            "E592", f"--hint {r.hint!r} {what}: it must name {{answer}} once and no other field", "--hint",
            "e.g. --hint 'The answer is {answer}.' (write a literal brace as {{ or }})",
        )  # fmt: skip


def search_config(r, seed: int, scorer=None):
    """The step search (`--strategy step-beam | tree`) one prompt's candidates come from: width N
    (`samples_per_prompt`), the round's sampling settings under `seed`, the step settings; `scorer`
    a built scorer (one per run) or, by default, the spec."""
    from mlxpt.data.stepwise import step_delimiter
    from mlxpt.decode.options import DecodeConfig, SearchConfig
    from mlxpt.decode.sampling import SamplingConfig

    search = SearchConfig(
        beam_width=r.samples_per_prompt, expand=r.expand, delimiter=step_delimiter(r.step_delimiter) if r.step_delimiter else None,
        aggregate=r.step_aggregate, max_steps=r.max_steps, prune_threshold=r.prune_threshold,
    )  # fmt: skip
    return DecodeConfig(
        r.strategy, n=r.samples_per_prompt, max_tokens=r.max_completion_length, extract=r.extract, search=search,
        sampling=SamplingConfig(r.temperature, r.top_p, r.top_k, r.min_p, seed), scorer=scorer or r.scorer,
    )  # fmt: skip


def _seed(*parts) -> int:
    """A 32-bit seed from the run seed and a position (round, chunk): stable across processes."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def round_prompts(n: int, per_round: int, seed: int, r: int) -> list[int]:
    """Indices of round r's prompts: all (per_round 0), else the r-th slice of seeded
    permutations laid end to end, so successive rounds cover every prompt before repeating."""
    if per_round <= 0 or per_round >= n:
        return list(range(n))
    perms: dict[int, np.ndarray] = {}
    out = []
    for j in range(r * per_round, (r + 1) * per_round):
        if j // n not in perms:
            perms[j // n] = np.random.default_rng([seed % 2**32, j // n]).permutation(n)
        out.append(int(perms[j // n][j % n]))
    return out


def select(
    results: list[tuple[list[int], str, bool, float, dict]], accept: float | None, keep: int, truncated_ok: bool = False
) -> dict:
    """One prompt's N scored completions (ids, text, truncated, total reward, rewards per function)
    -> {"accepted": count, "kept": [{"ids", "text", "reward"}]}: accepted, finished (or
    `truncated_ok`), distinct by text, at most `keep`."""
    kept, seen, accepted = [], set(), 0
    for ids, text, truncated, total, scores in results:
        ok = total >= accept if accept is not None else scores.get("accuracy") == 1
        if not ok:
            continue
        accepted += 1
        key = text.strip()
        if (truncated and not truncated_ok) or key in seen or len(kept) >= keep:
            continue
        seen.add(key)
        kept.append({"ids": ids, "text": text, "reward": total})
    return {"accepted": accepted, "kept": kept}


class RFTTask:
    """The loop's view of RFT: rounds of sampling (read back from the run folder where they were
    done), the kept set's micro-batches, round metrics in the step report, greedy validation."""

    def __init__(self, ctx: TaskContext):
        self.cfg, self.r, self.tokenizer = ctx.cfg, ctx.cfg.rft, ctx.tokenizer
        self.run_dir, self.emit, self.backend = Path(ctx.run_dir), ctx.emit, ctx.backend
        self.signal = ctx.signal  # Ctrl-C/SIGTERM: read between sampled chunks
        self.spec = grpo.make_spec(ctx, self.r)
        self.rounds, self.per_round = round_plan(ctx.cfg)
        self.pad = pad_id_of(ctx.tokenizer)
        # the round whose kept set trains steps [round_start, round_start + per_round); saved in checkpoints
        self.round, self.round_start = -1, 0
        self.kept: list[Example] | None = None
        self.stats: dict = {}
        self.scorer = None  # a step search's scorer, built at the first search (a prm:RUN loads a model)
        # the reward guard's counts, in checkpoints as they stand: a round's samples are never redone
        self.counts = grpo.RewardCounts(self.spec.guard)
        self.step = 0  # the last step reported: the one a validation follows

    def task(self) -> Task:
        return Task(
            batches=self.batches,
            evaluate=lambda backend, ex, bs, mb: self.counts.validate(
                self.step, lambda: grpo.evaluate_greedy(self.spec, backend, ex, bs, mb)
            ),
            report=self.report,
            state=self.state,
            load_state=self.load_state,
        )

    def state(self, loop: LoopState) -> tuple[dict, dict]:
        return {}, {"round": self.round, "round_start": self.round_start, "reward_counts": self.counts.state(loop.step)}

    def load_state(self, arrays: dict, meta: dict) -> None:
        self.round, self.round_start = meta.get("round", -1), meta.get("round_start", 0)
        self.counts.load(meta.get("reward_counts"))

    # -- micro-batches ---------------------------------------------------------------------
    def batches(self, train: list, state: LoopState, cfg: RFTConfig) -> Iterator[MicroBatch]:
        """Windows over the current round's kept set from the saved position; a new round (its
        sampling) when the round's steps are done."""
        t = cfg.train
        step, pos = state.step, (state.epoch, state.batch_index)
        while True:
            if self.round < 0 or step >= self.round_start + self.per_round:
                self._next_round(train, step)
                pos = (0, 0)
            elif self.kept is None:  # resumed inside a round: its kept set, as it was sampled
                saved = self._read_round(train, self.round, self.round_start)
                if saved is None:
                    raise MlxptError(
                        "E593", f"the kept samples of round {self.round + 1} are missing or were changed",
                        str(self._round_file(self.round)),
                        f"the run cannot continue this round exactly; start a new run from it: --from {self.run_dir}",
                    )  # fmt: skip
                self._use(train, saved)
                if step == self.round_start:  # stopped before the round's first step: as _next_round left it
                    self._seed_training()
                    pos = (0, 0)
            lengths = [len(e.tokens) for e in self.kept]
            seed = _seed(t.seed, "order", self.round)
            for after, idxs in iter_windows(lengths, cfg.data.batch_size, t.grad_accum, seed, *pos):
                for k, idx in enumerate(idxs):
                    ex = [self.kept[i] for i in idx]
                    tokens = sum(len(e.tokens) - 1 for e in ex)
                    arrays = collate(ex, self.pad) if ex else self._nothing()
                    yield MicroBatch(arrays, tokens, k == len(idxs) - 1, (*after, 0))
                step, pos = step + 1, after
                if step >= self.round_start + self.per_round:
                    break

    def _nothing(self) -> tuple:
        """A micro-batch that trains nothing (one row, mask 0: zero loss, weight and gradient): a
        rank's share of a kept-set batch with fewer rows than ranks (the kept set's size is the
        samples', so its last batch may be that small); the ranks still sum one window each."""
        e = self.kept[0]
        return collate([Example(e.tokens, [0] * len(e.tokens), e.where)], self.pad)

    def _next_round(self, train: list, step: int) -> None:
        """Sample (or read back) the rounds after the current one until one keeps something."""
        r, empty = self.round + 1, 0
        while True:
            saved = self._read_round(train, r, step) or self._sample_round(train, r, step)
            self.counts.gather()  # every rank's, for rank 0's checkpoints
            s = saved["stats"]
            self.emit({"event": "round", "round": r + 1, "step": step, **s})
            if s["kept"]:
                break
            empty += 1
            what = (f"round {r + 1} kept none of its {s['samples']} samples ({s['accepted']} accepted, "
                    f"{s['truncated']} cut at --max-completion-length)")  # fmt: skip
            if self.r.on_empty == "stop" or empty >= self.rounds:
                raise MlxptError(
                    "E590" if self.r.on_empty == "stop" else "E591",
                    what if self.r.on_empty == "stop" else f"{empty} rounds in a row kept nothing ({what})",
                    str(self._round_file(r)),
                    f"{'give --keep-truncated, ' if s['accepted'] else ''}lower --accept, raise "
                    "--samples-per-prompt or --temperature, or start from a better "
                    f"model (--from); a new run can start from this one: --from {self.run_dir}",
                )  # fmt: skip
            self.emit({"event": "warning", "message": f"{what}: sampling round {r + 2} for the same steps "
                       "(--on-empty continue)"})  # fmt: skip
            r += 1
        self.round, self.round_start = r, step
        self._use(train, saved)
        self._seed_training()

    def _seed_training(self) -> None:
        """The training RNG at a round's start: the same however its sampling went (or was read back)."""
        import mlx.core as mx

        mx.random.seed(_seed(self.cfg.train.seed, "train", self.round))

    def _use(self, train: list, saved: dict) -> None:
        self.kept = [
            Example(list(train[p["prompt"]].tokens) + k["ids"],
                    [0] * len(train[p["prompt"]].tokens) + [1] * len(k["ids"]), train[p["prompt"]].row.where)
            for p in saved["prompts"] for k in p["kept"]
        ]  # fmt: skip
        self.stats = saved["stats"]

    # -- one round's sampling ----------------------------------------------------------------
    def _round_file(self, r: int) -> Path:
        return self.run_dir / ROUNDS_DIR / f"round-{r + 1:03d}.json"

    def _fingerprint(self, train: list, r: int, step: int, legacy: bool = False) -> str:
        """What a round's samples depend on besides the weights at its start (which `step` pins)."""
        picks = round_prompts(len(train), self.r.prompts_per_round, self.cfg.train.seed, r)
        settings = dict(vars(self.r))
        if not settings["rationalize"]:  # a run without it fingerprints as before the settings existed
            del settings["rationalize"], settings["hint"]
        if not legacy:  # how the steps split into rounds does not change a round's samples
            del settings["rounds"], settings["steps_per_round"]
        what = [r, step, self.cfg.train.seed, settings, [train[i].tokens for i in picks]]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _read_round(self, train: list, r: int, step: int) -> dict | None:
        """Round r's saved kept set if it was sampled for this step and data (rank 0 reads it,
        every rank gets its text: the ranks agree whether to sample)."""
        path = self._round_file(r)
        try:
            text = path.read_text(encoding="utf-8") if distributed.is_main() else ""
        except (OSError, ValueError):
            text = "null"
        try:
            saved = json.loads(distributed.broadcast_text(text or "null"))
        except ValueError:
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") not in (
            self._fingerprint(train, r, step),
            self._fingerprint(train, r, step, legacy=True),  # a round sampled before the split left it
        ):
            return None
        return saved

    def _sample_round(self, train: list, r: int, step: int) -> dict:
        """N completions of each of round r's prompts, chunk by chunk (each chunk appended to the
        part file as it finishes, and read back from it on resume), then the round file. On
        several ranks, chunk i of each wave of N_ranks chunks is rank i's; the wave's results are
        gathered to every rank and rank 0 writes them."""
        N, fp = self.r.samples_per_prompt, self._fingerprint(train, r, step)
        picks = round_prompts(len(train), self.r.prompts_per_round, self.cfg.train.seed, r)
        size = self.r.sample_batch or max(1, SAMPLE_ROWS // N)
        chunks = [picks[i : i + size] for i in range(0, len(picks), size)]
        part = self._round_file(r).with_suffix(".part.jsonl")
        done = self._read_part(part, fp)  # the finished chunks of an interrupted sampling of this round
        if done:
            self.emit({"event": "progress", "stage": "sampling", "round": r + 1, "step": step + 1,
                       "done": len(done), "total": len(chunks),
                       "message": f"round {r + 1}: {len(done)}/{len(chunks)} sampled chunks read back from {part}"})  # fmt: skip
        if distributed.is_main():
            part.parent.mkdir(exist_ok=True)  # not the run folder: a deleted run stays deleted
        t0, ranks = time.perf_counter(), distributed.size()
        each = f"{N} completions" if self.r.strategy == "sample" else f"a {self.r.strategy} search of width {N}"
        self.spec.guard.log_fields = {"round": r + 1}  # no step: a resume reads the finished chunks back
        for first in range(len(done), len(chunks), ranks):
            if self.signal.requested:  # the finished chunks are in the part file: a resume reads them back
                self.counts.gather()  # their reward calls too
                self.emit({"event": "progress", "stage": "sampling", "round": r + 1, "step": step + 1,
                           "done": first, "total": len(chunks),
                           "message": f"round {r + 1}: sampling stopped after {first}/{len(chunks)} chunks "
                           f"(kept in {part}: a resume reads them back)"})  # fmt: skip
                raise Stopped
            wave = list(range(first, min(first + ranks, len(chunks))))
            what = f"{wave[0] + 1}" if len(wave) == 1 else f"{wave[0] + 1}-{wave[-1] + 1}"
            self.emit({"event": "progress", "stage": "sampling", "round": r + 1, "step": step + 1,
                       "done": first, "total": len(chunks),
                       "message": f"round {r + 1}: sampling chunk {what}/{len(chunks)} ({len(chunks[first])} prompts x "
                       f"{each}, up to {self.r.max_completion_length} tokens each)"})  # fmt: skip
            me = distributed.WORLD.rank  # rank k samples the wave's k-th chunk (one rank: the chunk)
            mine = self._sample_chunk(train, r, wave[me], chunks[wave[me]], fp) if me < len(wave) else None
            if ranks > 1:  # every rank's chunk, in chunk order (ranks past the last chunk sent null)
                mine = [json.loads(x) for x in distributed.gather_texts(json.dumps(mine))][: len(wave)]
            for x in mine if ranks > 1 else [mine]:
                if distributed.is_main():
                    append_jsonl(part, x, fsync=True)
                done.append({"prompts": x["prompts"], "gen_tokens": x["gen_tokens"]})
        prompts = [p for x in done for p in x["prompts"]]
        samples = sum(p["samples"] + p.get("hint_samples", 0) for p in prompts)  # every draw, hinted ones too
        kept = sum(len(p["kept"]) for p in prompts)
        stats = {
            "prompts": len(prompts),
            "samples": samples,
            "accepted": sum(p["accepted"] + p.get("hint_accepted", 0) for p in prompts),  # hinted draws too
            "kept": kept,
            "kept_share": kept / max(1, samples),
            "pass_at_n": sum(p["accepted"] > 0 for p in prompts) / max(1, len(prompts)),
            "truncated": sum(p["truncated"] for p in prompts),
            **self._hint_stats(prompts),
            "gen_tokens": sum(x["gen_tokens"] for x in done),
            "gen_s": time.perf_counter() - t0,
        }
        saved = {"round": r + 1, "start_step": step, "fingerprint": fp, "stats": stats, "prompts": prompts}
        if distributed.is_main():
            atomic_write_text(self._round_file(r), json.dumps(saved) + "\n")
            part.unlink(missing_ok=True)
        return saved

    def _hint_stats(self, prompts: list[dict]) -> dict:
        """A rationalizing round's numbers: prompts hinted, their samples, accepted and kept."""
        if not self.r.rationalize:
            return {}
        hinted = [p for p in prompts if "hint_samples" in p]
        return {
            "hinted": len(hinted),
            "hint_samples": sum(p["hint_samples"] for p in hinted),
            "hint_accepted": sum(p["hint_accepted"] for p in hinted),
            "hint_kept": sum(len(p["kept"]) for p in hinted),
        }

    def _read_part(self, part: Path, fp: str) -> list[dict]:
        """The finished chunks of an interrupted sampling of this round, in order (rank 0 reads
        them and trims the file to them; every rank gets the list)."""
        done = []
        if distributed.is_main():
            for x in read_jsonl(part):
                if not (isinstance(x, dict) and x.get("fingerprint") == fp and x.get("chunk") == len(done)):
                    break
                done.append(x)
            if part.exists():  # only that prefix stays (a line torn by a crash, another run's lines go)
                atomic_write_text(part, "".join(json.dumps(x) + "\n" for x in done))
        return done if distributed.size() == 1 else json.loads(distributed.broadcast_text(json.dumps(done)))

    def _sample_chunk(self, train: list, r: int, i: int, chunk: list[int], fp: str) -> dict:
        """Chunk i of round r: N scored completions of each of its prompts, and what each keeps."""
        from mlxpt.decode.sampling import row_key

        if self.r.strategy != "sample":
            return self._search_chunk(train, r, i, chunk, fp)
        keys = [row_key(self.cfg.train.seed, r, p) for p in chunk]  # a prompt's draws: its own
        groups, gen = self._sample([train[p] for p in chunk], keys)
        prompts = [
            {"prompt": p, "samples": len(results), "truncated": sum(x[2] for x in results),
             **select(results, self.r.accept, self.r.keep_per_prompt, self.r.keep_truncated)}
            for p, results in zip(chunk, groups, strict=True)
        ]  # fmt: skip
        if self.r.rationalize:
            gen += self._rationalize(train, r, chunk, prompts)
        return {"fingerprint": fp, "chunk": i, "prompts": prompts, "gen_tokens": gen}

    def _sample(self, examples: list[PromptExample], keys: list[int]) -> tuple[list[list[tuple]], int]:
        """N scored completions of each example under its key, in one batched generation: (each
        example's N results as `select` takes them, tokens generated)."""
        N = self.r.samples_per_prompt
        seqs, totals, per_fn, samples, gs, _ = sample_scored(self.spec, examples, N, keys)
        results = [(seqs[q][1], samples[q]["completion"], seqs[q][2], totals[q], per_fn[q]) for q in range(len(seqs))]
        return [results[k * N : (k + 1) * N] for k in range(len(examples))], gs.generated_tokens

    def _rationalize(self, train: list, r: int, chunk: list[int], prompts: list[dict]) -> int:
        """STaR's rationalization of a chunk's prompts that accepted nothing: N samples of each
        with the hint (its answer) in the prompt, under keys of their own, scored as the prompt
        without it; what they keep (marked "hint") is trained after the prompt without the hint,
        like any kept sample. Adds "hint_samples" and "hint_accepted" to each hinted prompt's
        entry; returns the tokens generated."""
        from mlxpt.decode.sampling import row_key

        todo = [(j, e) for j, q in enumerate(prompts) if not q["accepted"] and (e := self._hinted(train[chunk[j]]))]
        if not todo:
            return 0
        keys = [row_key(self.cfg.train.seed, r, chunk[j], HINT_KEY) for j, _ in todo]
        groups, gen = self._sample([e for _, e in todo], keys)
        for (j, _), results in zip(todo, groups, strict=True):
            got = select(results, self.r.accept, self.r.keep_per_prompt, self.r.keep_truncated)
            prompts[j].update(hint_samples=len(results), hint_accepted=got["accepted"],
                              kept=[{**x, "hint": True} for x in got["kept"]])  # fmt: skip
            prompts[j]["truncated"] += sum(x[2] for x in results)
        return gen

    def _hinted(self, e: PromptExample) -> PromptExample | None:
        """Prompt `e` with the hint on a new line of its last user message: the hinted tokens,
        `e`'s row (so the rewards see the prompt and fields without the hint); None when the row
        has no answer or the hinted prompt no longer fits --max-seq-len."""
        answer = e.row.fields.get("answer")
        if answer is None or str(answer).strip() == "":
            return None
        msgs = [dict(m) for m in e.row.messages]
        msgs[-1]["content"] = msgs[-1]["content"].rstrip() + "\n" + self.r.hint.format(answer=answer)
        row = PromptRow(e.row.where, e.row.prompt, msgs, e.row.chat, e.row.fields)
        d = self.cfg.data
        got, _ = encode_prompts([row], self.tokenizer, d.max_seq_len, self.r.max_completion_length, "drop")
        return PromptExample(got[0].tokens, e.row) if got else None

    def _search_chunk(self, train: list, r: int, i: int, chunk: list[int], fp: str) -> dict:
        """Chunk i of round r by step search: each prompt's finished solutions (at most N) are its
        candidates, scored and kept like samples. Each prompt's search runs under a seed of its
        own (run seed, round, prompt), so it finds the same solutions in any chunk, on any rank."""
        from mlxpt.decode.scorers import make_scorer
        from mlxpt.decode.strategies import run_strategy
        from mlxpt.train.rollouts import score

        model = self.backend.model
        model.eval()
        if self.scorer is None:
            self.scorer = make_scorer(self.r.scorer, model, self.tokenizer)
        eos = self.tokenizer.eos_token_id
        prompts, gen = [], 0
        for p in chunk:
            e = train[p]
            cfg = search_config(self.r, _seed(self.cfg.train.seed, "search", r, p), self.scorer)
            res = run_strategy(model, self.tokenizer, e.tokens, cfg, prompt=e.row.prompt, row=dict(e.row.fields))
            gen += res.generated_tokens
            results = []
            for text, ids, why in zip(res.samples, res.sample_tokens, res.finish_reasons, strict=True):
                # scored on the generated tokens (a stop token is not one); ended by the model (its stop token
                # is in `ids`) or at a final-answer line (trained to stop there)
                total, scores = score(self.spec, e, text, len(ids) - (why == "stop"))
                ids = list(ids) + ([eos] if why == "answer" else [])
                results.append((ids, text, why not in ("stop", "answer"), total, scores))
            prompts.append({"prompt": p, "samples": len(results), "truncated": sum(x[2] for x in results),
                            **select(results, self.r.accept, self.r.keep_per_prompt, self.r.keep_truncated)})  # fmt: skip
        return {"fingerprint": fp, "chunk": i, "prompts": prompts, "gen_tokens": gen}

    # -- reporting -------------------------------------------------------------------------
    def report(self, step: int) -> dict:
        """The current round's numbers on every step (the TUI charts them as steps)."""
        self.step = step
        s = self.stats
        if not s:
            return {}
        return {
            "rft_round": self.round + 1,
            "rft_samples": s["samples"],
            "rft_kept": s["kept"],
            "rft_kept_share": s["kept_share"],
            "rft_accept_rate": s["accepted"] / max(1, s["samples"]),
            "rft_pass_at_n": s["pass_at_n"],
            **({"rft_hint_kept": s["hint_kept"]} if "hint_kept" in s else {}),  # --rationalize
        }


def memory_shape(cfg: RFTConfig, prompt: int) -> Shape:
    """One training pass: batch_size kept rows of up to prompt + max_completion_length tokens."""
    return Shape.rows(cfg.data.batch_size, min(prompt + cfg.rft.max_completion_length, cfg.data.max_seq_len))


def encode(cfg: RFTConfig, tokenizer, rows=None) -> tuple:
    """GRPO's prompt encoding, after a step search's `prm:RUN` scorer is checked against the base
    model (E528; the model is local once its tokenizer loaded): before any weights load or a run
    folder is made, not when the first round starts sampling."""
    if cfg.rft.strategy != "sample":
        from mlxpt.decode.scorers import check_base_model

        check_base_model(cfg.rft.scorer, cfg.model.model)
    return grpo.prepare_data(cfg, tokenizer, rows, cfg.rft)


RFT = Method(
    name="rft",
    read=lambda cfg: grpo.read_prompts(cfg, cfg.rft),
    encode=encode,
    objective=lambda cfg, layout: sft_objective,
    task=lambda ctx: RFTTask(ctx).task(),
    length=lambda e: len(e.tokens),
    memory_shape=memory_shape,
    check=check_config,
)


def run_rft(
    cfg: RFTConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one RFT run; return (run folder, "finished" | "interrupted")."""
    return run_training(RFT, cfg, resume_dir=resume_dir, emit=emit, stop=stop)
