"""`mlxpt pipeline` as a user runs it (tiny model): a recipe of eval -> sft -> dpo -> eval ends in a
report whose numbers are the runs' own; Ctrl-C in stage 2 and the same command again continues
stage 2 from its checkpoint; bad recipes are one-line errors that create nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxpt.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = {  # shared settings of a fast tiny-model recipe
    "regression_data": "none",
    "batch_size": 2,
    "max_seq_len": 256,
    "learning_rate": 0.01,
    "warmup_steps": 0,
    "eval_every": 0,
    "eval_batches": 1,
    "num_layers": -1,
    "rank": 4,
}


def recipe_text(tiny_dir, data_dir, pref_dir, dpo_steps=4, dpo_extra="", first_eval=True) -> str:
    shared = "".join(f"  {k}: {v}\n" for k, v in {"model": tiny_dir, **FAST}.items())
    evaluate = f"  - method: eval\n    data: [{data_dir}/valid.jsonl]\n    limit: 4\n    max_tokens: 8\n"
    return (
        f"name: tiny\nsettings:\n{shared}stages:\n"
        + (evaluate if first_eval else "")
        + f"  - method: sft\n    data: {data_dir}\n    steps: 3\n    save_every: 2\n"
        + f"  - method: dpo\n    data: {pref_dir}\n    steps: {dpo_steps}\n{dpo_extra}"
        + evaluate
    )


def state_of(folder: Path) -> dict:
    return json.loads((folder / "pipeline.json").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recipe_runs_every_stage_and_the_report_holds_the_runs_numbers(tiny_dir, data_dir, pref_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_dir, data_dir, pref_dir))
    runs = tmp_path / "runs"
    assert main(["pipeline", str(recipe), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "stage 2/4 sft: new run, 3 steps" in out and "stage 3/4 dpo: new run from " in out
    (folder,) = runs.glob("*-pipeline-tiny")
    state = state_of(folder)
    assert [s["status"] for s in state["stages"]] == ["finished"] * 4
    sft, dpo = (runs / state["stages"][1]["run"]), (runs / state["stages"][2]["run"])
    # stage 3 is a normal run, started from stage 2's run
    assert json.loads((dpo / "config.json").read_text())["adapter"]["from_run"] == str(sft.resolve())
    report = folder / "report"
    for name in ("report.md", "summary.json", "loss.png", "accuracy-stage1.png", "accuracy-stage4.png"):
        assert (report / name).is_file(), name
    assert (report / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "report.md").read_text()
    summary = json.loads((report / "summary.json").read_text())
    for st, run in ((summary["stages"][1], sft), (summary["stages"][2], dpo)):
        steps = [e for e in metrics(run) if e["event"] == "step"]
        evals = [e for e in metrics(run) if e["event"] == "eval" and "val_loss" in e]
        assert st["run"] == run.name and st["steps"] == steps[-1]["step"]
        assert st["first_loss"] == steps[0]["loss"] and st["final_loss"] == steps[-1]["loss"]
        assert st["final_val_loss"] == evals[-1]["val_loss"]
        row = f"| {st['stage']} | {st['kind']} | `{run.name}` | {steps[-1]['step']} | {steps[0]['loss']:.4f} | {steps[-1]['loss']:.4f} | {evals[-1]['val_loss']:.4f} |"
        assert row in md
    # the eval stage before any training scores the base alone; the last one base and both stages
    first = json.loads((folder / "eval-stage1.json").read_text())
    last = json.loads((folder / "eval-stage4.json").read_text())
    assert list(first["models"]) == ["base"] and list(last["models"]) == ["base", "2-sft", "3-dpo"]
    assert last["models"]["3-dpo"]["run"] == dpo.name
    for label, m in last["models"].items():
        (r,) = m["results"]
        assert r["total"] == 4
        line = f"| {label} | {'`' + m['run'] + '`' if m['run'] else '–'} | {r['accuracy'] * 100:.1f} % ({r['correct']}/4) |"
        assert line in md
    # the same command again: nothing retrained, no new folder or run
    before = sorted(p.name for p in runs.iterdir())
    assert main(["pipeline", str(recipe), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("finished, skipped") == 4
        and "writing the report again" in out
        and sorted(p.name for p in runs.iterdir()) == before
    )


def _events(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def test_ctrl_c_in_stage_2_then_the_same_command_continues_it(tiny_dir, data_dir, pref_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    # many quick steps, so the signal lands in the middle of stage 2 (the stop saves a checkpoint)
    recipe.write_text(recipe_text(tiny_dir, data_dir, pref_dir, dpo_steps=40, dpo_extra="    save_every: 1000\n",
                                  first_eval=False))  # fmt: skip
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "mlxpt.cli", "pipeline", str(recipe), "--runs-dir", str(runs), "--events", "json"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out, err = tmp_path / "out.jsonl", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=o, stderr=e, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ev = _events(out)
            stage = next((i for i, x in enumerate(ev) if x.get("event") == "pipeline_stage" and x["stage"] == 2), None)
            if stage is not None and any(x.get("event") == "step" and x["step"] >= 3 for x in ev[stage:]):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Continue with: mlxpt pipeline" in err.read_text()
    (folder,) = runs.glob("*-pipeline-tiny")
    state = state_of(folder)
    assert [s["status"] for s in state["stages"]] == ["finished", "interrupted", "pending"]
    sft, dpo = runs / state["stages"][0]["run"], runs / state["stages"][1]["run"]
    stopped = max(e["step"] for e in metrics(dpo) if e["event"] == "step")
    assert 3 <= stopped < 40
    sft_adapter = digest(sft / "adapters.safetensors")

    with open(out, "w") as o, open(err, "w") as e:
        code = subprocess.run(argv, cwd=ROOT, stdout=o, stderr=e, env=env, timeout=300).returncode
    assert code == 0, err.read_text()
    ev = _events(out)
    stages = [x for x in ev if x.get("event") == "pipeline_stage"]
    assert stages[0]["action"] == "skip" and stages[0]["run_dir"].endswith(sft.name)
    assert stages[1]["action"] == "resume" and stages[1]["step"] == stopped and stages[1]["run_dir"].endswith(dpo.name)
    assert next(x for x in ev if x.get("event") == "start")["resumed_from_step"] == stopped
    assert digest(sft / "adapters.safetensors") == sft_adapter  # stage 1 was not retrained
    assert sorted(p.name for p in runs.iterdir()) == sorted([folder.name, sft.name, dpo.name])
    steps = [e["step"] for e in metrics(dpo) if e["event"] == "step"]
    assert steps == list(range(1, 41))  # every step once: continued, not restarted
    assert [s["status"] for s in state_of(folder)["stages"]] == ["finished"] * 3
    assert (folder / "report" / "report.md").is_file()


BAD = [  # (what the recipe says, error code, a fragment of the one line)
    ("- 1\n- 2\n", "E802", "must be a mapping"),
    ("name: x\nstages:\n  - method: sft\n    steps: 2\n    steps: 3\n", "E801", "recipe.yaml:5"),
    ("name: x\nstages:\n  - method: ppo\n", "E803", "recipe.yaml:3"),
    ("name: x\nstages:\n  - method: rm\n", "E803", "reward model"),
    ("name: x\nstages:\n  - method: sft\n    data: no-such-folder\n", "E805", "recipe.yaml:4, stage 1 (sft)"),
    ("name: x\nstages:\n  - method: sft\n    beta: 0.1\n", "E504", "recipe.yaml:4, stage 1 (sft)"),
    ("name: x\nstages:\n  - method: sft\n  - method: dpo\n    steps: -2\n", "E505", "recipe.yaml:5, stage 2 (dpo)"),
    ("name: x\nsettings:\n  num_generations: 4\nstages:\n  - method: sft\n", "E804", "recipe.yaml:3"),
    ("name: x\nsettings:\n  stepz: 4\nstages:\n  - method: sft\n", "E504", "recipe.yaml:3"),
    ("name: x\nstages:\n  - method: eval\n    limt: 3\n", "E806", "recipe.yaml:4"),
    ("name: x\nstages:\n  - method: eval\n    data: nothing.jsonl\n", "E623", "nothing.jsonl"),
    ("name: x\nstages:\n  - method: sft\n    runs_dir: elsewhere\n", "E804", "--runs-dir"),
    ("name: bad name\nstages:\n  - method: sft\n", "E802", "recipe.yaml:1"),
    ("name: x\nstages: []\n", "E802", "non-empty list"),
    ("name: x\nstages:\n  - method: sft\n    steps: [\n", "E801", "recipe.yaml:"),
    # YAML 1.1 reads these keys as a bool, an int, a null: once E001 (a bug) from the digest
    ("name: x\nstages:\n  - {method: sft, yes: 2}\n", "E801", "recipe.yaml:3"),
    ("name: x\nstages:\n  - method: sft\n    1: 2\n", "E801", "recipe.yaml:4"),
    ("name: x\n1: y\nstages:\n  - method: sft\n", "E801", "recipe.yaml:2"),
    ("name: x\n~: y\nstages:\n  - method: sft\n", "E801", "recipe.yaml:2"),
]


@pytest.mark.parametrize("text,code,fragment", BAD, ids=[b[1] + "-" + b[2][:18] for b in BAD])
def test_bad_recipes_are_one_line_errors_that_create_nothing(text, code, fragment, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    runs = tmp_path / "runs"
    assert main(["pipeline", str(recipe), "--runs-dir", str(runs)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error {code}: ") and fragment in err[0], err
    assert not runs.exists()


def test_bad_data_in_stage_2_is_refused_before_stage_1_trains(tiny_dir, data_dir, tmp_path, capsys):
    pref = tmp_path / "pref"
    pref.mkdir()
    (pref / "train.jsonl").write_text('{"prompt": "hi", "chosen": "a"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_dir, data_dir, pref, first_eval=False))
    assert main(["pipeline", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert f"{pref / 'train.jsonl'}:1" in err and "rejected" in err
    assert not (tmp_path / "runs").exists()


def test_a_from_run_of_another_models_shapes_leaves_no_pipeline_folder(tiny_dir, data_dir, tmp_path, capsys):
    """E577 (the adapter does not fit) is found when stage 1 starts; the new pipeline folder it
    left behind, marked failed, is now removed: a bad recipe creates nothing."""
    from tiny import make_model

    runs = tmp_path / "runs"
    flags = ["--data", str(data_dir), "--steps", "1", "--batch-size", "2", "--regression-data", "none"]
    assert main(["train", "sft", "--model", str(tiny_dir), *flags, "--runs-dir", str(runs), "--name", "src"]) == 0
    src = next(runs.glob("*-src"))
    other = make_model(tmp_path / "other", hidden_size=48, intermediate_size=96)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: fo\nsettings: {{model: {other}, regression_data: none}}\n"
        f"stages:\n  - {{method: sft, data: {data_dir}, steps: 1, from_run: {src}}}\n"
    )
    capsys.readouterr()
    assert main(["pipeline", str(recipe), "--runs-dir", str(runs)]) == 1
    assert "E577" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == [src.name]


def test_the_same_recipe_finds_its_folder_an_edited_one_gets_a_new_one(tmp_path):
    from mlxpt.pipeline import find_or_create, load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nstages:\n  - method: sft\n    steps: 2\n")
    folder, _, how = find_or_create(load_recipe(recipe), tmp_path)
    assert how == "new"
    recipe.write_text("# a comment changes nothing\nname: x\nstages:\n  - {method: sft, steps: 2}\n")
    assert find_or_create(load_recipe(recipe), tmp_path)[:3:2] == (folder, "continuing")
    recipe.write_text("name: x\nstages:\n  - method: sft\n    steps: 3\n")
    other, _, how = find_or_create(load_recipe(recipe), tmp_path)
    assert how == "new" and other != folder
    assert find_or_create(load_recipe(recipe), tmp_path, new=True)[0] not in (folder, other)


def test_the_same_recipe_text_in_another_folder_is_another_pipeline(tmp_path):
    """Relative data paths resolve against the recipe's folder: a copy of the recipe beside other
    data once found the first project's folder, skipped its training and reported the old run."""
    from mlxpt.pipeline import find_or_create, load_recipe

    text = "name: x\nstages:\n  - method: sft\n    data: sft\n    steps: 2\n"
    for project in ("a", "b"):
        (tmp_path / project).mkdir()
        (tmp_path / project / "recipe.yaml").write_text(text)
    runs = tmp_path / "runs"
    folder, _, how = find_or_create(load_recipe(tmp_path / "a" / "recipe.yaml"), runs)
    assert how == "new"
    assert find_or_create(load_recipe(tmp_path / "a" / "recipe.yaml"), runs)[:3:2] == (folder, "continuing")
    other, _, how = find_or_create(load_recipe(tmp_path / "b" / "recipe.yaml"), runs)
    assert how == "new" and other != folder


def test_demo_recipe_is_valid():
    """The bundled demo checks out (every stage's config and data) without training anything."""
    from mlxpt.pipeline import load_recipe, plan_recipe

    recipe = plan_recipe(load_recipe(ROOT / "assets" / "pipelines" / "demo.yaml"))
    assert [s.kind for s in recipe.stages] == ["sft", "dpo", "eval"]
    assert recipe.stages[1].chained and recipe.stages[0].cfg.train.steps == 60


def test_report_draws_reward_and_forgetting_from_the_metrics_it_is_given(tmp_path):
    """A GRPO stage's reward and the forgetting monitor's numbers reach report.md and their charts."""
    from mlxpt.pipeline import write_report

    runs, folder = tmp_path / "runs", tmp_path / "runs" / "20250101-000000-pipeline-r"
    run = runs / "20250101-000001-r-1-grpo"
    for d in (folder, run):
        d.mkdir(parents=True)
    rows = [{"event": "eval", "step": 0, "regression_accuracy": 41.7, "regression_kl": 0.0}]
    rows += [{"event": "step", "step": s, "loss": 0.1 / s, "reward_mean": 0.2 * s, "skipped": False} for s in (1, 2, 3)]
    rows += [{"event": "eval", "step": 3, "regression_accuracy": 37.5, "regression_kl": 0.0123, "val_reward": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = {"name": "r", "recipe_hash": "h", "stages": [{"stage": 1, "kind": "grpo", "status": "finished",
                                                          "run": run.name, "seconds": 75.0}]}  # fmt: skip
    md = write_report(folder, state).read_text()
    assert {p.name for p in (folder / "report").glob("*.png")} == {"loss.png", "reward.png", "forgetting.png"}
    assert f"| 1 | grpo | `{run.name}` | 3 | 0.1000 | {0.1 / 3:.4f} | – | 0.600 | 1.2 min |" in md
    assert "| 1 | grpo | 41.7 % | 37.5 % | 0.0123 |" in md
