"""Compute-optimal test-time scaling (`--strategy auto --budget TOKENS`), after Snell et al. 2024:
per prompt, a cheap difficulty estimate, then the strategy and N with the highest expected
accuracy whose expected generated tokens fit the budget.

Difficulty. `probe` samples (default 2) are drawn first, in one batch. The bucket is how many of
them agree with the leading final answer, `m/k` (`0/k`: none gave an answer); the difficulty is
1 - m/k. The probe is the start of the sample pool: self-consistency@N and best-of-n@N read it and
draw only N - k more (none for N <= k); greedy, beam and every other registered strategy run on
their own after the probe, whose tokens count too.

The choice reads a calibration table that `mlxpt eval --calibrate OUT.json` writes on a
calibration set (never the test set): per bucket and cell (`strategy@N`), the accuracy and mean
generated tokens measured there, and the probe's mean tokens. The chooser takes the most accurate
cell whose expected tokens fit the budget, the cheaper on equal accuracy; when nothing fits, the
probe's own vote (no more tokens). Several tables of one model, adapter, probe and settings,
measured on separate calibration sets, pool into one (`--calibration A.json B.json`,
`merge_tables`), as if calibrated on the union of their sets. A bucket's accuracies are shrunk
toward the same cell's in the `all` row, as if the bucket had `SHRINK_PROMPTS` more prompts
scoring the overall rate (empirical Bayes): a bucket of 3 calibration prompts, where most cells
tie, then ranks its cells mostly by how they did overall instead of taking the cheapest of the
tie. A budget below the probe's mean cost skips the probe and chooses from the table's `all`
row. A table records the model (its resolved folder and a fingerprint of its files) and adapter
it was measured on and is refused for another.

Built-in rule (no table): all probe samples agree -> their answer, no more tokens; otherwise
self-consistency with the largest N whose expected tokens (the probe's mean sample length x N)
fit the budget.

Budget modes. `prompt` (the default): each prompt's expected tokens fit the budget. `mean`: the
budget is the mean over prompts, as in Snell et al.'s compute-optimal allocation. `plan` picks
one cell per difficulty bucket so that the table's expected accuracy, weighted by how many
calibration prompts fell in each bucket, is highest while the weighted expected tokens (probe
included) stay within the budget: easy prompts can stop at the probe and hard ones get more than
the budget. An exact multiple-choice knapsack over the buckets' cells, kept small by dropping
dominated partial plans. A bucket the table lacks is chosen for per prompt. Mean mode needs a table.

Simplifications: the budget is on expected tokens (the table's means), so a prompt, or in mean
mode a test set whose buckets are shared otherwise than the calibration set's, may spend more
than it; Snell et al. bin difficulty by verifier scores, not by sample agreement.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mlxpt.errors import ConfigError

KIND = "mlxpt-calibration"
VERSION = 1
DEFAULT_PROBE = 2
MAX_PROBE = 16
MAX_BUDGET = 10_000_000
POOLED = ("best-of-n", "self-consistency")  # cells that read the probe as the start of their pool
SKIPPED = ("auto", "adaptive", "sample")  # never chosen: auto itself, and cells the pool answers better
BUILTIN_MAX_N = 64
SHRINK_PROMPTS = 4  # pseudo-prompts of the `all` row's rate added to each bucket's (see the module doc)
BUDGET_MODES = ("prompt", "mean")  # what --budget bounds: each prompt's expected tokens, or their mean
MAX_N = 1024  # a cell's largest N: the largest `mlxpt eval --n` (evaluate.parse_ns)
WEIGHT_SAMPLES, WEIGHT_CHUNK = 64, 1 << 16  # a model's fingerprint reads 64 x 64 KiB of each weight file


@dataclass
class Cell:
    strategy: str
    n: int
    accuracy: float
    tokens: float  # mean generated tokens per prompt, run on its own (pooled: the pool's first N)

    @property
    def key(self) -> str:
        return f"{self.strategy}@{self.n}"


@dataclass
class Bucket:
    prompts: int
    probe_tokens: float  # mean tokens of the probe samples
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class CalibrationTable:
    probe: int
    buckets: dict[str, Bucket]  # "m/k" and "all"
    model: str
    adapter: str | None = None
    adapter_sha256: str | None = None
    data: dict = field(default_factory=dict)  # path, sha256, rows of the calibration set
    settings: dict = field(default_factory=dict)  # max_tokens, temperature, scorer, extract
    model_sha256: str | None = None  # the model's fingerprint (`model_fingerprint`); None: an older table

    def to_json(self) -> dict:
        return {"kind": KIND, "version": VERSION, **asdict(self)}


@dataclass
class Choice:
    strategy: str
    n: int
    accuracy: float  # expected (the table's), nan under the built-in rule
    tokens: float  # expected generated tokens, the probe included
    rule: str  # "table", "table-mean" (mean mode's plan) or "built-in"

    @property
    def key(self) -> str:
        return f"{self.strategy}@{self.n}"


# ---- difficulty -----------------------------------------------------------------------------


def agreement(answers: list[str | None]) -> tuple[str, float]:
    """(bucket "m/k", difficulty 1 - m/k): m samples give the most common answer (None abstains)."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    k, m = len(answers), max(counts.values(), default=0)
    return f"{m}/{k}", 1.0 - m / max(k, 1)


# ---- the chooser ----------------------------------------------------------------------------


def expected_tokens(cell: Cell, probe: int, spent: float, probe_mean: float) -> float:
    """Expected total tokens of `cell` after a probe that spent `spent` (its bucket's mean: probe_mean)."""
    if cell.strategy in POOLED:
        return spent + (max(0.0, cell.tokens - probe_mean) if cell.n > probe else 0.0)
    return spent + cell.tokens


def shrunk(table: CalibrationTable, bucket: str, cell: Cell) -> float:
    """`cell`'s accuracy in `bucket`, shrunk toward its `all`-row accuracy by SHRINK_PROMPTS
    pseudo-prompts (unchanged for the `all` row itself, or a cell the `all` row lacks)."""
    row, overall = table.buckets.get(bucket), table.buckets.get("all")
    prior = overall.cells.get(cell.key) if overall is not None and bucket != "all" else None
    if row is None or prior is None:
        return cell.accuracy
    return (row.prompts * cell.accuracy + SHRINK_PROMPTS * prior.accuracy) / (row.prompts + SHRINK_PROMPTS)


def choose(
    table: CalibrationTable, bucket: str, spent: float, budget: float, allowed: tuple[str, ...] | None = None
) -> Choice:
    """The most accurate cell of `bucket` (accuracy shrunk toward the `all` row's: `shrunk`)
    whose expected tokens fit `budget` (ties: the cheaper, then the first in the table); nothing
    fits: the probe's vote. Reads only the table."""
    probed = bucket != "all"  # an unseen bucket reads the `all` row, its probe still spent
    if bucket not in table.buckets:
        bucket = "all"
    row = table.buckets[bucket]
    fallback = Choice("self-consistency", table.probe, math.nan, spent, "table")
    cells = [c for c in row.cells.values() if c.strategy not in SKIPPED and (allowed is None or c.strategy in allowed)]
    best: Choice | None = None
    for cell in cells:
        cost = expected_tokens(cell, table.probe, spent, row.probe_tokens) if probed else cell.tokens
        if cost > budget:
            continue
        accuracy = shrunk(table, bucket, cell)
        if probed and cell.key == fallback.key:
            fallback.accuracy = accuracy
        c = Choice(cell.strategy, cell.n, accuracy, cost, "table")
        if best is None or (round(c.accuracy, 9), -c.tokens) > (round(best.accuracy, 9), -best.tokens):
            best = c
    if best is None:
        if not probed and cells:  # under the probe's cost and nothing fits: the cheapest cell
            cheapest = min(cells, key=lambda c: c.tokens)
            return Choice(cheapest.strategy, cheapest.n, cheapest.accuracy, cheapest.tokens, "table")
        if not probed:  # no cell auto may run: the probe's vote, drawn now
            return replace(fallback, tokens=row.probe_tokens)
        return fallback
    return best


def plan(table: CalibrationTable, budget: float, allowed: tuple[str, ...] | None = None) -> dict[str, Choice]:
    """Mean mode: one Choice per probed bucket of `table`, maximising the expected accuracy over
    the calibration prompts (each bucket weighted by its share of them) with the weighted mean of
    expected tokens, the probe included, at most `budget`. Exact: partial plans are merged bucket
    by bucket and any plan that costs more without being more accurate is dropped. Each bucket
    may always stop at the probe's vote. Empty when even the probes exceed the budget."""
    names = [b for b in table.buckets if b != "all"]
    total = sum(table.buckets[b].prompts for b in names)
    if not names or total <= 0:
        return {}
    frontier: list[tuple[float, float, dict]] = [(0.0, 0.0, {})]
    for name in names:
        row = table.buckets[name]
        w = row.prompts / total
        options = []
        for cell in row.cells.values():
            if cell.strategy in SKIPPED or (allowed is not None and cell.strategy not in allowed):
                continue
            cost = expected_tokens(cell, table.probe, row.probe_tokens, row.probe_tokens)
            options.append(Choice(cell.strategy, cell.n, shrunk(table, name, cell), cost, "table-mean"))
        vote_key = f"self-consistency@{table.probe}"
        if not any(o.key == vote_key for o in options):  # the probe's vote: no more tokens
            options.append(Choice("self-consistency", table.probe, 0.0, row.probe_tokens, "table-mean"))
        merged = [
            (cost + w * o.tokens, acc + w * o.accuracy, {**chosen, name: o})
            for cost, acc, chosen in frontier
            for o in options
            if cost + w * o.tokens <= budget + 1e-9
        ]
        merged.sort(key=lambda t: (t[0], -t[1]))
        frontier = []
        for t in merged:  # keep a plan only if it is more accurate than every cheaper one
            if not frontier or round(t[1], 12) > round(frontier[-1][1], 12):
                frontier.append(t)
        if not frontier:
            return {}
    return frontier[-1][2]


def builtin_choice(bucket: str, spent: float, probe: int, budget: float) -> Choice:
    """The documented rule without a table: agreement -> the probe's answer; otherwise
    self-consistency with the largest N whose expected tokens fit the budget."""
    m, k = (int(x) for x in bucket.split("/"))
    if m == k:
        return Choice("self-consistency", probe, math.nan, spent, "built-in")
    per_sample = max(1.0, spent / probe)
    n = probe + max(0, int((budget - spent) // per_sample))
    n = min(n, BUILTIN_MAX_N)
    return Choice("self-consistency", n, math.nan, spent + per_sample * (n - probe), "built-in")


# ---- running it -----------------------------------------------------------------------------


def run_auto(model, tokenizer, prompt_tokens, cfg, ctx, strategies: dict, drawer):
    """Probe, choose, run (see the module doc). `strategies` is the registry and `drawer` its
    sample drawer (strategies.py passes both, so this module does not import it)."""
    from mlxpt.rewards.extract import extract

    t0 = time.perf_counter()
    table = resolve_table(cfg.calibration)
    allowed = tuple(s for s in strategies if s not in SKIPPED)
    probe = table.probe if table else DEFAULT_PROBE
    probe_cfg = replace(cfg, strategy="sample", n=probe)
    pool: list = []
    bucket, difficulty, spent = None, None, 0
    planned = plan(table, cfg.budget, allowed) if table is not None and cfg.budget_mode == "mean" else {}
    if table is not None and cfg.budget < table.buckets["all"].probe_tokens and not planned:
        choice = choose(table, "all", 0, cfg.budget, allowed)
    else:
        pool = drawer(model, tokenizer, prompt_tokens, probe_cfg, ctx)(probe)
        bucket, difficulty = agreement([extract(c.text, cfg.extract) for c in pool])
        spent = sum(len(c.tokens) for c in pool)
        if bucket in planned:
            cell = table.buckets[bucket].cells.get(planned[bucket].key)
            extra = expected_tokens(cell, probe, spent, table.buckets[bucket].probe_tokens) if cell else spent
            choice = replace(planned[bucket], tokens=extra)
        elif table is not None:
            choice = choose(table, bucket, spent, cfg.budget, allowed)
        else:
            choice = builtin_choice(bucket, spent, probe, cfg.budget)
    run_cfg = replace(cfg, strategy=choice.strategy, n=choice.n)
    served = 0  # probe samples the chosen strategy read as its own (counted once)
    if choice.strategy in POOLED and pool:
        # the probe is the pool's start; later samples continue its random stream (no reseed)
        run_cfg = replace(run_cfg, sampling=replace(probe_cfg.sampling_settings(), seed=None))
        unread = list(pool)  # the drawer serves from this list and removes what it serves
        r = strategies[choice.strategy](model, tokenizer, prompt_tokens, run_cfg, replace(ctx, pool=unread))
        served = len(pool) - len(unread)
    else:
        r = strategies[choice.strategy](model, tokenizer, prompt_tokens, run_cfg, ctx)
    total = spent + r.generated_tokens - sum(len(c.tokens) for c in pool[:served])
    drawn = len(pool) + r.n_used - served  # every sample drawn for the prompt, the probe's included
    info = {
        "chose": choice.key, "strategy": choice.strategy, "n": choice.n, "rule": choice.rule,
        "bucket": bucket, "difficulty": difficulty, "probe": probe if pool else 0, "probe_tokens": spent,
        "budget": cfg.budget, "budget_mode": cfg.budget_mode, "expected_tokens": round(choice.tokens, 1),
        "expected_accuracy": None if math.isnan(choice.accuracy) else round(choice.accuracy, 4), "spent": total,
    }  # fmt: skip
    return replace(
        r, strategy="auto", n_used=drawn, generated_tokens=total, seconds=time.perf_counter() - t0, auto=info
    )


def describe(info: dict) -> str:
    """One line: what auto chose and why, and what it spent."""
    diff = "not estimated" if info.get("bucket") is None else f"{info['bucket']} agree"
    acc = info.get("expected_accuracy")
    exp = f", expected accuracy {acc * 100:.0f}%" if acc is not None else ""
    return (
        f"auto ({info['rule']}): {info['chose']} for difficulty {diff}{exp}; "
        f"{info['spent']} of {info['budget']} budget tokens (probe {info['probe_tokens']})"
    )


# ---- checks, reading and writing tables -----------------------------------------------------


def check_budget(budget, where: str = "--budget") -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_BUDGET:
        raise ConfigError(
            "E650", f"budget={budget!r} is out of range", where, f"use a whole number of tokens from 1 to {MAX_BUDGET}"
        )


def parse_budgets(text: str) -> tuple[int, ...]:
    """`200,400` -> (200, 400); ConfigError E650 otherwise."""
    try:
        budgets = tuple(sorted({int(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(
            "E650", f"--budget {text!r} is not a list of whole numbers", "--budget", "e.g. --budget 200,400,800"
        ) from None
    if not budgets:
        raise ConfigError("E650", "--budget is empty", "--budget", "e.g. --budget 400")
    for b in budgets:
        check_budget(b)
    return budgets


def check_budget_mode(mode, calibration) -> None:
    """E658: an unknown budget mode, or `mean` without a calibration table (its bucket shares)."""
    if mode not in BUDGET_MODES:
        raise ConfigError("E658", f"unknown budget mode {mode!r}", "--budget-mode", f"use {' or '.join(BUDGET_MODES)}")
    if mode == "mean" and calibration is None:
        raise ConfigError(
            "E658", "--budget-mode mean needs a calibration table (how prompts spread over difficulty)",
            "--budget-mode", "add --calibration TABLE (from mlxpt eval --calibrate), or use --budget-mode prompt",
        )  # fmt: skip


def check_probe(probe) -> None:
    if isinstance(probe, bool) or not isinstance(probe, int) or not 1 <= probe <= MAX_PROBE:
        raise ConfigError(
            "E655", f"probe={probe!r} is out of range", "--probe", f"use a whole number from 1 to {MAX_PROBE}"
        )


def check_auto(cfg) -> None:
    """ConfigError for auto settings a decode would reject: the budget, the table, the probe's temperature."""
    from mlxpt.decode.scorers import check_spec

    if cfg.budget is None:
        raise ConfigError("E651", "strategy auto needs a token budget", "--budget", "e.g. --budget 400")
    check_budget(cfg.budget)
    check_budget_mode(cfg.budget_mode, cfg.calibration)
    resolve_table(cfg.calibration)
    if cfg.sampling is not None and cfg.sampling.temperature == 0:
        raise ConfigError(
            "E655", "auto's probe samples need a temperature > 0", "--temperature", "use e.g. 0.7, or drop it"
        )
    if cfg.scorer is None or isinstance(cfg.scorer, str):
        check_spec(cfg.scorer)


def resolve_table(calibration) -> CalibrationTable | None:
    """A CalibrationTable from a table, a path or None (the built-in rule)."""
    if calibration is None or isinstance(calibration, CalibrationTable):
        return calibration
    return load_table(calibration)


def _malformed(path, what: str) -> ConfigError:
    return ConfigError(
        "E652",
        f"malformed calibration table: {what}",
        str(path),
        "write it again with `mlxpt eval --calibrate OUT.json`",
    )


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def table_paths(calibration) -> list[str]:
    """The table paths of a `--calibration` value: one path, or a list of them (pooled)."""
    if calibration is None:
        return []
    if isinstance(calibration, (list, tuple)):
        return [str(c) for c in calibration]
    return [str(calibration)]


def load_table(path, model: str | None = None, adapter: str | None = None) -> CalibrationTable:
    """Read and check a calibration table; with `model` (and `adapter`), refuse a table measured on
    another model or adapter (E653). E652 for a missing, unreadable or malformed file. A list of
    paths reads each and pools them (`merge_tables`)."""
    paths = table_paths(path)
    if len(paths) != 1:
        if not paths:
            raise ConfigError("E652", "no calibration table given", "--calibration", "give one or more table paths")
        seen = [Path(q).resolve() for q in paths]
        for i, q in enumerate(seen):
            if q in seen[:i]:
                raise ConfigError(
                    "E659", "calibration tables cannot be pooled: this table is given twice", paths[i],
                    "give each table once",
                )  # fmt: skip
        tables = [load_table(q) for q in paths]
        table = merge_tables(tables, paths)
        if model is not None:
            check_identity(table, ", ".join(paths), model, adapter)
        return table
    return _load_one(paths[0], model, adapter)


def merge_tables(tables: list[CalibrationTable], paths: list[str]) -> CalibrationTable:
    """One table from several measured on separate calibration sets with the same model, adapter,
    probe, settings and cells: each bucket's prompts add up and its cells' accuracies and tokens
    (and the probe's tokens) are the means over all of them, exactly what one calibration over the
    union of the sets writes. E659 when the tables cannot be pooled (the field is named)."""

    def refuse(i: int, what: str, fix: str) -> ConfigError:
        return ConfigError("E659", f"calibration tables cannot be pooled: {what}", paths[i], fix)

    first = tables[0]
    same_run = "calibrate each set with the same model, adapter, --probe, sampling flags and --strategies/--n"
    shas = {}
    for i, t in enumerate(tables):
        if t.probe != first.probe:
            raise refuse(i, f"probe {t.probe}, not {first.probe} as in {paths[0]}", same_run)
        same_model = (
            t.model_sha256 == first.model_sha256 if t.model_sha256 and first.model_sha256 else t.model == first.model
        )
        if not same_model or (t.adapter_sha256 or t.adapter) != (first.adapter_sha256 or first.adapter):
            raise refuse(i, f"measured on another model or adapter than {paths[0]}", same_run)
        for key in sorted(set(t.settings) & set(first.settings)):
            if t.settings[key] != first.settings[key]:
                raise refuse(
                    i, f"{key} {t.settings[key]!r}, not {first.settings[key]!r} as in {paths[0]}", same_run
                )  # fmt: skip
        if set(t.buckets["all"].cells) != set(first.buckets["all"].cells):
            odd = sorted(set(t.buckets["all"].cells) ^ set(first.buckets["all"].cells))
            raise refuse(i, f"cells {', '.join(odd)} are not in both it and {paths[0]}", same_run)
        for part in t.data.get("parts", [t.data]):
            sha = part.get("sha256")
            if sha and sha in shas:
                raise refuse(
                    i, f"measured on the same calibration set ({shas[sha][1]}) as {shas[sha][0]}",
                    "pool tables of separate calibration sets, each once",
                )  # fmt: skip
            if sha:
                shas[sha] = (paths[i], part.get("path"))
    buckets: dict[str, Bucket] = {}
    names = list(dict.fromkeys(name for t in tables for name in t.buckets))
    for name in sorted(names, key=lambda n: (n == "all", n)):
        rows = [t.buckets[name] for t in tables if name in t.buckets]
        total = sum(b.prompts for b in rows)
        w = [b.prompts / total if total else 1 / len(rows) for b in rows]
        cells = {}
        for key, c in rows[0].cells.items():
            got = [b.cells[key] for b in rows if key in b.cells]
            ws = [wi for wi, b in zip(w, rows, strict=True) if key in b.cells]
            norm = sum(ws) or 1.0
            acc = sum(wi * g.accuracy for wi, g in zip(ws, got, strict=True)) / norm
            tok = sum(wi * g.tokens for wi, g in zip(ws, got, strict=True)) / norm
            cells[key] = Cell(c.strategy, c.n, acc, tok)
        probe_tokens = sum(wi * b.probe_tokens for wi, b in zip(w, rows, strict=True))
        buckets[name] = Bucket(total, probe_tokens, cells)
    parts = [p for t in tables for p in t.data.get("parts", [t.data])]
    data = {"parts": parts, "rows": sum(p.get("rows") or 0 for p in parts)}
    settings = {k: v for t in reversed(tables) for k, v in t.settings.items()}
    fingerprint = first.model_sha256 if all(t.model_sha256 for t in tables) else None  # else: compared as typed
    return CalibrationTable(
        first.probe, buckets, first.model, first.adapter, first.adapter_sha256, data, settings, fingerprint
    )  # fmt: skip


def _load_one(path, model: str | None = None, adapter: str | None = None) -> CalibrationTable:
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            "E652", "calibration table not found", str(path), "write one with `mlxpt eval --calibrate OUT.json`"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise _malformed(path, f"not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise _malformed(path, f"not a {KIND} file")
    if obj.get("version") != VERSION:
        raise _malformed(path, f"version {obj.get('version')!r}, expected {VERSION}")
    probe = obj.get("probe")
    if not _whole(probe) or not 1 <= probe <= MAX_PROBE:
        raise _malformed(path, f"probe={probe!r}")
    if not isinstance(obj.get("model"), str) or not isinstance(obj.get("buckets"), dict):
        raise _malformed(path, "no `model` or `buckets`")
    for key in ("model_sha256", "adapter", "adapter_sha256"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise _malformed(path, f"`{key}` is not a string")
    buckets = {name: _bucket(path, name, b) for name, b in obj["buckets"].items()}
    if "all" not in buckets:
        raise _malformed(path, "no `all` bucket")
    data = obj.get("data")
    if data is None:
        data = {}
    _check_data(path, data)
    table = CalibrationTable(
        probe, buckets, obj["model"], obj.get("adapter"), obj.get("adapter_sha256"), data,
        obj.get("settings") if isinstance(obj.get("settings"), dict) else {}, obj.get("model_sha256"),
    )  # fmt: skip
    if model is not None:
        check_identity(table, path, model, adapter)
    return table


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# what a table's cells may hold: options.STRATEGY_NAMES but auto (options imports this module, so
# the names are spelled here; tests/test_budget.py checks they agree)
CELL_STRATEGIES = ("greedy", "sample", "best-of-n", "self-consistency", "beam", "step-beam", "tree")


def _bucket(path, name: str, b) -> Bucket:
    """One bucket of a table file, every field checked (E652 names the first bad one)."""
    m, _, k = name.partition("/")
    if name != "all" and not (m.isdigit() and k.isdigit() and int(m) <= int(k)):
        raise _malformed(path, f"bucket {name!r} is not `all` or m/k (m of k probe samples agreeing)")
    if not isinstance(b, dict) or not isinstance(b.get("cells"), dict) or not b["cells"]:
        raise _malformed(path, f"bucket {name!r} has no cells")
    if not _number(b.get("probe_tokens")):
        raise _malformed(path, f"bucket {name!r}: probe_tokens={b.get('probe_tokens')!r}, not a number >= 0")
    if not _whole(b.get("prompts")) or b["prompts"] < 0:
        raise _malformed(path, f"bucket {name!r}: prompts={b.get('prompts')!r}, not a whole number >= 0")
    cells = {}
    for key, c in b["cells"].items():
        where = f"cell {name}/{key}"
        if not isinstance(c, dict):
            raise _malformed(path, f"{where} is not an object")
        if c.get("strategy") not in CELL_STRATEGIES:  # a table never holds auto
            raise _malformed(path, f"{where}: strategy={c.get('strategy')!r}, not one auto can run")
        if not _whole(c.get("n")) or not 1 <= c["n"] <= MAX_N:
            raise _malformed(path, f"{where}: n={c.get('n')!r}, not a whole number from 1 to {MAX_N}")
        if key != f"{c['strategy']}@{c['n']}":
            raise _malformed(path, f"{where}: the key is not its strategy@n ({c['strategy']}@{c['n']})")
        if not _number(c.get("accuracy")) or c["accuracy"] > 1:
            raise _malformed(path, f"{where}: accuracy={c.get('accuracy')!r}, not in [0, 1]")
        if not _number(c.get("tokens")):
            raise _malformed(path, f"{where}: tokens={c.get('tokens')!r}, not a number >= 0")
        cells[key] = Cell(c["strategy"], c["n"], float(c["accuracy"]), float(c["tokens"]))
    return Bucket(b["prompts"], float(b["probe_tokens"]), cells)


def _check_data(path, data) -> None:
    """E652 unless `data` is {path, sha256, rows} of one calibration set, or {parts: [those], rows}."""
    if not isinstance(data, dict) or not isinstance(data.get("parts", []), list):
        raise _malformed(path, "`data` is not an object with a list of `parts`")
    for where, part in [("data", data), *((f"data.parts[{i}]", q) for i, q in enumerate(data.get("parts", [])))]:
        if not isinstance(part, dict):
            raise _malformed(path, f"{where} is not an object")
        for key in ("path", "sha256"):
            if part.get(key) is not None and not isinstance(part[key], str):
                raise _malformed(path, f"{where}.{key} is not a string")
        if part.get("rows") is not None and (not _whole(part["rows"]) or part["rows"] < 0):
            raise _malformed(path, f"{where}.rows is not a whole number >= 0")


def identity(model: str | None, adapter: str | None, resolve: bool = True) -> dict:
    """What a table is measured on: the model's resolved folder and fingerprint (`model_fingerprint`),
    the adapter folder and its weights' sha256. `resolve=False`: the model reference as typed, as
    tables written before the fingerprint recorded it."""
    from mlxpt.config import DEFAULT_MODEL

    ref = str(model or DEFAULT_MODEL)
    folder, fingerprint = model_fingerprint(ref) if resolve else (ref, None)
    out: dict = {"model": folder, "model_sha256": fingerprint, "adapter": None, "adapter_sha256": None}
    if adapter:
        from mlxpt.models.adapters import ADAPTER_FILE, find_adapter
        from mlxpt.runs.atomic import sha256_file

        folder = find_adapter(adapter)
        out["adapter"] = str(folder.resolve())
        out["adapter_sha256"] = sha256_file(folder / ADAPTER_FILE)
    return out


def model_fingerprint(ref: str) -> tuple[str, str]:
    """(resolved folder, fingerprint) of a model reference: `prm.model_identity`'s (the folder an
    alias, hub id, path or run resolves to; config.json and the weight files' names and sizes),
    hashed with WEIGHT_SAMPLES evenly spaced chunks of each weight file (all of a small one), so
    a model with other weights of the same shapes (another seed, a full fine-tune) is another
    model, and a copy of the same model in another folder the same one."""
    from mlxpt.decode.prm import model_identity

    folder, shapes = model_identity(ref)
    h = hashlib.sha256(shapes.encode())
    for w in sorted(Path(folder).glob("*.safetensors")):
        try:
            size = w.stat().st_size
            with w.open("rb") as f:
                if size <= WEIGHT_SAMPLES * WEIGHT_CHUNK:
                    h.update(f.read())
                    continue
                for i in range(WEIGHT_SAMPLES):
                    f.seek(i * (size - WEIGHT_CHUNK) // (WEIGHT_SAMPLES - 1))
                    h.update(f.read(WEIGHT_CHUNK))
        except OSError:  # unreadable weights: the model's load says why
            h.update(w.name.encode())
    return folder, h.hexdigest()


def check_identity(table: CalibrationTable, path, model: str | None, adapter: str | None) -> None:
    """E653 when `table` was measured on another model or adapter than (model, adapter): the
    model's fingerprint decides, or for a table written before it was recorded, the model
    reference as typed."""
    want = identity(model, adapter, resolve=table.model_sha256 is not None)
    same_model = (
        table.model_sha256 == want["model_sha256"] if table.model_sha256 is not None else table.model == want["model"]
    )
    same_adapter = (
        table.adapter_sha256 == want["adapter_sha256"]
        if table.adapter_sha256 and want["adapter_sha256"]
        else table.adapter == want["adapter"]
    )
    if not same_model or not same_adapter:
        made = f"{table.model}" + (f" + adapter {table.adapter}" if table.adapter else "")
        now = f"{want['model']}" + (f" + adapter {want['adapter']}" if want["adapter"] else "")
        if made == now:
            now += " (its files have changed since)"
        fix = "calibrate this model: mlxpt eval --calibrate OUT.json with the same --model/--adapter"
        if table.model_sha256 is None:
            fix += " (this older table matches only the --model text it was made with)"
        raise ConfigError("E653", f"calibration table was made for {made}, not {now}", str(path), fix)


def check_not_test_set(table: CalibrationTable, path, data_paths: list) -> None:
    """E656 when the table was measured on one of the data sets being evaluated."""
    from mlxpt.runs.atomic import sha256_file

    shas = {part.get("sha256") for part in table.data.get("parts", [table.data])} - {None}
    for d in data_paths:
        if shas and Path(d).is_file() and sha256_file(d) in shas:
            raise ConfigError(
                "E656", f"the calibration table was measured on the evaluated data {d}", str(path),
                "calibrate on a separate set (e.g. the validation split), never the test set",
            )  # fmt: skip


def build_table(
    details: list[dict], probe: int, who: dict, data: dict, settings: dict, extract_how: str = "auto"
) -> CalibrationTable:
    """The calibration table of `mlxpt eval` per-prompt records (`evaluate(..., details)` in the
    pooled mode): each prompt's bucket from its pool's first `probe` answers, then per bucket and
    cell the accuracy and mean tokens. The probe's own vote is always a cell."""
    from mlxpt.decode.votes import vote
    from mlxpt.rewards.extract import same_answer

    per: dict[str, list[dict]] = {}
    for rec in details:
        pool = rec.get("pool")
        if not pool or len(pool["answers"]) < probe:
            raise ConfigError(
                "E654", f"calibration needs a pool of at least {probe} samples per prompt", "--calibrate",
                f"add self-consistency or best-of-n to --strategies with an --n of {probe} or more",
            )  # fmt: skip
        bucket, _ = agreement(pool["answers"][:probe])
        own = vote(pool["answers"][:probe]).answer
        cells = {
            key: (bool(rec["answers"][key][1]), rec["tokens"][key])
            for key in rec["answers"]
            if key.split("@")[0] not in ("auto", "adaptive") and key in rec.get("tokens", {})
        }
        cells[f"self-consistency@{probe}"] = (same_answer(own, rec["gold"]), sum(pool["tokens"][:probe]))
        row = {"probe_tokens": sum(pool["tokens"][:probe]), "cells": cells}
        per.setdefault(bucket, []).append(row)
        per.setdefault("all", []).append(row)
    buckets = {}
    for name, rows in sorted(per.items()):
        keys = list(dict.fromkeys(k for r in rows for k in r["cells"]))
        cells = {}
        for key in keys:
            got = [r["cells"][key] for r in rows if key in r["cells"]]
            s, n = key.rsplit("@", 1)
            cells[key] = Cell(s, int(n), sum(ok for ok, _ in got) / len(got), sum(t for _, t in got) / len(got))
        buckets[name] = Bucket(len(rows), sum(r["probe_tokens"] for r in rows) / len(rows), cells)
    return CalibrationTable(
        probe, buckets, who["model"], who["adapter"], who["adapter_sha256"], data, settings, who.get("model_sha256")
    )


def table_text(table: CalibrationTable) -> str:
    """The table for the terminal: one line per bucket and cell."""
    head = f"{'bucket':<7} {'prompts':>7} {'cell':<24} {'accuracy':>9} {'tok/prompt':>11}"
    lines = [head, "-" * len(head)]
    for name, b in table.buckets.items():
        for c in sorted(b.cells.values(), key=lambda c: c.tokens):
            lines.append(f"{name:<7} {b.prompts:>7} {c.key:<24} {c.accuracy * 100:>8.1f}% {c.tokens:>11.1f}")
    return "\n".join(lines)
