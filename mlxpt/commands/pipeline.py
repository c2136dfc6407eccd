"""`mlxpt pipeline RECIPE.yaml`: the recipe's stages (e.g. sft -> dpo -> eval) as one resumable
unit. The whole recipe is checked before anything trains; rerunning the same command continues
where it stopped (finished stages skipped, a stopped stage resumed from its checkpoint); the last
stage is followed by a report folder (report.md and PNG charts). See docs/pipeline.md."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from mlxpt.errors import EXIT_INTERRUPTED, ConfigError


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run a recipe of stages (sft -> dpo/grpo -> eval) ending in a report",
                       description=__doc__)  # fmt: skip
    p.add_argument("recipe", help="recipe YAML (name, settings, stages); e.g. assets/pipelines/demo.yaml")
    p.add_argument("--runs-dir", default="runs", help="where the pipeline folder and its runs go (default: runs)")
    p.add_argument(
        "--events", choices=["text", "json"], default="text", help="progress as text lines or one JSON object per line"
    )
    p.add_argument("--new", action="store_true", help="start a new pipeline folder even if this recipe has one")
    p.set_defaults(func=run)


def continue_command(args) -> str:
    cmd = f"mlxpt pipeline {shlex.quote(args.recipe)}"
    return cmd + (f" --runs-dir {shlex.quote(args.runs_dir)}" if args.runs_dir != "runs" else "")


def _printer(mode: str):
    """Pipeline events as lines; each run's own events through `mlxpt train`'s printer."""
    from mlxpt.commands.train import _printer as run_printer

    if mode == "json":
        return lambda e: print(json.dumps(e), flush=True)
    current = {"print": run_printer("text", 1)}

    def text(e: dict) -> None:
        kind = e["event"]
        if kind == "pipeline_stage":
            where = f"stage {e['stage']}/{e['stages']} {e['kind']}"
            if e["kind"] == "eval" and e["action"] == "skip":
                print(f"{where}: finished, skipped")
            elif e["kind"] == "eval":
                print(f"{where}: greedy accuracy of {', '.join(e['todo'])} on {', '.join(e['data'])}")
            elif e["action"] == "skip":
                print(f"{where}: finished, skipped (run {Path(e['run_dir']).name})")
            elif e["action"] == "resume":
                print(f"{where}: resuming run {Path(e['run_dir']).name} at step {e['step']} of {e['steps']}")
                current["print"] = run_printer("text", e["steps"])
            else:
                start = f" from {Path(e['from_run']).name}" if e.get("from_run") else ""
                print(f"{where}: new run{start}, {e['steps']} steps")
                current["print"] = run_printer("text", e["steps"])
        elif kind == "pipeline_eval":
            print(f"  {e['model']:<10} {e['data']:<14} {e['accuracy'] * 100:5.1f} %  ({e['correct']}/{e['total']})")
        elif kind == "pipeline_report":
            print(f"report: {e['path']}")
        else:
            current["print"](e)
        sys.stdout.flush()

    return text


def run(args) -> int:
    from mlxpt.runs.signals import exit_on_signal_after_stop

    with exit_on_signal_after_stop():  # a second signal after a stopped stage exits 130 at once
        return _run(args)


def _run(args) -> int:
    from mlxpt.pipeline import find_or_create, load_recipe, plan_recipe, run_pipeline
    from mlxpt.pipeline.run import PIPELINE_FILE, other_versions
    from mlxpt.runs.guards import check_writable

    recipe = plan_recipe(load_recipe(args.recipe))  # every stage checked: nothing is created before
    check_writable(args.runs_dir, "--runs-dir", folder=True)
    folder, state, how = find_or_create(recipe, args.runs_dir, new=args.new)
    emit = _printer(args.events)
    n = len(recipe.stages)
    done = sum(s.get("status") == "finished" for s in state["stages"])
    if args.events == "json":
        emit({"event": "pipeline", "status": how, "folder": str(folder), "stages": n, "finished_stages": done})
    elif how == "new":
        print(f"pipeline {recipe.name}: new folder {folder} ({n} stages)")
        for old in other_versions(recipe, args.runs_dir, folder):
            print(f"  (an earlier version of this recipe is in {old}; its content differs, so it is not continued)")
    elif how == "finished":
        print(f"pipeline {recipe.name}: every stage of {folder} is finished; writing the report again")
    else:
        print(f"pipeline {recipe.name}: continuing {folder} ({done} of {n} stages finished)")
    try:
        outcome = run_pipeline(recipe, folder, state, emit=emit)
    except ConfigError:
        # a setting found wrong only when stage 1 starts (a from_run of another model's shapes):
        # a new folder with no run yet is removed, so a bad recipe leaves nothing behind
        if how == "new" and not any(s.get("run") for s in state["stages"]):
            if {p.name for p in folder.iterdir()} <= {PIPELINE_FILE}:
                shutil.rmtree(folder, ignore_errors=True)
        raise
    if outcome == "interrupted":
        from mlxpt.runs import latest_checkpoint

        stage = next((s for s in state["stages"] if s["status"] != "finished"), state["stages"][-1])
        ck = latest_checkpoint(folder.parent / stage["run"]) if stage.get("run") else None
        saved = f", its run saved at step {int(ck.name.split('-')[1])}" if ck is not None else ""
        print(
            f"interrupted in stage {stage['stage']}/{n} ({stage['kind']}){saved}; finished stages are kept. "
            f"Continue with: {continue_command(args)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.events == "text":
        print(f"done: {folder}")
    return 0
