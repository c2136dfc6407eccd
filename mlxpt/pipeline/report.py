"""The pipeline's report folder: report.md, summary.json and PNG charts (matplotlib, no pyplot).

Every number comes from a run's own metrics.jsonl (step and eval events) or from an eval stage's
results file (eval-stageN.json); `summary` gathers them and both report.md and the charts are
drawn from that one summary, so a test can hold the page against the files it came from.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from mlxpt.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

REPORT_DIR = "report"


def eval_file(folder: Path, stage: int) -> Path:
    """An eval stage's results in the pipeline folder."""
    return folder / f"eval-stage{stage}.json"


def run_numbers(run_dir: Path) -> dict:
    """A run's curves and final numbers from its metrics.jsonl."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if isinstance(r, dict)]
    steps = [r for r in rows if r.get("event") == "step" and not r.get("skipped") and "loss" in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    val = [(e["step"], e["val_loss"]) for e in evals if "val_loss" in e]
    reg = [(e["step"], e["regression_accuracy"]) for e in evals if "regression_accuracy" in e]
    kl = [(e["step"], e["regression_kl"]) for e in evals if "regression_kl" in e]
    reward = [(r["step"], r["reward_mean"]) for r in steps if "reward_mean" in r]
    return {
        "curves": {
            "loss": [(r["step"], r["loss"]) for r in steps], "val_loss": val, "reward_mean": reward,
            "regression_accuracy": reg, "regression_kl": kl,
        },
        "steps": max((r["step"] for r in rows if r.get("event") == "step"), default=0),
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "final_val_loss": val[-1][1] if val else None,
        "final_reward": reward[-1][1] if reward else None,
        "regression_accuracy_first": reg[0][1] if reg else None,
        "regression_accuracy_last": reg[-1][1] if reg else None,
        "regression_kl_last": kl[-1][1] if kl else None,
    }  # fmt: skip


def summary(folder: Path, state: dict) -> dict:
    """The report's numbers: per stage its run's numbers, per eval stage each model's accuracy."""
    out = {"name": state.get("name"), "recipe_hash": state.get("recipe_hash"), "stages": [], "accuracy": []}
    for rec in state["stages"]:
        entry = {k: rec.get(k) for k in ("stage", "kind", "status", "run", "seconds")}
        if rec["kind"] != "eval" and rec.get("run"):
            entry.update(run_numbers(folder.parent / rec["run"]))
        elif rec["kind"] == "eval":
            try:
                result = json.loads(eval_file(folder, rec["stage"]).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                result = {"models": {}}
            for label, m in result.get("models", {}).items():
                for r in m.get("results", []):
                    out["accuracy"].append({
                        "eval_stage": rec["stage"], "model": label, "run": m.get("run"), "data": r["data"],
                        "accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"],
                    })  # fmt: skip
        out["stages"].append(entry)
    return out


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def pct(acc: float) -> str:
    return f"{acc * 100:.1f} %"


def markdown(s: dict, charts: list[str], folder: Path) -> str:
    lines = [f"# Pipeline `{s['name']}`", "", f"Folder `{folder.name}`, recipe digest `{s['recipe_hash']}`.", ""]
    lines += [
        "## Stages",
        "",
        "| stage | method | run | steps | first loss | final loss | final val loss | final reward | time |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for st in s["stages"]:
        sec = st.get("seconds")
        t = "–" if sec is None else (f"{sec:.0f} s" if sec < 60 else f"{sec / 60:.1f} min")
        if st["kind"] == "eval":
            lines.append(f"| {st['stage']} | eval | – | – | – | – | – | – | {t} |")
            continue
        lines.append(
            f"| {st['stage']} | {st['kind']} | `{st.get('run')}` | {st.get('steps', 0)} | {_fmt(st.get('first_loss'), '.4f')} "
            f"| {_fmt(st.get('final_loss'), '.4f')} | {_fmt(st.get('final_val_loss'), '.4f')} "
            f"| {_fmt(st.get('final_reward'), '.3f')} | {t} |"
        )
    trained = [st for st in s["stages"] if st["kind"] != "eval"]
    if any(st.get("regression_accuracy_first") is not None for st in trained):
        lines += ["", "## Forgetting monitor", "",
                  "Greedy accuracy on the regression set at the run's first and last evaluation, and the KL "
                  "to the adapter-off model at the last one (from each run's eval events).", "",
                  "| stage | method | regression accuracy, first | regression accuracy, last | KL to base, last |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for st in trained:
            lines.append(
                f"| {st['stage']} | {st['kind']} | {_fmt(st.get('regression_accuracy_first'), '.1f')} % "
                f"| {_fmt(st.get('regression_accuracy_last'), '.1f')} % | {_fmt(st.get('regression_kl_last'), '.4f')} |"
            )
    for stage in sorted({a["eval_stage"] for a in s["accuracy"]}):
        rows = [a for a in s["accuracy"] if a["eval_stage"] == stage]
        sets = list(dict.fromkeys(a["data"] for a in rows))
        models = list(dict.fromkeys(a["model"] for a in rows))
        cell = {(a["model"], a["data"]): a for a in rows}
        lines += ["", f"## Accuracy (eval stage {stage}, greedy)", "", "| model | run | " + " | ".join(sets) + " |"]
        lines.append("|---|---|" + "---|" * len(sets))
        for m in models:
            run = next(a["run"] for a in rows if a["model"] == m)
            vals = [
                f"{pct(c['accuracy'])} ({c['correct']}/{c['total']})" if (c := cell.get((m, d))) else "–" for d in sets
            ]
            lines.append(f"| {m} | {'`' + run + '`' if run else '–'} | " + " | ".join(vals) + " |")
    if charts:
        lines += ["", "## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in charts]
    lines += [
        "",
        "Numbers: each run's `metrics.jsonl` (step and eval events) and `eval-stageN.json` beside this folder.",
        "",
    ]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _panels(n: int, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 4.2 * n), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes


def loss_chart(stages: list[dict], key: str = "loss") -> bytes:
    """One panel per training stage: train loss per step and validation loss (or GRPO's reward)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _panels(len(stages), "reward per step" if key == "reward_mean" else "loss per step")
    for ax, st in zip(axes, stages, strict=True):
        c = st["curves"]
        if c[key]:
            ax.plot(*zip(*c[key], strict=True), linewidth=1.5, label="reward mean" if key == "reward_mean" else "train")
        if key == "loss" and c["val_loss"]:
            ax.plot(*zip(*c["val_loss"], strict=True), marker="o", linewidth=1.5, label="validation")
        ax.set_title(f"stage {st['stage']} {st['kind']}", loc="left")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, color="#dddddd")
        ax.legend(frameon=False)
    axes[0].set_ylabel("reward" if key == "reward_mean" else "loss")
    return _png(fig)


def forgetting_chart(stages: list[dict]) -> bytes:
    """One panel per training stage: regression accuracy (left axis) and KL to base (right)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _panels(len(stages), "forgetting monitor")
    for ax, st in zip(axes, stages, strict=True):
        c = st["curves"]
        if c["regression_accuracy"]:
            ax.plot(*zip(*c["regression_accuracy"], strict=True), marker="o", color="C0")
        ax.set_ylabel("regression accuracy (%)", color="C0")
        if c["regression_kl"]:
            ax2 = ax.twinx()
            ax2.plot(*zip(*c["regression_kl"], strict=True), marker="s", color="C3")
            ax2.set_ylabel("KL to base", color="C3")
        ax.set_title(f"stage {st['stage']} {st['kind']}", loc="left")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, color="#dddddd")
    return _png(fig)


def accuracy_chart(rows: list[dict], title: str) -> bytes:
    """Grouped bars: one group per eval set, one bar per model (base, then each stage)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    sets = list(dict.fromkeys(a["data"] for a in rows))
    models = list(dict.fromkeys(a["model"] for a in rows))
    cell = {(a["model"], a["data"]): a for a in rows}
    fig = Figure(figsize=(max(5.0, 1.6 + 1.2 * len(sets) * len(models) / 2), 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(sets))]
        ys = [cell[(m, d)]["accuracy"] * 100 if (m, d) in cell else 0.0 for d in sets]
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=8)
    ax.set_xticks(range(len(sets)), sets)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_ylim(0, max([a["accuracy"] * 100 for a in rows] + [10]) * 1.2)
    ax.set_ylabel("greedy accuracy")
    ax.set_title(title, loc="left")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def write_report(folder: Path, state: dict) -> Path:
    """Write report/ (report.md, summary.json, PNGs) in the pipeline folder; return report.md's path."""
    out = folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    s = summary(folder, state)
    trained = [st for st in s["stages"] if st["kind"] != "eval" and "curves" in st]
    charts = []
    if trained:
        atomic_write_bytes(out / "loss.png", loss_chart(trained))
        charts.append("loss.png")
    grpo = [st for st in trained if st["curves"]["reward_mean"]]
    if grpo:
        atomic_write_bytes(out / "reward.png", loss_chart(grpo, "reward_mean"))
        charts.append("reward.png")
    if any(st["curves"]["regression_accuracy"] for st in trained):
        atomic_write_bytes(out / "forgetting.png", forgetting_chart(trained))
        charts.append("forgetting.png")
    for stage in sorted({a["eval_stage"] for a in s["accuracy"]}):
        rows = [a for a in s["accuracy"] if a["eval_stage"] == stage]
        name = f"accuracy-stage{stage}.png"
        atomic_write_bytes(out / name, accuracy_chart(rows, f"base vs each stage, greedy (eval stage {stage})"))
        charts.append(name)
    atomic_write_json(out / "summary.json", s)
    atomic_write_text(out / "report.md", markdown(s, charts, folder))
    return out / "report.md"
