"""The Eval screen's evaluation, run in a thread worker: the library's `evaluate` (the function
`mlxpt eval` calls) on the screen's choices, one result list shaped like the CLI's JSON file, so
the screen draws a run it started and a file `mlxpt eval` wrote the same way. No Textual here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from app import engine

TUI_LIMIT = 20  # the form's first limit: a first result in minutes, not the whole set


class Cancelled(Exception):
    """The user left the screen or started another evaluation."""


@dataclass
class EvalChoice:
    data: str
    strategies: str = "greedy,best-of-n,self-consistency"
    ns: str = "1,2,4,8,16"
    limit: str = str(TUI_LIMIT)
    model: str | None = None
    adapter: str | None = None
    with_base: bool = True  # with an adapter: also the base model (`mlxpt eval --compare`)


def default_data() -> str:
    """The bundled held-out set (the CLI's default, as an absolute path)."""
    from mlxpt.config import ASSETS
    from mlxpt.decode.evaluate import EvalConfig

    bundled = ASSETS / "sft" / "test.jsonl"
    return str(bundled) if bundled.is_file() else EvalConfig().data


def eval_config(choice: EvalChoice):
    """The EvalConfig of the screen's choices, checked as `mlxpt eval` checks its flags."""
    from mlxpt.decode.evaluate import EvalConfig, check_config, parse_ns
    from mlxpt.errors import ConfigError

    limit = choice.limit.strip()
    if limit and (not limit.isdigit() or int(limit) < 1):
        raise ConfigError("E621", f"limit={limit} is out of range", "limit", "a whole number >= 1, or blank for all")
    strategies = tuple(s.strip() for s in choice.strategies.split(",") if s.strip())
    cfg = EvalConfig(
        data=choice.data, strategies=strategies, ns=parse_ns(choice.ns), limit=int(limit) if limit else None
    )
    check_config(cfg)
    return cfg


def models_of(choice: EvalChoice) -> list[tuple[str, str | None]]:
    """(label, adapter) per model to score, as `mlxpt eval` labels them."""
    if choice.adapter is None:
        return [("base", None)]
    return [("base", None), ("adapter", choice.adapter)] if choice.with_base else [("adapter", choice.adapter)]


def run_eval(
    choice: EvalChoice,
    progress: Callable[[str, int, int], None] = lambda label, done, total: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict:
    """Score every model of `choice`; the CLI's result dict (`results`, `config`, ...). Raises
    MlxptError on bad choices or data (before any weights load) and Cancelled when asked."""
    from mlxpt.decode.evaluate import evaluate, read_rows

    cfg = eval_config(choice)
    rows = read_rows(cfg.data, cfg.limit)
    name = f"{Path(cfg.data).parent.name}/{Path(cfg.data).stem}"
    base = engine.base_model_for(choice.adapter, choice.model)
    started, results = time.time(), []
    for label, adapter in models_of(choice):
        if cancelled():
            raise Cancelled
        progress(label, 0, len(rows))
        model, tokenizer = engine.load_model(base, adapter)

        def step(done: int, total: int, label: str = label) -> None:
            if cancelled():
                raise Cancelled  # evaluate() has no stop of its own: leave between prompts
            progress(label, done, total)

        for r in evaluate(model, tokenizer, rows, cfg, step):
            results.append({**r, "label": label, "data": name, "model": choice.model or "default", "adapter": adapter})
    return {
        "results": results,
        "config": asdict(cfg),
        "model": choice.model,
        "compare": choice.adapter if choice.with_base else None,
        "prompts": len(rows),
        "data": {name: cfg.data},
        "started": started,
        "wall_seconds": round(time.time() - started, 1),
    }


def output_paths(out: str) -> tuple[Path, Path, Path]:
    """The files a save to `out` writes, named as `mlxpt eval --out OUT` names them: the results
    JSON, the accuracy-vs-samples PNG (OUT with .png) and the accuracy-vs-tokens PNG beside it."""
    from mlxpt.commands.eval import tokens_plot_path

    path = Path(out)
    plot = path.with_suffix(".png")
    return path, plot, tokens_plot_path(plot)


def check_outputs(choice: EvalChoice, out: str) -> tuple[Path, Path, Path]:
    """Refuse a results name before anything is evaluated or written, with `mlxpt eval`'s rules
    for its outputs: two of the three files on one path (E657: a name ending in .png), one that
    cannot be written (E619) or is one of the evaluation's inputs (E617); and the screen's own:
    only a new name saves, so a file that exists is refused (E611), never overwritten."""
    from mlxpt.commands.eval import model_inputs
    from mlxpt.errors import ConfigError
    from mlxpt.runs.guards import check_output, check_writable

    outputs = output_paths(out)
    if len({p.resolve() for p in outputs}) < len(outputs):
        raise ConfigError(
            "E657",
            "two outputs share one path",
            out,
            "give a results file name ending in .json (NAME.png is its chart)",
        )
    for p in outputs:
        if p.exists() or p.is_symlink():
            raise ConfigError(
                "E611", f"{p.name} exists", str(p),
                f"saving writes {', '.join(q.name for q in outputs)}: give a new name, or clear it to not save",
            )  # fmt: skip
        check_writable(p, "results file")
    inputs = {f"eval data {choice.data}": Path(choice.data)}
    inputs.update(model_inputs(choice.model, [choice.adapter] if choice.adapter else []))
    for p in outputs:
        check_output(p, inputs, "eval", existing=False)
    return outputs


def save(result: dict, out: str) -> str:
    """Write the result JSON and its two PNGs next to it, accuracy vs samples and vs generated
    tokens (as `mlxpt eval` does); the caller checked the names first (check_outputs)."""
    from mlxpt.commands.eval import series_of
    from mlxpt.decode.plot import TOKENS_AXIS, token_ticks, write_png
    from mlxpt.runs.atomic import atomic_write_json

    path, plot, tokens_plot = output_paths(out)
    tokens = series_of(result["results"], "tokens")
    atomic_write_json(path, {**result, "plot": str(plot), "plot_tokens": str(tokens_plot)})
    write_png(plot, series_of(result["results"]), title=f"accuracy vs samples, {result['prompts']} prompts")
    write_png(
        tokens_plot, tokens, f"accuracy vs generated tokens, {result['prompts']} prompts", TOKENS_AXIS,
        token_ticks(tokens),
    )  # fmt: skip
    return str(plot)
