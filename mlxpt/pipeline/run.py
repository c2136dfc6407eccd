"""Run a planned recipe in its pipeline folder, stage by stage, resumable at and within stages.

The folder (RUNS/<timestamp>-pipeline-<name>/) holds pipeline.json: the recipe as written, its
digest, and per stage its status (pending, running, interrupted, failed, finished) and run folder
(a name inside the same runs folder). The same recipe finds its folder again by name and digest,
so rerunning the command continues: finished stages are skipped, a stopped training stage resumes
its run from the newest checkpoint, an eval stage keeps the models it already scored. Each
training stage is a normal run (listed with the others) started from the previous training
stage's run (`from_run`); each eval stage scores the base model and every training stage before it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from mlxpt.config import build_config
from mlxpt.errors import ConfigError, MlxptError
from mlxpt.pipeline.recipe import Recipe, Stage, base_model
from mlxpt.pipeline.report import eval_file, write_report
from mlxpt.runs import atomic_write_json, latest_checkpoint, new_run_dir, read_config, read_status
from mlxpt.runs.folder import now_iso
from mlxpt.runs.guards import RunLock

PIPELINE_FILE = "pipeline.json"
Emit = Callable[[dict], None]


def _read_state(folder: Path) -> dict | None:
    try:
        state = json.loads((folder / PIPELINE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("stages"), list) else None


def find_or_create(recipe: Recipe, runs_dir: str | Path, new: bool = False) -> tuple[Path, dict, str]:
    """(folder, state, how) for this recipe under `runs_dir`: the newest pipeline folder of the same
    name and digest ("continuing", or "finished" when every stage is), else a new one ("new")."""
    runs = Path(runs_dir)
    if not new:
        for folder in _pipeline_folders(runs, recipe.name):
            state = _read_state(folder)
            if state is not None and state.get("recipe_hash") == recipe.digest:
                done = all(s.get("status") == "finished" for s in state["stages"])
                return folder, state, "finished" if done else "continuing"
    folder = new_run_dir(runs, f"pipeline-{recipe.name}")
    state = {
        "name": recipe.name, "recipe_file": str(recipe.path), "recipe_hash": recipe.digest, "recipe": recipe.content,
        "created": now_iso(), "status": "pending",
        "stages": [{"stage": s.index, "kind": s.kind, "status": "pending", "run": None} for s in recipe.stages],
    }  # fmt: skip
    atomic_write_json(folder / PIPELINE_FILE, state)
    return folder, state, "new"


def _pipeline_folders(runs: Path, name: str) -> list[Path]:
    """This recipe name's pipeline folders, newest first (`<time>-pipeline-<name>`, maybe `-2`)."""
    if not runs.is_dir():
        return []
    found = [p for p in runs.iterdir() if "-pipeline-" in p.name and (_read_state(p) or {}).get("name") == name]
    return sorted(found, key=lambda p: p.name, reverse=True)


def other_versions(recipe: Recipe, runs_dir: str | Path, folder: Path) -> list[Path]:
    """Pipeline folders of the same recipe name with other contents (an edited recipe)."""
    return [
        p for p in _pipeline_folders(Path(runs_dir), recipe.name)
        if p != folder and (_read_state(p) or {}).get("recipe_hash") != recipe.digest
    ]  # fmt: skip


def run_pipeline(recipe: Recipe, folder: Path, state: dict, emit: Emit = lambda e: None, stop=None) -> str:
    """Run every stage not yet finished; "finished" (report written) or "interrupted"."""
    try:
        lock = RunLock(folder).acquire()
    except ConfigError as e:
        if e.code != "E521":
            raise
        raise ConfigError(
            "E807", "this pipeline is running in another process", str(folder), "wait for it, or stop it first"
        ) from None
    try:
        return _run(recipe, folder, state, emit, stop)
    finally:
        lock.release()


def _run(recipe: Recipe, folder: Path, state: dict, emit: Emit, stop) -> str:
    runs = folder.parent

    def save() -> None:
        state["updated"] = now_iso()
        atomic_write_json(folder / PIPELINE_FILE, state)

    trained: list[tuple[str, Path]] = []  # (label, run folder) of the training stages so far
    state["status"] = "running"
    save()
    for stage, rec in zip(recipe.stages, state["stages"], strict=True):
        started = time.time()
        try:
            if stage.is_training:
                outcome = _train_stage(recipe, stage, rec, runs, trained[-1][1] if trained else None, save, emit, stop)
            else:
                outcome = _eval_stage(recipe, stage, rec, folder, trained, save, emit, stop)
        except KeyboardInterrupt:
            outcome = "interrupted"
        except BaseException as e:
            rec["status"], state["status"] = "failed", "failed"
            rec["error"] = e.line() if isinstance(e, MlxptError) else f"{type(e).__name__}: {e}"
            rec["seconds"] = round(rec.get("seconds", 0.0) + time.time() - started, 1)
            save()
            raise
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.time() - started, 1)  # over every session
        rec["status"] = outcome
        rec.pop("error", None)
        if outcome != "finished":
            state["status"] = "interrupted"
            save()
            return "interrupted"
        save()
        if stage.is_training:
            trained.append((f"{stage.index}-{stage.kind}", runs / rec["run"]))
    report = write_report(folder, state)
    state["status"], state["report"] = "finished", str(report.relative_to(folder))
    save()
    emit({"event": "pipeline_report", "path": str(report), "folder": str(folder)})
    return "finished"


def _train_stage(recipe: Recipe, stage: Stage, rec: dict, runs: Path, previous: Path | None, save, emit, stop) -> str:
    from mlxpt.train.methods import run_method

    n = len(recipe.stages)
    run_dir = runs / rec["run"] if rec.get("run") else None
    head = {"event": "pipeline_stage", "stage": stage.index, "stages": n, "kind": stage.kind}
    if run_dir is not None and not run_dir.is_dir():
        raise ConfigError(
            "E808", f"stage {stage.index}'s run folder {rec['run']} is gone", str(runs),
            "put it back, or start the pipeline over with --new",
        )  # fmt: skip
    if run_dir is not None and (read_status(run_dir) or {}).get("status") == "finished":
        emit({**head, "action": "skip", "run_dir": str(run_dir)})
        return "finished"
    rec["status"] = "running"
    if run_dir is not None:  # stopped or killed inside the stage: its run continues from its checkpoint
        saved = read_config(run_dir)
        cfg = build_config(None, {}, resume=str(run_dir), resume_config=saved)
        ck = latest_checkpoint(run_dir)
        step = int(ck.name.split("-")[1]) if ck is not None else 0
        save()
        emit({**head, "action": "resume", "run_dir": str(run_dir), "step": step, "steps": cfg.train.steps})
        _, outcome = run_method(saved.get("method", stage.kind), cfg, resume_dir=run_dir, emit=emit, stop=stop)
        return outcome
    flags = {**stage.flags, "runs_dir": str(runs)}
    if stage.chained:
        flags["from_run"] = str(previous.resolve())
    cfg = build_config(stage.kind, flags)
    save()
    emit({**head, "action": "new", "run_dir": None, "step": 0, "steps": cfg.train.steps,
          "from_run": flags.get("from_run")})  # fmt: skip

    def tap(e: dict) -> None:
        if e.get("event") == "start" and not rec.get("run"):  # known now: a stop from here on resumes it
            rec["run"] = Path(e["run_dir"]).name
            save()
        emit(e)

    _, outcome = run_method(stage.kind, cfg, emit=tap, stop=stop)
    return outcome


def data_names(paths: list[str]) -> list[str]:
    """Short names of eval sets (`ood/test` for .../ood/test.jsonl); the paths where two clash."""
    short = [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
    return short if len(set(short)) == len(short) else list(paths)


def _eval_stage(recipe: Recipe, stage: Stage, rec: dict, folder: Path, trained, save, emit, stop) -> str:
    """Greedy accuracy of the base model and of each training stage so far on every eval set; one
    model at a time, saved after each, so a stopped eval keeps what it scored."""
    from mlxpt.decode.evaluate import EvalConfig, evaluate, read_rows
    from mlxpt.models.loader import load

    s = stage.settings
    path = eval_file(folder, stage.index)
    names = data_names(s["data"])
    sets = {name: read_rows(p, s["limit"]) for name, p in zip(names, s["data"], strict=True)}
    kept = {}
    if path.is_file():
        try:
            kept = json.loads(path.read_text(encoding="utf-8")).get("models", {})
        except (OSError, ValueError, AttributeError):
            kept = {}
    result = {"stage": stage.index, "settings": s, "data": dict(zip(names, s["data"], strict=True)), "models": {}}
    cfg = EvalConfig(
        data=s["data"][0], strategies=("greedy",), ns=(1,), max_tokens=s["max_tokens"], extract=s["extract"],
        limit=s["limit"], greedy_batch=s["greedy_batch"],
    )  # fmt: skip
    model_ref, quantize = base_model(recipe)
    models = [("base", None), *trained]

    def reusable(label: str, run: Path | None) -> bool:
        old = kept.get(label)
        return isinstance(old, dict) and old.get("run") == (run.name if run else None) and old.get("settings") == s

    todo = [label for label, run in models if not reusable(label, run)]
    rec["status"] = "running"
    save()
    emit({"event": "pipeline_stage", "stage": stage.index, "stages": len(recipe.stages), "kind": "eval",
          "action": "skip" if not todo else ("resume" if kept else "new"), "models": [m for m, _ in models],
          "todo": todo, "data": names})  # fmt: skip
    for label, run in [("base", None), *trained]:
        run_name = run.name if run is not None else None
        if label not in todo:
            result["models"][label] = kept[label]
            continue
        if stop is not None and stop.requested:
            return "interrupted"
        model, tokenizer = load(model_ref, adapter=str(run) if run is not None else None, quantize=quantize)
        rows_out = []
        for name, rows in sets.items():
            t0 = time.perf_counter()
            (r,) = evaluate(model, tokenizer, rows, cfg)
            rows_out.append({"data": name, **r, "wall_seconds": round(time.perf_counter() - t0, 1)})
            emit({"event": "pipeline_eval", "stage": stage.index, "model": label, "run": run_name, "data": name,
                  "accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"]})  # fmt: skip
        del model, tokenizer
        result["models"][label] = {"run": run_name, "settings": s, "results": rows_out}
        atomic_write_json(path, result)
    atomic_write_json(path, result)
    return "finished"
