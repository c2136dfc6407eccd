"""`mlxpt eval` as a library: accuracy of decoding strategies on verifiable prompts, per sample budget.

Rows are JSONL with a gold `answer` and a prompt: `messages` (chat; trailing assistant turns are
dropped, so the bundled SFT test file works as is) or `prompt` (a string or a message list).
Every row is read and checked before a model loads.

How N is measured. By default (`pooled`) each prompt gets one batched group of max(N) samples
(prompt prefilled once), and every sampled strategy at every N reads a prefix of that pool:
self-consistency@n votes over the first n samples, best-of-n@n takes the best-scored of the first
n, adaptive self-consistency stops on the pool in batches of `batch` (same rule as
`run_strategy(..., adaptive=True)`), `sample` is the first sample. This is the standard way to
draw accuracy-vs-N curves, and it compares strategies on the same samples. The pool's wall time
is split over the strategies by the share of generated tokens they read (`seconds_estimated`).
With `independent=True` every (strategy, N) runs `run_strategy` on its own, with its own timing.
Greedy, beam and every other registered strategy (`auto`, and any added to
strategies.STRATEGIES) always run on their own, through `run_strategy`.

Every result has the mean generated tokens per prompt next to its accuracy, so each strategy
draws an accuracy-vs-generated-tokens curve as well as an accuracy-vs-N one. `auto` (budget.py)
runs once per token budget in `budgets`; its cells are (auto, budget).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.decode.options import DEFAULT_TEMPERATURE, STEP_STRATEGIES, DecodeConfig, SearchConfig, reads_scorer
from mlxpt.decode.strategies import STRATEGIES
from mlxpt.errors import ConfigError, DataError

POOLED = ("sample", "best-of-n", "self-consistency", "adaptive")
# the registry's strategies, with adaptive self-consistency as one more: new ones appear here
EVAL_STRATEGIES = tuple(dict.fromkeys(("greedy", "sample", "best-of-n", "self-consistency", "adaptive", *STRATEGIES)))


@dataclass
class EvalConfig:
    data: str = "assets/sft/test.jsonl"  # JSONL with `answer` and `messages` or `prompt`
    strategies: tuple[str, ...] = ("greedy", "best-of-n", "self-consistency")  # also sample, adaptive, beam
    ns: tuple[int, ...] = (1, 2, 4, 8, 16)  # sample budgets (beam: widths; adaptive: the budget is max N)
    max_tokens: int = 96  # per sample
    temperature: float = DEFAULT_TEMPERATURE  # for sampled strategies
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0  # prompt i samples with seed + i, so results do not depend on the order run
    scorer: str = "logprob"  # best-of-n scorer spec (scorers.py)
    extract: str = "auto"  # answer extractor (extract.py)
    weighting: str = "none"  # self-consistency vote weights: none | logprob | reward
    batch: int = 4  # adaptive: samples drawn between stopping checks
    confidence: float | None = 0.95  # adaptive: Beta-rule threshold (None: stop only when safe)
    limit: int | None = None  # evaluate the first N rows only
    independent: bool = False  # run each (strategy, N) on its own instead of sharing a pool
    greedy_batch: int = 16  # greedy alone: prompts decoded together (1: one by one, streamed)
    budgets: tuple[int, ...] = ()  # auto: generated-token budgets per prompt, one cell each
    calibration: object = None  # auto: table path(s; several are pooled) or a budget.CalibrationTable
    probe: int = 2  # --calibrate: probe samples that bucket a prompt's difficulty (budget.py)
    budget_mode: str = "prompt"  # auto: --budget bounds each prompt's expected tokens, or (mean) their mean
    search: SearchConfig = field(default_factory=SearchConfig)  # step-beam / tree (N: the beam width)


@dataclass
class Row:
    prompt: object  # str or message list, as in the file
    messages: list[dict]
    answer: str
    line: int
    fields: dict = field(default_factory=dict)


def _prompt_messages(obj: dict) -> list[dict] | None:
    msgs = obj.get("messages")
    if msgs is None:
        p = obj.get("prompt")
        if isinstance(p, str):
            return [{"role": "user", "content": p}] if p.strip() else None
        msgs = p
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        return None
    msgs = list(msgs)
    while msgs and msgs[-1].get("role") == "assistant":
        msgs.pop()
    if not msgs or msgs[-1].get("role") != "user" or not isinstance(msgs[-1].get("content"), str):
        return None
    if not msgs[-1]["content"].strip():  # as a blank `prompt` string is
        return None
    return [{"role": m.get("role"), "content": m.get("content")} for m in msgs]


def read_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """Every row of an eval file, checked; DataError E623 (file) / E624 (rows, one line each)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("E623", "eval data file not found", str(path), "pass a .jsonl file with `answer` fields")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            "E623", f"cannot read the eval data ({type(e).__name__})", str(path), "use UTF-8 JSONL"
        ) from None
    rows: list[Row] = []
    errors: list[DataError] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(DataError("E624", f"not valid JSON ({e.msg})", where, "one JSON object per line"))
            continue
        except RecursionError:
            errors.append(DataError("E624", "not valid JSON (nested too deeply)", where, "one JSON object per line"))
            continue
        if not isinstance(obj, dict):
            errors.append(DataError("E624", "a row must be a JSON object", where))
            continue
        answer = obj.get("answer")
        if answer is None or isinstance(answer, (dict, list)):
            errors.append(DataError("E624", "row has no `answer`", where, 'add "answer": "<gold final answer>"'))
            continue
        if isinstance(answer, bool) or (isinstance(answer, str) and not answer.strip()):
            # once scored: an empty gold answer matches nothing, so the row counted wrong for every model
            errors.append(DataError("E624", f"`answer` is {answer!r}", where, 'give the gold final answer, e.g. "42"'))
            continue
        msgs = _prompt_messages(obj)
        if msgs is None:
            errors.append(
                DataError("E624", "row has no prompt ending in a user turn", where, "give `messages` or `prompt`")
            )
            continue
        extra = {k: v for k, v in obj.items() if k not in ("messages", "prompt")}
        rows.append(Row(obj.get("prompt", msgs), msgs, str(obj["answer"]), i, extra))
    if errors:
        raise DataError(errors[0].code, errors[0].what, errors[0].where, errors[0].hint, errors=errors)
    if not rows:
        raise DataError("E623", "the eval data has no rows", str(path), "add rows with `answer`")
    return rows[:limit] if limit else rows


def parse_ns(text: str) -> tuple[int, ...]:
    """`1,2,4,8` -> (1, 2, 4, 8); ConfigError E621 otherwise."""
    try:
        ns = tuple(sorted({int(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(
            "E621", f"--n {text!r} is not a list of whole numbers", "--n", "e.g. --n 1,2,4,8,16"
        ) from None
    if not ns or ns[0] < 1 or ns[-1] > 1024:
        raise ConfigError("E621", f"--n {text!r} is out of range", "--n", "use whole numbers from 1 to 1024")
    return ns


def check_config(cfg: EvalConfig) -> None:
    """Everything that can be checked before a model loads."""
    from mlxpt.decode.options import check_strategy
    from mlxpt.decode.sampling import validate_sampling
    from mlxpt.decode.scorers import check_spec
    from mlxpt.rewards.extract import check_method

    if not cfg.strategies:
        raise ConfigError("E620", "no strategy given", "--strategies", f"use {','.join(EVAL_STRATEGIES)}")
    for s in cfg.strategies:
        if s not in EVAL_STRATEGIES:
            raise ConfigError("E620", f"unknown strategy {s!r}", "--strategies", f"use {', '.join(EVAL_STRATEGIES)}")
    for n in cfg.ns:
        check_strategy("self-consistency", n, cfg.weighting, cfg.batch, cfg.confidence)
    if cfg.max_tokens < 1:
        raise ConfigError("E604", f"max-tokens={cfg.max_tokens} is out of range", "--max-tokens", "use >= 1")
    validate_sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.seed)
    if cfg.temperature == 0 and any(s in POOLED for s in cfg.strategies if s != "sample"):
        raise ConfigError(
            "E626", "temperature 0 makes every sample the same", "--temperature", "use e.g. 0.7 for sampled strategies"
        )
    check_method(cfg.extract)
    from mlxpt.decode.options import check_search

    for s in cfg.strategies:
        if s in STEP_STRATEGIES:
            check_search(cfg.search, s, cfg.temperature)
    if reads_scorer(cfg.strategies, cfg.weighting):
        check_spec(cfg.scorer)
    if any(s in STEP_STRATEGIES for s in cfg.strategies):
        from mlxpt.decode.scorers import search_delimiter

        search_delimiter(cfg.scorer, cfg.search.delimiter)  # E638: not the PRM's (its config read, nothing loads)
    from mlxpt.decode.budget import check_budget, check_budget_mode, check_probe, resolve_table

    if ("auto" in cfg.strategies) != bool(cfg.budgets):
        raise ConfigError(
            "E651", "--strategies auto and --budget go together", "--budget",
            "give both (e.g. --strategies greedy,auto --budget 400), or neither",
        )  # fmt: skip
    for b in cfg.budgets:
        check_budget(b)
    if cfg.budgets:
        check_budget_mode(cfg.budget_mode, cfg.calibration)
    elif cfg.budget_mode != "prompt":
        raise ConfigError(
            "E658", f"--budget-mode {cfg.budget_mode} without auto", "--budget-mode",
            "add --strategies ...,auto --budget TOKENS --calibration TABLE, or drop --budget-mode",
        )  # fmt: skip
    if cfg.calibration is not None and "auto" not in cfg.strategies:  # once read by nothing, checked by nothing
        raise ConfigError(
            "E651", "--calibration without auto: only auto reads a calibration table", "--calibration",
            "add auto to --strategies (with --budget), or drop --calibration",
        )  # fmt: skip
    check_probe(cfg.probe)
    resolve_table(cfg.calibration)
    if "auto" in cfg.strategies and cfg.temperature == 0:
        raise ConfigError(
            "E655", "auto's probe samples need a temperature > 0", "--temperature", "use e.g. 0.7 with auto"
        )


@dataclass
class _Tally:
    correct: int = 0
    total: int = 0
    tokens: int = 0
    seconds: float = 0.0
    samples: int = 0
    estimated: bool = False
    choices: dict = field(default_factory=dict)  # auto: chosen cell -> prompts

    def chose(self, cell: str) -> None:
        self.choices[cell] = self.choices.get(cell, 0) + 1

    def add(self, ok: bool, tokens: int, seconds: float, samples: int, estimated: bool = False) -> None:
        self.correct += bool(ok)
        self.total += 1
        self.tokens += tokens
        self.seconds += seconds
        self.samples += samples
        self.estimated |= estimated


def _cells(cfg: EvalConfig) -> list[tuple[str, int]]:
    cells = []
    for s in cfg.strategies:
        if s in ("greedy", "sample"):
            cells.append((s, 1))
        elif s == "adaptive":
            cells.append((s, max(cfg.ns)))
        elif s == "auto":
            cells += [(s, b) for b in cfg.budgets]
        else:
            cells += [(s, n) for n in cfg.ns]
    return cells


def evaluate(
    model,
    tokenizer,
    rows: list[Row],
    cfg: EvalConfig,
    progress: Callable[[int, int], None] | None = None,
    details: list | None = None,
) -> list[dict]:
    """One result dict per (strategy, N) for this model: accuracy, tokens, seconds, samples.

    With a `details` list, one record per prompt is appended to it: the gold answer, each
    strategy's answer and, for the shared pool, every sample's answer, length and text."""
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.decode.sampling import SamplingConfig

    cells = _cells(cfg)
    if cells == [("greedy", 1)] and cfg.greedy_batch > 1:
        return _greedy_batched(model, tokenizer, rows, cfg, progress, details)
    tallies = {c: _Tally() for c in cells}
    scorer = None
    if reads_scorer(cfg.strategies, cfg.weighting):
        from mlxpt.decode.scorers import make_scorer

        scorer = make_scorer(cfg.scorer, model, tokenizer)
    if "auto" in cfg.strategies:
        from dataclasses import replace

        from mlxpt.decode.budget import resolve_table

        cfg = replace(cfg, calibration=resolve_table(cfg.calibration))  # read once, not per prompt
    for i, row in enumerate(rows):
        ids = chat_prompt(tokenizer, row.messages)
        sampling = SamplingConfig(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.seed + i)
        fields = {**row.fields, "answer": row.answer}
        record: dict = {"line": row.line, "gold": row.answer, "answers": {}, "tokens": {}}
        for cell, (ok, tokens, seconds, samples, est) in _run_row(
            model, tokenizer, ids, row, fields, cfg, cells, sampling, scorer, record
        ):
            tallies[cell].add(ok, tokens, seconds, samples, est)
            if "_auto" in record:
                tallies[cell].chose(record["_auto"]["chose"])
                record.setdefault("auto", {})[f"{cell[0]}@{cell[1]}"] = {**record.pop("_auto"), "correct": bool(ok)}
            record["answers"][f"{cell[0]}@{cell[1]}"] = [record.pop("_answer", None), bool(ok)]
            record["tokens"][f"{cell[0]}@{cell[1]}"] = tokens
        if details is not None:
            details.append(record)
        if progress is not None:
            progress(i + 1, len(rows))
    return _results(tallies)


def _greedy_batched(model, tokenizer, rows: list[Row], cfg: EvalConfig, progress, details) -> list[dict]:
    """Greedy alone: `cfg.greedy_batch` prompts decoded together (decode/batch.generate_many), as
    the forgetting monitor and `make run` score; the same answers as one by one up to ties that
    batched float arithmetic may break otherwise."""
    from mlxpt.decode.batch import generate_many
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.rewards.extract import extract, same_answer

    tally = _Tally()
    for s in range(0, len(rows), cfg.greedy_batch):
        part = rows[s : s + cfg.greedy_batch]
        t0 = time.perf_counter()
        completions = generate_many(
            model, tokenizer, [chat_prompt(tokenizer, r.messages) for r in part], cfg.max_tokens
        )
        seconds = (time.perf_counter() - t0) / max(1, len(part))
        for row, c in zip(part, completions, strict=True):
            answer = extract(c.text, cfg.extract)
            ok = same_answer(answer, row.answer)
            tally.add(ok, len(c.tokens), seconds, 1)
            if details is not None:
                details.append({"line": row.line, "gold": row.answer, "answers": {"greedy@1": [answer, bool(ok)]},
                                "tokens": {"greedy@1": len(c.tokens)}, "text": c.text})  # fmt: skip
        if progress is not None:
            progress(min(len(rows), s + len(part)), len(rows))
    return _results({("greedy", 1): tally})


def _results(tallies: dict) -> list[dict]:
    out = []
    for (s, n), t in tallies.items():
        out.append(
            {
                "strategy": s,
                "n": n,
                "accuracy": t.correct / t.total if t.total else 0.0,
                "correct": t.correct,
                "total": t.total,
                "generated_tokens": t.tokens,
                "mean_tokens": t.tokens / t.total if t.total else 0.0,
                "seconds": round(t.seconds, 3),
                "seconds_estimated": t.estimated,
                "mean_samples": t.samples / t.total if t.total else 0.0,
                **({"budget": n, "choices": dict(sorted(t.choices.items()))} if s == "auto" else {}),
            }
        )
    return out


def decode_config(cfg: EvalConfig, strategy: str, n: int, sampling, scorer=None) -> DecodeConfig:
    """The DecodeConfig of one (strategy, N) cell; `adaptive` is self-consistency with early stopping;
    for `auto`, N is the token budget."""
    auto = strategy == "auto"
    return DecodeConfig(
        "self-consistency" if strategy == "adaptive" else strategy, 1 if auto else n, cfg.max_tokens, sampling,
        scorer, cfg.extract, cfg.weighting, strategy == "adaptive", cfg.batch, cfg.confidence,
        budget=n if auto else None, calibration=cfg.calibration if auto else None, search=cfg.search,
        budget_mode=cfg.budget_mode,
    )  # fmt: skip


def _run_row(model, tokenizer, ids, row, fields, cfg, cells, sampling, scorer, record: dict) -> Iterator:
    """(cell, (correct, tokens, seconds, samples used, seconds estimated?)) for one prompt;
    each cell's answer is left in record["_answer"], the pool in record["pool"]."""
    from mlxpt.decode.strategies import DecodeContext, drawer, run_strategy
    from mlxpt.rewards.extract import extract, same_answer

    def ok(text_answer):
        return same_answer(text_answer, row.answer)

    for s, n in cells:
        if s not in POOLED or cfg.independent:
            r = run_strategy(
                model, tokenizer, ids, decode_config(cfg, s, n, sampling, scorer), prompt=row.prompt, row=fields
            )
            record["_answer"] = r.answer
            if r.auto is not None:
                record["_auto"] = r.auto
            yield (s, n), (ok(r.answer), r.generated_tokens, r.seconds, r.n_used, False)
    pooled = [c for c in cells if c[0] in POOLED]
    if cfg.independent or not pooled:
        return
    from mlxpt.decode.votes import adaptive_schedule, vote, vote_weights

    size = max(n for _, n in pooled)
    t0 = time.perf_counter()
    pool = drawer(model, tokenizer, ids, decode_config(cfg, "sample", size, sampling), DecodeContext())(size)
    pool_s = time.perf_counter() - t0
    answers = [extract(c.text, cfg.extract) for c in pool]
    lengths = [len(c.tokens) for c in pool]
    record["pool"] = {"answers": answers, "tokens": lengths, "seconds": pool_s, "texts": [c.text for c in pool]}
    total_tokens = max(1, sum(lengths))
    scores, score_s = None, 0.0
    if any(s == "best-of-n" for s, _ in pooled) or cfg.weighting == "reward":
        t1 = time.perf_counter()
        scores = scorer(row.prompt, pool, fields)
        score_s = time.perf_counter() - t1
        record["pool"]["scores"] = [s if math.isfinite(s) else None for s in scores]
    weights = vote_weights(cfg.weighting, pool, scores)

    def cost(k: int, scored: bool = False) -> tuple[int, float]:
        tokens = sum(lengths[:k])
        return tokens, pool_s * tokens / total_tokens + (score_s * k / size if scored else 0.0)

    for s, n in pooled:
        if s == "sample":
            record["_answer"] = answers[0]
            yield (s, n), (ok(answers[0]), *cost(1), 1, True)
        elif s == "best-of-n":
            best = max(range(n), key=lambda j: (scores[j], pool[j].mean_logprob, -j))  # as best_of_n
            record["_answer"] = answers[best]
            yield (s, n), (ok(answers[best]), *cost(n, True), n, True)
        elif s == "self-consistency":
            v = vote(answers[:n], None if weights is None else weights[:n])
            record["_answer"] = v.answer
            yield (s, n), (ok(v.answer), *cost(n, cfg.weighting == "reward"), n, True)
        else:  # adaptive
            used = adaptive_schedule(answers, n, cfg.batch, cfg.confidence)
            v = vote(answers[:used], None if weights is None else weights[:used])
            record["_answer"] = v.answer
            yield (s, n), (ok(v.answer), *cost(used, cfg.weighting == "reward"), used, True)
