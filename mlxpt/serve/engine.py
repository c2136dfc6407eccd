"""One generation thread for the whole server: every model call happens on it.

Plain requests (no strategy) join a continuous batch per model: mlx-lm's `BatchGenerator`, which
prefills new prompts between decode steps and drops finished rows, so 32 clients share one
forward pass per token. `n` choices are n rows. Strategy requests (`mlxpt.strategy`) run
`decode.strategies.run_strategy` whole, between two batch steps (queued: the batch waits).
A request whose client went away (`Job.cancelled`) has its rows removed at the next step.

The thread talks to the HTTP handlers through each job's `events` queue: ("delta", index, text,
logprobs), ("finish", index, reason), ("strategy", StrategyResult), ("error", ApiError) and
finally ("done", usage).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.errors import MlxptError
from mlxpt.serve.catalog import Catalog, Entry, ModelCache
from mlxpt.serve.schema import ApiError, Limits, Request


@dataclass
class Job:
    req: Request
    entry: Entry | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    open_choices: int = 0


@dataclass
class _Row:
    job: Job
    index: int
    detok: object
    stop: tuple[str, ...]
    sent: int = 0  # characters of the text already sent
    tokens: int = 0


class _Batch:
    """A model's continuous batch and its rows (uid -> _Row)."""

    def __init__(self, model, tokenizer, batch_size: int):
        from mlx_lm.generate import BatchGenerator

        from mlxpt.decode.generate import add_stop_tokens

        self.tokenizer = add_stop_tokens(tokenizer)
        self.stop_ids = set(self.tokenizer.eos_token_ids)
        self.gen = BatchGenerator(
            model, stop_tokens=[[t] for t in self.stop_ids], completion_batch_size=batch_size,
            prefill_batch_size=min(8, batch_size),
        )  # fmt: skip
        self.rows: dict[int, _Row] = {}
        self.reused = 0  # prompt tokens the last insert took from the prefix cache
        self.prefixes = None  # mlx-lm's LRUPromptCache, shared by the model's batches (see Engine)

    def insert(self, tokens: list[int], n: int, max_tokens: int, samplers: list) -> list[int]:
        """Insert n rows of one prompt, each starting from the nearest cached prefix (the KV
        cache of an earlier prompt + answer that shares the start, trimmed to the common part)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        caches, done, rest = [], [], []
        for _ in range(n):
            cache, left = self.prefixes.fetch_nearest_cache(0, tokens)
            if cache is not None and not left:  # an exact hit: the last token must still be fed
                if can_trim_prompt_cache(cache):
                    trim_prompt_cache(cache, 1)
                    left = tokens[-1:]
                else:
                    cache, left = None, tokens
            caches.append(cache)
            done.append(tokens[: len(tokens) - len(left)])
            self.reused = len(done[-1])
            rest.append(list(left))
        return self.gen.insert(rest, max_tokens=[max_tokens] * n, caches=caches, all_tokens=done, samplers=samplers)

    def keep_prefix(self, r) -> None:
        """Remember a finished row's cache (prompt + answer) for later prompts that share its start."""
        if r.prompt_cache is not None and r.all_tokens:
            self.prefixes.insert_cache(0, list(r.all_tokens), r.prompt_cache)


def _sampler(req: Request, row: int):
    """The row's sampler: None (greedy) at temperature 0; with a seed, its own random key (seed + row),
    so a seeded request gives the same text whatever else shares the batch."""
    if req.temperature == 0:
        return None
    from mlxpt.decode.sampling import make_sampler

    if req.seed is None:
        return make_sampler(req.temperature, req.top_p)
    import mlx.core as mx

    from mlxpt.decode.sampling import filter_logprobs

    key = [mx.random.key((req.seed + row) % 2**63)]
    temp, top_p = req.temperature, req.top_p

    def sample(logprobs):
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(filter_logprobs(logprobs, top_p) * (1.0 / temp), key=sub)

    return sample


def _logprob_item(tokenizer, token: int, logprobs, top: int) -> dict:
    import mlx.core as mx

    text = tokenizer.decode([token])
    item = {"token": text, "logprob": float(logprobs[token].item()), "bytes": list(text.encode("utf-8"))}
    if top:
        ids = mx.argsort(-logprobs)[:top].tolist()
        vals = logprobs[mx.array(ids)].tolist()
        item["top_logprobs"] = [
            {"token": (t := tokenizer.decode([i])), "logprob": v, "bytes": list(t.encode("utf-8"))}
            for i, v in zip(ids, vals, strict=True)
        ]
    else:
        item["top_logprobs"] = []
    return item


class Engine:
    """The generation thread (see the module doc). `submit` never blocks on generation."""

    def __init__(
        self, catalog: Catalog, cache: ModelCache, limits: Limits, batch_size: int = 32, prefix_bytes: int = 256 << 20
    ):
        from mlxpt import _blas

        _blas.activate()
        # mlx-lm makes its generation stream at import; made on the engine thread, that stream's
        # worker is never joined and the process aborts at exit ("terminate called ...").
        import mlx_lm.generate  # noqa: F401

        self.catalog, self.cache, self.limits, self.batch_size = catalog, cache, limits, batch_size
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self._active = 0
        self._lock = threading.Lock()
        self._batches: dict[str, _Batch] = {}
        self.cancelled_rows = 0  # rows removed because their client went away
        self._prefixes: dict[str, object] = {}  # model name -> LRUPromptCache (outlives its batches)
        self.prefix_bytes = prefix_bytes
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the prefix cache
        self._thread = threading.Thread(target=self._loop, name="mlxpt-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; ApiError 429 (E909) when --max-streams requests are already running."""
        with self._lock:
            if self._active >= self.limits.max_streams:
                raise ApiError(
                    429, "E909", f"{self._active} requests are running, the limit is {self.limits.max_streams}",
                    None, "retry shortly, or start the server with a higher --max-streams",
                )  # fmt: skip
            self._active += 1
        self.inbox.put(job)

    def stop(self) -> None:
        self.inbox.put(None)
        self._thread.join(timeout=5)

    def _finish(self, job: Job, error: ApiError | None = None) -> None:
        if error is not None:
            job.events.put(("error", error))
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        }
        job.events.put(("done", usage))
        with self._lock:
            self._active -= 1

    def _loop(self) -> None:
        while True:
            busy = any(b.rows for b in self._batches.values())
            try:
                job = self.inbox.get(block=not busy)
                while True:
                    if job is None:
                        return
                    try:
                        self._start(job)
                    except Exception as e:  # noqa: BLE001 - one bad request never stops the engine
                        self._finish(job, ApiError(500, "E919", f"the request failed: {type(e).__name__}: {e}", None))
                    job = self.inbox.get_nowait()
            except queue.Empty:
                pass
            for name, batch in list(self._batches.items()):
                if batch.rows:
                    self._step(batch)
                if not batch.rows:
                    batch.gen.close()
                    del self._batches[name]

    def _start(self, job: Job) -> None:
        try:
            job.entry = self.catalog.find(job.req.model)
            model, tokenizer = self.cache.get(job.entry)
            tokens = self._prompt(job.req, tokenizer)
        except ApiError as e:
            return self._finish(job, e)
        except MlxptError as e:
            gone = job.entry is not None and job.entry.adapter is not None and not Path(job.entry.adapter).exists()
            if gone:  # a checkpoint rotated away between the lookup and the load: as if looked up after
                return self._finish(job, ApiError(404, "E904", f"no model {job.req.model!r} (it was just removed)",
                                                  "model", "GET /v1/models lists the names"))  # fmt: skip
            return self._finish(job, ApiError(400 if e.exit_code in (1, 5) else 500, "E914", e.line(), "model"))
        job.prompt_tokens = len(tokens)
        if job.cancelled.is_set():
            return self._finish(job)
        if not job.req.batched:
            return self._run_strategy(job, model, tokenizer, tokens)
        key = f"{job.entry.name}#{id(model)}"  # a name loaded again (new weights): another batch and prefix cache
        batch = self._batches.get(key)
        if batch is None:
            from mlx_lm.models.cache import LRUPromptCache

            batch = self._batches[key] = _Batch(model, tokenizer, self.batch_size)
            live = {f"{name}#{id(m)}" for name, m in self.cache.loaded()}
            for gone in set(self._prefixes) - live:  # its model left the cache, or was loaded again
                del self._prefixes[gone]
            if key not in self._prefixes:
                self._prefixes[key] = LRUPromptCache(max_size=64, max_bytes=self.prefix_bytes)
            batch.prefixes = self._prefixes[key]
        n = job.req.n
        uids = batch.insert(list(tokens), n, job.req.max_tokens, [_sampler(job.req, i) for i in range(n)])
        self.reused_tokens += batch.reused
        job.open_choices = n
        for i, uid in enumerate(uids):
            batch.rows[uid] = _Row(job, i, batch.tokenizer.detokenizer, job.req.stop)

    @staticmethod
    def _prompt(req: Request, tokenizer) -> list[int]:
        from mlxpt.decode.generate import chat_prompt

        tokens = chat_prompt(tokenizer, req.messages) if req.kind == "chat" else list(tokenizer.encode(req.prompt))
        if not tokens:
            raise ApiError(400, "E907", "the prompt is empty after tokenising", "prompt", "send a non-empty prompt")
        return tokens

    def _step(self, batch: _Batch) -> None:
        gone = [uid for uid, row in batch.rows.items() if row.job.cancelled.is_set()]
        if gone:
            batch.gen.remove(gone)
            self.cancelled_rows += len(gone)
            for uid in gone:
                self._close_row(batch, uid, "cancelled")
            if not batch.rows:
                return
        try:
            _, responses = batch.gen.next()
        except Exception as e:  # noqa: BLE001 - a failed step fails its rows (and the batch), never the server
            while batch.rows:  # each close also drops the other rows of its request
                uid = next(iter(batch.rows))
                self._close_row(batch, uid, "error", ApiError(500, "E919", f"generation failed: {e}", None))
            return
        for r in responses:
            row = batch.rows.get(r.uid)
            if row is None:
                continue
            try:
                self._advance(batch, r.uid, row, r)
            except Exception as e:  # noqa: BLE001 - fails this row's request, not the batch
                batch.gen.remove([r.uid])
                error = ApiError(500, "E919", f"generation failed: {type(e).__name__}: {e}", None)
                self._close_row(batch, r.uid, "error", error)

    def _advance(self, batch: _Batch, uid: int, row: _Row, r) -> None:
        req = row.job.req
        reason = r.finish_reason
        item = None
        if not (reason == "stop" and r.token in batch.stop_ids):
            row.detok.add_token(r.token)
            row.tokens += 1
            row.job.completion_tokens += 1
            if req.logprobs:
                item = _logprob_item(batch.tokenizer, r.token, r.logprobs, req.top_logprobs)
        if reason is not None:
            row.detok.finalize()
            batch.keep_prefix(r)
        text = row.detok.text
        cut = min((text.find(s) for s in row.stop if s in text[max(0, row.sent - len(s)) :]), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            if r.finish_reason is None:
                batch.gen.remove([uid])
        hold = 0 if reason is not None else max((len(s) - 1 for s in row.stop), default=0)
        upto = max(row.sent, len(text) - hold)
        if upto > row.sent or item is not None:
            row.job.events.put(("delta", row.index, text[row.sent : upto], item))
            row.sent = upto
        if reason is not None:
            self._close_row(batch, uid, reason)

    def _close_row(self, batch: _Batch, uid: int, reason: str, error: ApiError | None = None) -> None:
        row = batch.rows.pop(uid)
        job = row.job
        if reason not in ("cancelled", "error"):
            job.events.put(("finish", row.index, reason))
        job.open_choices -= 1
        if job.open_choices == 0 or error is not None:
            if error is not None:
                for other in [u for u, x in batch.rows.items() if x.job is job]:
                    batch.rows.pop(other)
                job.open_choices = 0
            self._finish(job, error)

    def _run_strategy(self, job: Job, model, tokenizer, tokens: list[int]) -> None:
        from mlxpt.decode.strategies import run_strategy

        def on_chunk(chunk) -> None:
            if chunk.text:
                job.events.put(("delta", 0, chunk.text, None))

        cfg = job.req.decode
        try:
            result = run_strategy(
                model, tokenizer, tokens, cfg, prompt=job.req.prompt or job.req.messages[-1]["content"],
                on_chunk=on_chunk if cfg.streamed else None, cancelled=job.cancelled.is_set,
            )  # fmt: skip
        except MlxptError as e:
            return self._finish(job, ApiError(400, "E912", e.line(), "mlxpt"))
        except Exception as e:  # noqa: BLE001 - a failed strategy fails its request, never the server
            return self._finish(job, ApiError(500, "E919", f"generation failed: {type(e).__name__}: {e}", None))
        job.completion_tokens = result.generated_tokens
        job.events.put(("strategy", result))
        self._finish(job)
