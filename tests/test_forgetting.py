"""The forgetting monitor (train/regression.py): the regression set, the numbers it logs at each
evaluation, the warning on a drop against step 0, and a tiny model that forgets."""

from __future__ import annotations

import json

import pytest
from tiny import make_model, run_config

from mlxpt.config import SFTConfig
from mlxpt.errors import DataError
from mlxpt.train.regression import ForgettingMonitor, Probe, ProbeRow, load_probe


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_general_probe_has_scored_and_kl_rows():
    probe = load_probe("general", 24)
    assert len(probe.accuracy_rows) == 24 and all(r.answer for r in probe.accuracy_rows)
    assert probe.kl_rows and all(r.reply for r in probe.kl_rows)
    assert any(r.answer is None for r in probe.kl_rows), "plain instructions come first in the KL rows"
    assert all("ood" in r.where for r in probe.accuracy_rows)


@pytest.mark.parametrize("spec", ["none", "off", "", "None"])
def test_regression_data_off(spec):
    assert load_probe(spec, 24) is None


def test_bad_regression_data_is_one_line_per_row(tmp_path):
    with pytest.raises(DataError) as e:
        load_probe(str(tmp_path / "missing.jsonl"), 4)
    assert e.value.code == "E165" and "missing.jsonl" in e.value.line()
    bad = _write(tmp_path / "r.jsonl", [
        {"prompt": "2+2?", "answer": "4"},
        "{not json",
        {"prompt": "no answer, no reply"},
        {"messages": [{"role": "assistant", "content": "only a reply"}]},
        {"prompt": "x", "answer": ["a"]},
    ])  # fmt: skip
    with pytest.raises(DataError) as e:
        load_probe(str(bad), 4)
    assert [x.where.rsplit(":", 1)[1] for x in e.value.errors] == ["2", "3", "4", "5"]
    assert [x.code for x in e.value.errors] == ["E105", "E166", "E166", "E166"]


class _Emit(list):
    def __call__(self, event):
        self.append(event)


def _monitor(warn=5.0):
    emit = _Emit()
    mon = ForgettingMonitor.__new__(ForgettingMonitor)
    mon.probe, mon.tokenizer, mon.warn, mon.emit = Probe([], "x"), None, warn, emit
    mon.baseline, mon.warned_at = None, None
    return mon, emit


def test_warns_once_per_drop_of_forgetting_warn_points():
    mon, emit = _monitor(5.0)
    mon._check(0, 40.0)
    mon._check(10, 36.0)  # 4 points: no warning
    assert emit == []
    mon._check(20, 34.0)  # 6 points: a warning and an event
    assert [e["event"] for e in emit] == ["forgetting", "warning"]
    assert emit[0]["drop"] == pytest.approx(6.0) and "6.0 points below step 0" in emit[1]["message"]
    mon._check(30, 33.0)  # 7: not yet 5 more than the last warning
    assert len(emit) == 2
    mon._check(40, 28.0)  # 12: again
    assert len(emit) == 4 and emit[2]["drop"] == pytest.approx(12.0)


def test_warning_off_and_no_baseline():
    mon, emit = _monitor(0.0)
    mon._check(0, 50.0)
    mon._check(5, 0.0)
    assert emit == []
    mon, emit = _monitor(5.0)
    mon._check(5, 0.0)  # a resumed run without step 0's numbers has nothing to compare with
    assert emit == [] and mon.baseline is None


def test_probe_rows_keep_prompt_and_reply(tmp_path):
    path = _write(tmp_path / "r.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}], "answer": 3},
        {"prompt": "P", "system": "S2", "answer": "4"},
    ])  # fmt: skip
    probe = load_probe(str(path), 8)
    a, b = probe.rows
    assert a == ProbeRow([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "3", "A", a.where)
    assert b.messages == [{"role": "system", "content": "S2"}, {"role": "user", "content": "P"}] and b.reply is None
    assert probe.kl_rows == [a] and probe.accuracy_rows == [a, b]


QUESTIONS = ["red?", "sky?", "two?", "cat?"]


def _rows(answers):
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": a}
        for q, a in zip(QUESTIONS, answers, strict=True)
    ]


def _train(cfg, events):
    from mlxpt.train.methods import run_method

    run_dir, outcome = run_method("sft", cfg, emit=events.append)
    assert outcome == "finished"
    return run_dir


@pytest.fixture(scope="module")
def knowing_base(tmp_path_factory):
    """A tiny model that answers QUESTIONS with 1, 2, 3, 4: trained, then fused into a base."""
    from mlxpt.cli import main

    tmp = tmp_path_factory.mktemp("forget")
    data = tmp / "know"
    data.mkdir()
    _write(data / "train.jsonl", _rows("1234") * 4)
    cfg = run_config(SFTConfig, make_model(tmp / "tiny"), data, tmp, steps=80, learning_rate=5e-3, rank=16)
    run = _train(cfg, [])
    assert main(["fuse", str(run), "--out", str(tmp / "base")]) == 0
    return tmp / "base", _write(tmp / "probe.jsonl", _rows("1234"))


def test_a_tiny_model_that_forgets_is_seen_and_warned_about(knowing_base, tmp_path):
    """Step 0 is the base (100 % on the probe, KL 0); training on conflicting answers drops the
    probe accuracy, raises the KL to the base, and emits the forgetting event and warning; the
    numbers land in metrics.jsonl for the TUI's charts."""
    base, probe = knowing_base
    data = tmp_path / "other"
    data.mkdir()
    _write(data / "train.jsonl", _rows("9876") * 4)
    cfg = run_config(SFTConfig, base, data, tmp_path, steps=40, learning_rate=5e-3, rank=16, eval_every=20,
                     regression_data=str(probe), forgetting_warn=10)  # fmt: skip
    events = []
    run = _train(cfg, events)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[0]["regression_accuracy"] == 100.0 and evals[0]["regression_kl"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["regression_accuracy"] <= 50.0 and evals[-1]["regression_kl"] > 0.1
    forgetting = [e for e in events if e["event"] == "forgetting"]
    assert forgetting and forgetting[0]["baseline"] == 100.0
    assert any(e["event"] == "warning" and "forgetting" in e["message"] for e in events)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["event"] == "eval" and "regression_accuracy" in r] == [0, 20, 40]
    assert any(r["event"] == "forgetting" for r in logged)
    from app.charts import charts_for

    titles = [s.title for s, _ in charts_for([r for r in logged if r["event"] == "step"],
                                              [r for r in logged if r["event"] == "eval"])]  # fmt: skip
    assert titles[:3] == ["loss", "forgetting: regression accuracy %", "forgetting: KL to base (regression set)"]


def test_numpy_backend_monitor_matches_mlx(knowing_base, tmp_path):
    """The reference backend scores the same probe the same way (greedy one by one, KL by hand)."""
    base, probe = knowing_base
    got = {}
    for backend in ("mlx", "numpy"):
        events = []
        cfg = run_config(SFTConfig, base, probe.parent / "know", tmp_path / backend, steps=2, learning_rate=1e-2,
                         regression_data=str(probe), backend=backend, eval_every=1)  # fmt: skip
        _train(cfg, events)
        got[backend] = [(e["regression_accuracy"], e["regression_kl"]) for e in events if e["event"] == "eval"]
    assert [a for a, _ in got["mlx"]] == [a for a, _ in got["numpy"]]
    assert [k for _, k in got["mlx"]] == pytest.approx([k for _, k in got["numpy"]], rel=1e-3, abs=1e-6)
