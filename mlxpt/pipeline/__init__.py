"""`mlxpt pipeline`: a recipe of stages (sft -> dpo/grpo -> eval) run as one resumable unit.

recipe.py reads and checks a recipe (every stage's config and data, before anything trains);
run.py keeps the pipeline folder (pipeline.json) and runs the stages, each a normal run started
from the previous stage's adapter; report.py writes report/ (report.md and PNG charts) from the
runs' own metrics.jsonl and the eval stages' results.
"""

from mlxpt.pipeline.recipe import Recipe, Stage, load_recipe, plan_recipe
from mlxpt.pipeline.report import write_report
from mlxpt.pipeline.run import find_or_create, run_pipeline

__all__ = ["Recipe", "Stage", "find_or_create", "load_recipe", "plan_recipe", "run_pipeline", "write_report"]
