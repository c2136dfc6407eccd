"""Score decoding strategies (greedy, best-of-N, self-consistency, ...) by accuracy per number of
samples on a JSONL set with known answers.

Prints a table and two charts, accuracy vs samples and accuracy vs generated tokens per prompt,
and writes the results (JSON) and both charts (PNG: `--plot` and `<plot>-tokens.png`).
`--strategies ...,auto --budget 200,400` adds compute-optimal scaling at those per-prompt token
budgets (`--calibration TABLE`, else a built-in rule); `--calibrate OUT.json` writes such a table
from this evaluation (on a calibration set, not the test set).
`--compare RUN` scores the base model and the run's adapter in one command. Give `--data` several
times (e.g. the held-out test split and an out-of-distribution split) to score every set and put
them side by side. The TUI's Eval screen runs the same evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mlxpt.errors import ConfigError, MlxptError, ResourceError


def register(subparsers) -> None:
    from mlxpt.commands.generate import add_extract_arg, add_model_args, add_search_args
    from mlxpt.decode.evaluate import EVAL_STRATEGIES, EvalConfig

    d = EvalConfig()
    p = subparsers.add_parser(
        "eval", help="accuracy of decoding strategies vs samples, base vs adapter", description=__doc__
    )
    add_model_args(p)
    p.add_argument("--compare", metavar="RUN", default=None, help="also evaluate this run's adapter (base vs tuned)")
    p.add_argument(
        "--data",
        action="append",
        default=None,
        help=f"JSONL with `answer` and `messages` or `prompt`; repeat to compare sets (default: {d.data})",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument(
        "--strategies",
        default=",".join(d.strategies),
        help=f"comma list of {', '.join(EVAL_STRATEGIES)} (adaptive: self-consistency with early stopping)",
    )
    p.add_argument("--n", default="1,2,4,8,16", help="sample budgets, comma list (beam: widths)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens per sample")
    p.add_argument("--temperature", type=float, default=d.temperature, help="for sampled strategies")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the K most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, default=d.min_p, help="min-p filter (0: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="prompt i samples with seed + i")
    p.add_argument(
        "--scorer",
        default=d.scorer,
        help="best-of-n and step-search scorer: logprob, verifier, reward:NAME, rm:RUN, prm:RUN, prm+verifier:RUN, ...",
    )
    add_extract_arg(p, d.extract)
    p.add_argument("--weighting", default=d.weighting, help="self-consistency vote weights: none, logprob, reward")
    p.add_argument("--batch", type=int, default=d.batch, help="adaptive: samples drawn between stopping checks")
    p.add_argument(
        "--greedy-batch",
        type=int,
        default=d.greedy_batch,
        help="greedy alone: prompts decoded together (1: one by one)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=d.confidence,
        help="adaptive: stop when P(leader wins) >= this (1: only when safe)",
    )
    p.add_argument(
        "--independent", action="store_true", help="run each strategy and N on its own (real timings, slower)"
    )
    p.add_argument("--out", default="eval-results.json", help="JSON result file")
    p.add_argument(
        "--save-samples", action="store_true", help="also store every prompt's answers and samples in the JSON"
    )
    p.add_argument("--plot", default=None, help="PNG chart path (default: next to --out)")
    g = p.add_argument_group("compute-optimal scaling (docs/compute-optimal.md)")
    g.add_argument("--budget", default=None, help="auto: generated tokens per prompt, comma list (e.g. 200,400,800)")
    g.add_argument(
        "--calibration", nargs="+", metavar="TABLE", default=None,
        help="auto: calibration table(s) from --calibrate; several are pooled (default: built-in rule)",
    )  # fmt: skip
    g.add_argument(
        "--calibrate", metavar="OUT.json", default=None, help="write a calibration table for auto from this evaluation"
    )
    g.add_argument(
        "--budget-mode", default=d.budget_mode, help="auto: --budget bounds each prompt (prompt) or the mean over "
        "prompts (mean: easy prompts stop early, hard ones get more; needs --calibration)",
    )  # fmt: skip
    g.add_argument("--probe", type=int, default=d.probe, help="--calibrate: probe samples that bucket difficulty")
    add_search_args(p)
    p.set_defaults(func=run)


def config_from(args):
    from mlxpt.commands.generate import search_config
    from mlxpt.decode.evaluate import EvalConfig, parse_ns
    from mlxpt.decode.options import SearchConfig

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    confidence = None if args.confidence is not None and args.confidence >= 1 else args.confidence
    if args.limit is not None and args.limit < 1:
        raise ConfigError("E621", f"limit={args.limit} is out of range", "--limit", "use a whole number >= 1")
    if args.greedy_batch < 1:
        raise ConfigError(
            "E621", f"greedy-batch={args.greedy_batch} is out of range", "--greedy-batch", "use a whole number >= 1"
        )
    from mlxpt.decode.budget import parse_budgets

    budget = getattr(args, "budget", None)
    return EvalConfig(
        data=data_paths(args)[0], greedy_batch=args.greedy_batch, strategies=strategies, ns=parse_ns(args.n), max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
        scorer=args.scorer, extract=args.extract, weighting=args.weighting, batch=args.batch,
        confidence=confidence, limit=args.limit, independent=args.independent,
        budgets=parse_budgets(budget) if budget is not None else (), calibration=getattr(args, "calibration", None),
        probe=getattr(args, "probe", 2), budget_mode=getattr(args, "budget_mode", "prompt"), search=search_config(args) if hasattr(args, "expand") else SearchConfig(),
    )  # fmt: skip


def data_paths(args) -> list[str]:
    from mlxpt.decode.evaluate import EvalConfig

    return list(args.data) if args.data else [EvalConfig().data]


def data_labels(paths: list[str]) -> list[str]:
    """Short names of the eval sets: `ood/test` for assets/ood/test.jsonl; the path where two clash."""
    short = [f"{Path(p).parent.name}/{Path(p).stem}" if Path(p).parent.name else Path(p).stem for p in paths]
    return short if len(set(short)) == len(short) else list(paths)


def table(results: list[dict]) -> str:
    """The terminal table: one line per model, data set, strategy and N."""
    several = len({r.get("data") for r in results}) > 1
    width = max([len(str(r.get("data"))) for r in results] + [4]) if several else 0
    data = f"{'data':<{width}} " if several else ""
    head = (
        f"{'model':<10} {data}{'strategy':<17} {'N':>4} {'accuracy':>9} {'samples':>8} {'gen tokens':>11} "
        f"{'tok/prompt':>10} {'seconds':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        est = "~" if r.get("seconds_estimated") else " "
        d = f"{r.get('data'):<{width}} " if several else ""
        lines.append(
            f"{r['label']:<10} {d}{r['strategy']:<17} {r['n']:>4} {r['accuracy'] * 100:>8.1f}% "
            f"{r['mean_samples']:>8.2f} {r['generated_tokens']:>11} {mean_tokens(r):>10.1f} {est}{r['seconds']:>8.1f}"
        )
    for r in results:
        if r.get("choices"):
            chose = ", ".join(f"{k} x{v}" for k, v in sorted(r["choices"].items(), key=lambda kv: -kv[1]))
            lines.append(f"  {r['label']} auto@{r['n']}: {chose}")
    return "\n".join(lines)


def mean_tokens(r: dict) -> float:
    """Mean generated tokens per prompt of a result (older files have only the total)."""
    return r.get("mean_tokens", r["generated_tokens"] / r["total"] if r.get("total") else 0.0)


def side_by_side(results: list[dict]) -> str:
    """One line per model and (strategy, N), one column per data set: in-distribution and
    out-of-distribution accuracy next to each other."""
    sets = list(dict.fromkeys(r["data"] for r in results))
    cells = list(dict.fromkeys((r["label"], r["strategy"], r["n"]) for r in results))
    acc = {(r["label"], r["strategy"], r["n"], r["data"]): r for r in results}
    width = max(9, *(len(s) for s in sets))
    head = f"{'model':<10} {'strategy':<17} {'N':>4} " + " ".join(f"{s:>{width}}" for s in sets)
    lines = [head, "-" * len(head)]
    for label, strategy, n in cells:
        vals = []
        for s in sets:
            r = acc.get((label, strategy, n, s))
            vals.append(f"{r['accuracy'] * 100:>{width - 1}.1f}%" if r else f"{'-':>{width}}")
        lines.append(f"{label:<10} {strategy:<17} {n:>4} " + " ".join(vals))
    return "\n".join(lines)


def series_of(results: list[dict], x: str = "samples") -> dict:
    """Chart series: label -> [(n, accuracy)] (x="samples") or [(mean generated tokens per prompt,
    accuracy)] (x="tokens"); 'base'/'adapter' (and the data set, with several) appended when
    comparing; adaptive self-consistency sits at its mean samples used. On the samples axis `auto`
    has no N and is left out; on the tokens axis every strategy has a curve."""
    labels = {r["label"] for r in results}
    sets = {r.get("data") for r in results}
    out: dict[str, list] = {}
    for r in results:
        if x == "samples" and r["strategy"] == "auto":
            continue
        tags = ([r["label"]] if len(labels) > 1 else []) + ([str(r.get("data"))] if len(sets) > 1 else [])
        key = r["strategy"] + (f" ({', '.join(tags)})" if tags else "")
        pos = r["n"]
        if r["strategy"] == "adaptive":  # drawn at the samples it used on average
            key += f" (max {r['n']})"
            pos = max(1.0, r["mean_samples"])
        if x == "tokens":
            pos = mean_tokens(r)
        out.setdefault(key, []).append((pos, r["accuracy"]))
    return out


def plan_text(table, budget: int) -> str:
    """One line: what auto's mean-budget plan runs per difficulty bucket, and what it expects."""
    from mlxpt.decode.budget import plan

    chosen = plan(table, budget)
    if not chosen:
        return f"auto plan, mean budget {budget}: below the probe's cost; each prompt is chosen for on its own"
    total = sum(table.buckets[b].prompts for b in chosen)
    acc = sum(table.buckets[b].prompts * c.accuracy for b, c in chosen.items()) / total
    tok = sum(table.buckets[b].prompts * c.tokens for b, c in chosen.items()) / total
    cells = ", ".join(f"{b} agree -> {c.key}" for b, c in chosen.items())
    return f"auto plan, mean budget {budget}: {cells}; expected {acc * 100:.1f}% at {tok:.1f} tokens a prompt"


def tokens_plot_path(plot: Path) -> Path:
    """The accuracy-vs-tokens PNG beside the accuracy-vs-samples one."""
    return plot.with_name(plot.stem + "-tokens.png")


def auto_choices(details: dict) -> dict:
    """Per model, per prompt: what auto chose at each budget, its difficulty estimate and spend."""
    return {
        label: [
            {"line": rec["line"], "cell": cell, **info} for rec in recs for cell, info in rec.get("auto", {}).items()
        ]
        for label, recs in details.items()
    }


def scorer_input(spec) -> Path | None:
    """The file (`verifier:`/`reward:file.py:fn`) or run folder (`rm:`, `prm:`, `prm+verifier:`)
    a `--scorer` reads; None for the built-in ones."""
    if not isinstance(spec, str):
        return None
    kind, _, rest = spec.partition(":")
    if kind in ("rm", "prm", "prm+verifier") and rest:
        return Path(rest).expanduser()
    if kind in ("reward", "verifier") and ":" in rest:
        return Path(rest.rsplit(":", 1)[0]).expanduser()
    return None


def model_inputs(model: str | None, adapters: list[str]) -> dict[str, Path]:
    """The folders an evaluation reads weights from: each adapter's folder (and the run around a
    checkpoint), and the model folder or file when it is a local path."""
    inputs: dict[str, Path] = {}
    for a in adapters:
        folder = Path(a)
        inputs[f"adapter {a}"] = folder
        if folder.parent.name == "checkpoints":
            inputs[f"run of {a}"] = folder.parent.parent
    if model and Path(model).expanduser().exists():
        inputs[f"model {model}"] = Path(model).expanduser()
    return inputs


def run(args) -> int:
    from mlxpt.commands.generate import (
        DEFAULT_MODEL,
        check_adapter,
        check_common,
        load_for,
        model_ref,
        progress_printer,
    )
    from mlxpt.decode.budget import table_paths
    from mlxpt.decode.evaluate import check_config, evaluate, read_rows
    from mlxpt.decode.plot import TOKENS_AXIS, terminal_chart, token_ticks, write_png
    from mlxpt.runs.atomic import atomic_write_json
    from mlxpt.runs.guards import check_output, check_writable

    cfg = config_from(args)
    if args.compare and "auto" in cfg.strategies and cfg.calibration:  # a table fits one model, not two
        raise ConfigError(
            "E657", "auto with a calibration table scores one model; --compare scores two", "--compare",
            "evaluate auto on the base (--model) and on the adapter (--adapter RUN) in two commands, each with its own table",
        )  # fmt: skip
    check_config(cfg)
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    calibrate = Path(args.calibrate) if getattr(args, "calibrate", None) else None
    outputs = [out, plot, tokens_plot_path(plot), *([calibrate] if calibrate else [])]
    if len({p.resolve() for p in outputs}) < len(outputs):
        raise ConfigError(
            "E657",
            "two outputs share one path",
            str(calibrate or plot),
            "give --out, --plot and --calibrate different paths",
        )
    for path, flag in zip(outputs, ("--out", "--plot", "--plot", "--calibrate"), strict=False):
        check_writable(path, flag)  # before the evaluation: a result is never lost to a bad path
    inputs = {f"eval data {p}": p for p in data_paths(args)}
    for table_path in table_paths(cfg.calibration):
        inputs[f"calibration table {table_path}"] = Path(table_path)
    if (scorer := scorer_input(cfg.scorer)) is not None:  # its .py file or run folder
        inputs[f"scorer {cfg.scorer}"] = scorer
    for path in outputs:  # never one of its own inputs
        check_output(path, inputs, "eval", existing=False)
    if calibrate is not None:
        _check_calibrate(args, cfg)
    paths = data_paths(args)
    seen: dict[Path, str] = {}
    for p in paths:  # a set given twice once crashed after the whole evaluation, saving nothing
        if (key := Path(p).expanduser().resolve()) in seen:
            raise ConfigError(
                "E623", f"eval data given twice ({seen[key]} and {p})", str(p), "give each --data file once"
            )
        seen[key] = p
    sets = dict(
        zip(data_labels(paths), [read_rows(p, cfg.limit) for p in paths], strict=True)
    )  # checked before any weights load
    args.max_tokens, args.repetition_penalty = cfg.max_tokens, None
    args.temperature, args.top_p, args.top_k, args.min_p = cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p
    check_common(args)
    runs = [("base" if args.compare else ("adapter" if args.adapter else "base"), args.adapter)]
    if args.compare:
        if args.adapter:
            raise ConfigError(
                "E621", "--compare and --adapter together", "--compare", "give the tuned run to --compare only"
            )
        check_adapter(args.compare, "--compare")
        args.model = model_ref(args.model, args.compare)  # the base is the run's own base model by default
        runs.append(("adapter", args.compare))
    for path in outputs:  # nor the adapter's run or the model (checked before any weights load)
        check_output(path, model_inputs(args.model, [a for _, a in runs if a]), "eval", existing=False)
    from mlxpt.decode.options import reads_scorer
    from mlxpt.decode.scorers import check_base_model

    if reads_scorer(cfg.strategies, cfg.weighting):  # a prm:RUN scorer fits every model scored (E528)
        for _, adapter in runs:
            check_base_model(cfg.scorer, model_ref(args.model, adapter) or DEFAULT_MODEL)
    if "auto" in cfg.strategies and cfg.calibration:  # the table fits every model scored, and not the test set
        from mlxpt.decode.budget import check_identity, check_not_test_set, load_table

        cal = load_table(cfg.calibration)
        where = ", ".join(table_paths(cfg.calibration))
        for _, adapter in runs:
            check_identity(cal, where, model_ref(args.model, adapter), adapter)
        check_not_test_set(cal, where, paths)
        if len(table_paths(cfg.calibration)) > 1:
            print(
                f"calibration: {len(table_paths(cfg.calibration))} tables pooled, "
                f"{cal.buckets['all'].prompts} prompts", file=sys.stderr,
            )  # fmt: skip
        if cfg.budget_mode == "mean":
            for b in cfg.budgets:
                print(plan_text(cal, b))
    results: list[dict] = []
    details: dict[str, list] = {}
    started = time.time()
    for label, adapter in runs:
        args.adapter = adapter
        model, tokenizer = load_for(args)
        t0 = time.perf_counter()
        details[label] = []
        for name, rows in sets.items():
            tag = label if len(sets) == 1 else f"{label} {name}"
            progress = progress_printer(f"[{tag}]", t0)  # a log file: a line per tenth passed
            for r in evaluate(model, tokenizer, rows, cfg, progress, details[label]):
                results.append(
                    {**r, "label": label, "data": name, "model": args.model or "default", "adapter": adapter}
                )
        if sys.stderr.isatty():  # end the line updated in place
            print(file=sys.stderr)
        del model, tokenizer
    print(table(results))
    if len(sets) > 1:
        print()
        print(side_by_side(results))
    series = series_of(results)
    n_rows = sum(len(r) for r in sets.values())
    tokens_series = series_of(results, "tokens")
    print()
    if series:
        print(terminal_chart(series, title=f"accuracy vs samples ({n_rows} prompts)"))
        print()
    print(
        terminal_chart(
            tokens_series, title=f"accuracy vs generated tokens ({n_rows} prompts)", x_label=TOKENS_AXIS,
            ticks=token_ticks(tokens_series),
        )
    )  # fmt: skip
    from dataclasses import asdict

    result = {
        "results": results,
        "config": asdict(cfg),
        "model": args.model,
        "compare": args.compare,
        "prompts": n_rows,
        "data": {name: str(path) for name, path in zip(sets, paths, strict=True)},
        "started": started,
        "wall_seconds": round(time.time() - started, 1),
        "plot": str(plot),
        "plot_tokens": str(tokens_plot_path(plot)),
        "curves": {"samples": series, "tokens": tokens_series},
        **({"auto_choices": auto_choices(details)} if "auto" in cfg.strategies else {}),
        **({"details": details} if args.save_samples else {}),
    }
    if calibrate is not None:
        _write_calibration(calibrate, args, cfg, details[runs[0][0]], paths[0], n_rows)
    _save_results(out, result, atomic_write_json)
    try:
        write_png(plot, series, title=f"accuracy vs samples, {n_rows} prompts")
        write_png(
            tokens_plot_path(plot), tokens_series, f"accuracy vs generated tokens, {n_rows} prompts", TOKENS_AXIS,
            token_ticks(tokens_series),
        )  # fmt: skip
    except (OSError, MlxptError) as e:
        # the results are saved; an earlier run's charts beside them would be read as theirs
        for chart in (plot, tokens_plot_path(plot)):
            chart.unlink(missing_ok=True)
        what = e.line() if isinstance(e, MlxptError) else f"{type(e).__name__}: {e}"
        raise ResourceError(
            "E312", f"the results are saved in {out}, but the charts could not be written ({what[:120]})", str(plot),
            "free space or raise the file-size limit, and draw them again from the results",
        ) from None  # fmt: skip
    print(f"\nresults: {out}  charts: {plot}, {tokens_plot_path(plot)}", file=sys.stderr)
    return 0


def _check_calibrate(args, cfg) -> None:
    """--calibrate's own rules, before any weights load: one model, one data set, a pool to probe."""
    from mlxpt.decode.evaluate import POOLED

    if args.compare or len(data_paths(args)) > 1 or "auto" in cfg.strategies:
        raise ConfigError(
            "E657", "--calibrate measures one model on one data set, without auto", "--calibrate",
            "drop --compare, extra --data and auto; calibrate each model on its own",
        )  # fmt: skip
    if cfg.independent or not any(s in POOLED for s in cfg.strategies) or max(cfg.ns) < cfg.probe:
        raise ConfigError(
            "E654", f"--calibrate needs a shared sample pool of at least --probe {cfg.probe} samples", "--calibrate",
            f"add self-consistency or best-of-n to --strategies with an --n of {cfg.probe} or more (not --independent)",
        )  # fmt: skip


def _write_calibration(path: Path, args, cfg, details: list, data: str, rows: int) -> None:
    from dataclasses import asdict

    from mlxpt.commands.generate import model_ref
    from mlxpt.decode.budget import build_table, identity, table_text
    from mlxpt.decode.options import STEP_STRATEGIES
    from mlxpt.runs.atomic import atomic_write_json, sha256_file

    who = identity(model_ref(args.model, args.adapter), args.adapter)
    settings = {k: getattr(cfg, k) for k in ("max_tokens", "temperature", "top_p", "scorer", "extract", "weighting")}
    if any(s in STEP_STRATEGIES for s in cfg.strategies):  # what a step-beam or tree cell means
        settings["search"] = asdict(cfg.search)
    table = build_table(
        details, cfg.probe, who, {"path": str(data), "sha256": sha256_file(data), "rows": rows}, settings
    )
    atomic_write_json(path, table.to_json())
    print()
    print(table_text(table))
    print(f"calibration table: {path}", file=sys.stderr)


def _save_results(out: Path, result: dict, write) -> None:
    """Write the results; if `out` fails after all (the disk, a path changed meanwhile), keep them
    in a temporary file and say where: a finished evaluation is never lost."""
    import tempfile

    try:
        write(out, result)
    except (OSError, MlxptError) as e:
        fd, spare = tempfile.mkstemp(prefix="mlxpt-eval-", suffix=".json")
        try:
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(result, f)
        except OSError as full:  # the spare's disk is full too: no torn spare left, one line, exit 3
            Path(spare).unlink(missing_ok=True)
            raise ResourceError(
                "E312", f"cannot write the results ({str(e).splitlines()[0][:80]}), nor a spare copy ({full.strerror})",
                str(out), "free space or raise the file-size limit (ulimit -f), then run the evaluation again",
            ) from None  # fmt: skip
        raise ResourceError(
            "E312", f"cannot write the results ({str(e).splitlines()[0][:80]}); they are saved in {spare}", str(out),
            "copy them from there, and check the --out path",
        ) from None  # fmt: skip
