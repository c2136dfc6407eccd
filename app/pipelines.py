"""Pipeline folders as the TUI shows them: read from the pipeline.json that `mlxpt pipeline` keeps
(mlxpt/pipeline/run.py) and from report/summary.json once the report is written. Never raises."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlxpt.pipeline.report import REPORT_DIR
from mlxpt.pipeline.run import PIPELINE_FILE
from mlxpt.runs.guards import lock_holder


@dataclass
class PipelineInfo:
    path: Path
    name: str
    status: str  # pending, running, interrupted, failed, finished; crashed: "running" with no writer
    stages: list[dict]  # pipeline.json's stage records: stage, kind, status, run (a folder name or None)
    seconds: float  # the stages' recorded times (a stage adds its time when it ends)
    error: str | None

    @property
    def current(self) -> int:
        """Index of the stage in progress (the first one not finished; the last when all are)."""
        return next((i for i, s in enumerate(self.stages) if s.get("status") != "finished"), len(self.stages) - 1)

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR / "report.md"

    def stage_status(self, rec: dict) -> str:
        """A stage's status; "running" under a pipeline whose process is gone reads "crashed"."""
        status = str(rec.get("status", "pending"))
        return "crashed" if status == "running" and self.status == "crashed" else status


def read_pipeline(folder: str | os.PathLike) -> PipelineInfo | None:
    """A pipeline folder's state, or None when it has no readable pipeline.json."""
    folder = Path(folder)
    try:
        state = json.loads((folder / PIPELINE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        return None
    stages = [s for s in state["stages"] if isinstance(s, dict)]
    status = str(state.get("status", "pending"))
    if status == "running" and lock_holder(folder) is None:  # run.py holds the folder's lock while it runs
        status = "crashed"
    seconds = sum(s["seconds"] for s in stages if isinstance(s.get("seconds"), (int, float)))
    error = next((str(s["error"]) for s in stages if s.get("error")), None)
    return PipelineInfo(folder, str(state.get("name", folder.name)), status, stages, float(seconds), error)


def list_pipelines(root: str | os.PathLike) -> list[PipelineInfo]:
    """Every pipeline folder under `root` (one with pipeline.json), newest first."""
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []
    found = [p for e in entries if os.path.exists(os.path.join(e.path, PIPELINE_FILE)) if (p := read_pipeline(e.path))]
    return sorted(found, key=lambda p: p.path.name, reverse=True)


def read_summary(info: PipelineInfo) -> dict | None:
    """report/summary.json (report.py's `summary`), or None before the report is written."""
    try:
        s = json.loads((info.path / REPORT_DIR / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def final_accuracy(summary: dict) -> tuple[int, list[str], list[list[str]]] | None:
    """The last eval stage's greedy accuracy as (eval stage, header, rows): a row per model (base,
    then each training stage), a column per eval set; None when the summary has no accuracy."""
    rows = [a for a in summary.get("accuracy", []) if isinstance(a, dict) and "eval_stage" in a]
    if not rows:
        return None
    stage = max(a["eval_stage"] for a in rows)
    rows = [a for a in rows if a["eval_stage"] == stage]
    sets = list(dict.fromkeys(str(a.get("data")) for a in rows))
    models = list(dict.fromkeys(str(a.get("model")) for a in rows))
    cell = {(str(a.get("model")), str(a.get("data"))): a for a in rows}
    table = []
    for m in models:
        vals = []
        for d in sets:
            c = cell.get((m, d))
            ok = c is not None and isinstance(c.get("accuracy"), (int, float))
            vals.append(f"{c['accuracy'] * 100:.1f} % ({c.get('correct')}/{c.get('total')})" if ok else "–")
        table.append([m, *vals])
    return stage, ["model", *sets], table
