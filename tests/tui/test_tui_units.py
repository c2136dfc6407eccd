"""The TUI's plain-value parts: run listing, RunLog event folding, chart choice, the form model,
and the layering rule (the library never imports the app or textual)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_runs  # noqa: E402

from app import form  # noqa: E402
from app.charts import charts_for  # noqa: E402
from app.runlog import RunLog, exit_reason  # noqa: E402
from mlxpt.runs.listing import list_runs, pid_alive  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_listing_reads_runs_and_detects_dead_pids(tmp_path):
    root = make_runs(tmp_path / "runs")
    (root / "garbage").mkdir()  # not a run: no config/status
    broken = root / "20261125-140000-broken"
    broken.mkdir()
    (broken / "status.json").write_text("{not json")
    (broken / "config.json").write_text("[]")
    runs = {r.name: r for r in list_runs(root)}
    assert set(runs) == {
        "20261125-090000-sft", "20261125-100000-dpo", "20261125-110000-grpo",
        "20261125-120000-quick", "20261125-140000-broken",
    }  # fmt: skip
    assert runs["20261125-140000-broken"].status == "unknown"
    assert runs["20261125-110000-grpo"].last.startswith("reward ")
    assert runs["20261125-100000-dpo"].resumable and runs["20261125-100000-dpo"].step == 12
    (root / "20261125-100000-dpo" / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid()}))
    from mlxpt.runs.guards import RunLock

    # alive means a live pid that also holds the run's lock; the pid alone may be recycled
    assert {r.name: r.status for r in list_runs(root)}["20261125-100000-dpo"] == "crashed"
    with RunLock(root / "20261125-100000-dpo"):
        assert {r.name: r.status for r in list_runs(root)}["20261125-100000-dpo"] == "running"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert pid_alive(os.getpid()) and not pid_alive(child.pid) and not pid_alive(None)


def test_runlog_folds_the_event_protocol():
    log = RunLog("k")
    log.feed_line(
        json.dumps(
            {"event": "start", "run_dir": "/r/x", "method": "sft", "model": "m", "steps": 4, "resumed_from_step": 0}
        )
    )
    for s in (1, 2, 3):
        log.feed_line(json.dumps({"event": "step", "step": s, "loss": 1.0 / s, "lr": 0.1}))
    log.feed_line("a plain line")
    log.feed_line(
        json.dumps({"event": "samples", "step": 3, "samples": [{"prompt": "p", "completion": "c", "reward": 1.0}]})
    )
    assert log.status == "running" and log.last_step == 3 and log.samples[0]["step"] == 3
    assert "a plain line" in log.log
    # resuming from step 2 drops the steps that will be redone
    log.feed_line(
        json.dumps({"event": "start", "run_dir": "/r/x", "method": "sft", "steps": 4, "resumed_from_step": 2})
    )
    assert [s["step"] for s in log.steps] == [1, 2]
    log.finish(130, [])
    assert log.status == "interrupted" and "checkpoint saved" in log.exit_reason
    log.finish(-6, [])
    assert log.status == "crashed" and "SIGABRT" in log.exit_reason
    assert exit_reason(1, ["noise", "error E101: file not found (x.jsonl) - check the path"]).endswith("check the path")


def test_runlog_says_the_world_size_of_a_data_parallel_run():
    log = RunLog("k")
    start = {"event": "start", "run_dir": "/r/x", "method": "sft", "model": "m", "steps": 4, "memory_estimate_mb": 900}
    log.feed_line(json.dumps({**start, "world_size": 2}))
    assert log.world_size == 2 and "(sft, m, 2 ranks)" in log.log[0] and "900 MB per rank" in log.log[1]
    one = RunLog("k")
    one.feed_line(json.dumps(start))  # a single process (or a run from before world_size) says nothing of ranks
    assert one.world_size == 1 and "ranks" not in one.log[0] and "per rank" not in one.log[1]


def test_new_lines_survives_log_trimming():
    log = RunLog("k")
    for i in range(600):
        log.say(str(i))
    assert log.new_lines(598) == ["598", "599"] and len(log.new_lines(0)) == 500


def test_charts_follow_the_keys_present():
    sft = [{"step": 1, "loss": 1.0, "lr": 0.1, "tokens_per_s": 5.0, "peak_memory_mb": 1.0}]
    assert [s.title for s, _ in charts_for(sft, [])] == ["loss", "learning rate", "tokens/s", "peak memory (MB)"]
    grpo = [{"step": 1, "lr": 0.1, "reward_mean": 0.5, "reward_std": 0.1, "reward/correct": 1.0, "kl": 0.01}]
    titles = {s.title: series for s, series in charts_for(grpo, [])}
    assert {"reward mean ± std", "reward per function", "KL"} <= set(titles)
    assert [label for label, _, _ in titles["reward mean ± std"]] == ["mean", "+std", "-std"]
    assert titles["reward mean ± std"][1][2] == [0.6]
    assert titles["reward per function"][0][0] == "correct"
    assert "loss" not in titles  # no loss key: no loss chart


def test_form_uses_the_cli_config_and_round_trips():
    fields = {f.name: f for f in form.form_fields("sft")}
    assert fields["mask"].choices == ("assistant", "prompt", "none") and fields["rank"].help
    assert "beta" in {f.name for f in form.form_fields("dpo")}
    cfg, err = form.validate("sft", {"rank": "16", "steps": "7"})
    assert err is None and cfg.adapter.rank == 16 and cfg.train.steps == 7
    cfg, err = form.validate("sft", {"rank": "zero"})
    assert cfg is None and err.startswith("E502") and "rank" in err
    argv = form.to_argv("sft", {"rank": "16", "steps": "200", "trust_remote_code": True})
    assert argv == ["train", "sft", "--rank", "16", "--trust-remote-code", "--events", "json"]
    values = form.values_from_run_config({"method": "dpo", "pref": {"beta": 0.3}, "data_report": {"rows": 5}})
    assert values == {"beta": 0.3}


def test_library_never_imports_the_app_or_textual():
    for path in (ROOT / "mlxpt").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                allowed = path.name == "tui.py" and name == "app.main"  # the lazy `mlxpt tui` entry
                assert top not in ("textual", "textual_plotext") and (top != "app" or allowed), f"{path}: {name}"


def test_help_imports_neither_mlx_nor_textual():
    code = (
        "import sys\nfrom mlxpt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'textual', 'mlx_lm', 'app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().endswith("[]"), out.stdout[-300:]


def test_eval_results_file(tmp_path):
    from app.screens.eval import read_results

    rows = [
        {
            "strategy": "self-consistency",
            "n": n,
            "accuracy": a,
            "generated_tokens": 40 * n,
            "seconds": 0.3 * n,
            "label": lab,
        }
        for lab in ("base", "adapter")
        for n, a in ((4, 0.5), (1, 0.25))
    ]
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"results": rows}))
    series, lines, error = read_results(str(path))
    assert error is None and len(lines) == 5
    assert series == [
        ("self-consistency (base)", [1.0, 4.0], [0.25, 0.5]),
        ("self-consistency (adapter)", [1.0, 4.0], [0.25, 0.5]),
    ]
    path.write_text("[]")
    assert read_results(str(path))[2].startswith("E521")


def test_a_finished_child_is_not_read_twice_from_its_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = RunLog("k")
    start = {"event": "start", "run_dir": str(run), "method": "sft", "steps": 2, "resumed_from_step": 0}
    log.feed_line(json.dumps(start))
    for s in (1, 2):
        step = {"event": "step", "step": s, "loss": 1.0}
        log.feed_line(json.dumps(step))
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(step) + "\n")
    log.finish(0, [])
    assert not log.poll_files() and [s["step"] for s in log.steps] == [1, 2]
