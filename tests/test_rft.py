"""Rejection-sampling fine-tuning (`mlxpt train rft`) on the tiny random model: the acceptance rule,
rounds and their metrics, resume (Ctrl-C at and inside a round, SIGKILL mid-sampling), empty
rounds, --from chaining, and bad settings and data refused before any run folder exists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
from test_train import _load_state

from mlxpt.config import RFTConfig, build_config
from mlxpt.config.rft import round_plan
from mlxpt.errors import ConfigError, DataError, MlxptError
from mlxpt.train.rft import ROUNDS_DIR, round_prompts, run_rft, select

ROOT = Path(__file__).resolve().parents[1]
# accepts about half of the tiny model's random completions; sleeps under RFT_SLOW_REWARD so a
# subprocess can be killed in the middle of a round's sampling
REWARD = (
    "import os, time\n"
    "def even(prompt, completion, **row):\n"
    "    time.sleep(float(os.environ.get('RFT_SLOW_REWARD', '0')))\n"
    "    return float(len(completion.encode()) % 2 == 0)\n"
    "def unhinted(prompt, completion, **row):  # `even`, and 0 when the rationalization hint reached the reward\n"
    "    return float(len(completion.encode()) % 2 == 0 and 'The answer is' not in str(prompt))\n"
    "calls = [0]\n"
    "def late(prompt, completion, **row):  # nothing for the first 32 calls (one round), then everything\n"
    "    calls[0] += 1\n"
    "    return float(calls[0] > 32)\n"
    "def broken(prompt, completion, **row):  # fails on every call\n"
    "    raise ValueError('boom')\n"
)


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    return tiny.write_prompt_dir(tmp_path_factory.mktemp("prompts"), train=(8, 1), test=(4, 2))


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("rw") / "rules.py"
    f.write_text(REWARD)
    return f


def flags(reward_file, **kw) -> dict:
    base = {
        "steps": 4, "rounds": 2, "save_every": 1, "samples_per_prompt": 4, "max_completion_length": 8,
        "rewards": f"{reward_file}:even", "accept": 1.0, "keep_truncated": True, "batch_size": 2,
    }  # fmt: skip
    return {**base, **kw}


def cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, **kw):
    return tiny.run_config(RFTConfig, tiny_dir, prompt_dir, tmp_path, **flags(reward_file, **kw))


def assert_same_state(a_dir, b_dir):
    a, b = _load_state(a_dir)[0], _load_state(b_dir)[0]
    for group in ("adapters", "optimizer", "rng"):
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


# -- pure parts --------------------------------------------------------------------------------


def test_select_accepts_dedupes_and_caps():
    acc = {"accuracy": 1.0}
    results = [
        ([1, 2], "x = 4", False, 1.0, acc),
        ([3], " x = 4 ", False, 1.0, acc),  # the same text: one kept
        ([4], "wrong", False, 0.0, {"accuracy": 0.0}),
        ([5], "cut", True, 1.0, acc),  # no stop token: not kept by default
        ([6], "y", False, 1.0, acc),
        ([7], "z", False, 1.0, acc),
    ]
    out = select(results, None, keep=2)
    assert out["accepted"] == 5 and [k["ids"] for k in out["kept"]] == [[1, 2], [6]]
    assert [k["ids"] for k in select(results, None, keep=9, truncated_ok=True)["kept"]] == [[1, 2], [5], [6], [7]]
    # a threshold on the total reward instead of accuracy == 1
    assert select(results, 0.5, keep=9)["accepted"] == 5 and select(results, 1.5, keep=9)["accepted"] == 0
    assert select([([1], "a", False, 0.9, {"accuracy": None})], None, keep=1)["accepted"] == 0


def test_round_prompts_cover_every_prompt_before_repeating():
    assert round_prompts(5, 0, 0, 3) == [0, 1, 2, 3, 4]
    seen = round_prompts(10, 4, 7, 0) + round_prompts(10, 4, 7, 1) + round_prompts(10, 4, 7, 2)[:2]
    assert sorted(seen) == list(range(10))
    assert round_prompts(10, 4, 7, 1) == round_prompts(10, 4, 7, 1) != round_prompts(10, 4, 8, 1)


def test_round_plan_and_bad_settings_are_refused(tiny_dir, prompt_dir, tmp_path, reward_file):
    def plan(**kw):
        return round_plan(build_config("rft", kw))

    assert plan() == (3, 20) and plan(rounds=2) == (2, 30) and plan(steps_per_round=15) == (4, 15)
    assert plan(steps=30, rounds=3, steps_per_round=10) == (3, 10)
    for kw, code in (
        ({"rounds": 4, "steps_per_round": 10}, "E586"),  # 40 is not --steps 60
        ({"rounds": 7}, "E586"),  # 60 steps do not split in 7
        ({"samples_per_prompt": 0}, "E586"),
        ({"temperature": 0}, "E505"),
        ({"on_empty": "retry"}, "E503"),
        ({"strategy": "beam"}, "E503"),  # sample, step-beam or tree
        ({"step_aggregate": "mean"}, "E503"),
    ):
        with pytest.raises(ConfigError) as e:
            plan(**kw)
        assert e.value.code == code, (kw, e.value.line())
    runs = tmp_path / "runs"
    for kw, code in (
        ({"backend": "numpy"}, "E587"),
        ({"save_every": 3}, "E588"),  # rounds of 2 steps
        ({"accept": None}, "E589"),  # the default rule needs the accuracy reward
        ({"rewards": "nosuch"}, "E540"),
        # a step search's settings, checked before anything is read
        ({"strategy": "step-beam", "scorer": "nosuch"}, "E622"),
        ({"strategy": "tree", "expand": 0}, "E631"),
        ({"strategy": "step-beam", "max_steps": 0}, "E634"),
        ({"strategy": "step-beam", "scorer": f"prm:{tmp_path / 'no-run'}"}, "E628"),
    ):
        with pytest.raises(ConfigError) as e:
            run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, **kw))
        assert e.value.code == code, (kw, e.value.line())
    assert not runs.exists()  # refused before any run folder


def test_bad_prompt_data_is_refused_before_any_weights(tiny_dir, tmp_path, reward_file):
    from mlxpt.cli import main

    (tmp_path / "train.jsonl").write_text('{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "no answer"}\n')
    runs = tmp_path / "runs"
    argv = ["train", "rft", "--model", str(tiny_dir), "--data", str(tmp_path / "train.jsonl"), "--runs-dir", str(runs)]
    assert main(argv) == 1  # the accuracy reward (the default) needs every row's answer
    with pytest.raises(DataError):
        run_rft(tiny.run_config(RFTConfig, tiny_dir, tmp_path / "train.jsonl", tmp_path, save_every=1))
    assert main([*argv, "--rounds", "0", "--steps-per-round", "0", "--samples-per-prompt", "-1"]) == 1
    assert not runs.exists()


# -- runs ----------------------------------------------------------------------------------------


def test_rounds_sample_keep_train_and_report(tiny_dir, prompt_dir, tmp_path, reward_file):
    from mlxpt.backends.mlx_backend import MLXBackend

    captured, orig = {}, MLXBackend.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        captured["start"] = {k2: np.array(v) for k2, v in self._initial}

    events = []
    MLXBackend.__init__ = spy
    try:
        cfg = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, eval_every=2, eval_batches=1)
        run_dir, outcome = run_rft(cfg, emit=events.append)
    finally:
        MLXBackend.__init__ = orig
    assert outcome == "finished"
    final = _load_state(run_dir)[0]["adapters"]
    assert not [k for k, v in final.items() if np.array_equal(v, captured["start"][k])]
    rounds = [e for e in events if e["event"] == "round"]
    assert [(e["round"], e["step"]) for e in rounds] == [(1, 0), (2, 2)]
    for e in rounds:
        assert e["samples"] == 8 * 4 and 0 < e["kept"] <= 8 * 4 and e["kept_share"] == e["kept"] / 32
        assert 0 < e["pass_at_n"] <= 1
    saved = json.loads((run_dir / ROUNDS_DIR / "round-002.json").read_text())
    assert saved["stats"]["kept"] == rounds[1]["kept"] and len(saved["prompts"]) == 8
    assert not list((run_dir / ROUNDS_DIR).glob("*.part.jsonl"))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["event"] == "step"]
    assert [m["rft_round"] for m in steps] == [1, 1, 2, 2]
    assert steps[-1]["rft_kept_share"] == rounds[1]["kept_share"] and "rft_pass_at_n" in steps[0]
    evals = [m for m in metrics if m["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4] and "val_reward/even" in evals[0]
    # the TUI monitor charts the round metrics
    from app.charts import CHARTS, series_for

    charted = {label for spec in CHARTS for label, _, _ in series_for(spec, steps, evals)}
    assert {"rft_kept_share", "rft_pass_at_n"} <= charted


def test_step_search_rounds_keep_finished_solutions_as_generated(tiny_dir, prompt_dir, tmp_path, reward_file):
    """--strategy step-beam: each prompt's candidates are the search's solutions (at most N), kept
    as the ids the search generated (their text decodes from them), and a prompt's search finds
    the same solutions whatever chunk it is in (its own seed)."""
    from mlxpt.models.loader import load_tokenizer

    kw = {"strategy": "step-beam", "scorer": "logprob", "samples_per_prompt": 2, "expand": 2, "steps": 2,
          "rounds": 1, "save_every": 2, "eval_every": 0, "regression_data": "none"}  # fmt: skip
    events = []
    run_dir, outcome = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file, **kw), emit=events.append)
    assert outcome == "finished"
    saved = json.loads((run_dir / ROUNDS_DIR / "round-001.json").read_text())
    s = saved["stats"]
    assert 8 <= s["samples"] <= 8 * 2 and 0 < s["kept"] <= s["samples"] and s["gen_tokens"] > 0
    assert all(1 <= p["samples"] <= 2 for p in saved["prompts"])
    tok = load_tokenizer(str(tiny_dir))
    stops = set(getattr(tok, "eos_token_ids", None) or [tok.eos_token_id])
    for p in saved["prompts"]:
        for k in p["kept"]:
            ids = k["ids"][:-1] if k["ids"] and k["ids"][-1] in stops else k["ids"]
            assert tok.decode(ids) == k["text"] and len(ids) <= 8
    # one prompt a chunk: the same solutions, prompt by prompt
    other, _ = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "b", reward_file, sample_batch=1, **kw))
    again = json.loads((other / ROUNDS_DIR / "round-001.json").read_text())
    assert [p["kept"] for p in again["prompts"]] == [p["kept"] for p in saved["prompts"]]
    assert again["stats"]["samples"] == s["samples"]


@pytest.mark.parametrize(("reads", "saved_step"), [(5, 2), (7, 3)])
def test_resume_at_and_inside_a_round_equals_uninterrupted(
    tiny_dir, prompt_dir, tmp_path, reward_file, reads, saved_step
):
    """Stopped at the round boundary (round 2 already sampled) or inside round 2: the resumed run
    reads round 2's kept samples back instead of sampling again, and ends where the straight run does."""
    straight, _ = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file))
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", reward_file)
    part, outcome = run_rft(cfg, stop=tiny.StopAfter(reads))
    assert outcome == "interrupted" and _load_state(part)[1]["loop"]["step"] == saved_step
    kept = part / ROUNDS_DIR / "round-002.json"
    assert kept.exists()
    if saved_step == 3:  # inside round 2, without its kept samples: refused, not silently resampled
        kept.rename(kept.with_suffix(".moved"))
        with pytest.raises(MlxptError) as e:
            run_rft(cfg, resume_dir=part)
        assert e.value.code == "E593" and "round 2" in e.value.line()
        kept.with_suffix(".moved").rename(kept)
    events = []
    resumed, outcome = run_rft(cfg, resume_dir=part, emit=events.append)
    assert outcome == "finished"
    assert not [e for e in events if e["event"] == "progress"]  # nothing sampled again
    assert_same_state(straight, resumed)


def test_more_steps_at_resume_add_rounds_of_the_same_length(tiny_dir, prompt_dir, tmp_path, reward_file, capsys):
    """`--resume RUN --steps 8` of a 4-step, 2-round run once stretched round 2 over steps 3-6
    and added a round 3 beyond --rounds; now rounds keep their 2 steps: rounds 3 and 4 follow."""
    from mlxpt.cli import main

    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, save_every=2)
    run, outcome = run_rft(cfg)
    assert outcome == "finished"
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 0
    capsys.readouterr()
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = {m["step"]: m["rft_round"] for m in steps if m.get("event", "step") == "step" and "rft_round" in m}
    assert rounds == {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4}, rounds
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == 8 and saved["rft"]["steps_per_round"] == 2
    assert sorted(p.name for p in (run / ROUNDS_DIR).glob("round-*.json")) == [f"round-00{i}.json" for i in range(1, 5)]


@pytest.mark.parametrize(("reads", "saved_step"), [(1, 0), (5, 2)])
def test_resume_keeps_the_reward_failure_counts_and_log(tiny_dir, prompt_dir, tmp_path, reward_file, reads, saved_step):
    """A reward that fails on every call (abstained), validation at every step. Stopped in round 1's
    first step (step 0 saved: its validation is done again) or in round 2's (step 2 saved, round 2
    sampled): the resumed run reads the round back without calling the rewards, and ends with the
    straight run's counts, failure lines and metrics (step 0's validation once)."""
    from mlxpt.train.grpo import FAILURES_FILE

    kw = {"rewards": f"{reward_file}:even,{reward_file}:broken", "max_reward_failure_rate": 1.0, "eval_every": 1}
    straight, _ = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file, **kw))
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", reward_file, **kw)
    part, outcome = run_rft(cfg, stop=tiny.StopAfter(reads))
    assert outcome == "interrupted" and _load_state(part)[1]["loop"]["step"] == saved_step
    resumed, _ = run_rft(cfg, resume_dir=part)
    counts = [_load_state(run)[1]["task"]["reward_counts"] for run in (straight, resumed)]
    assert counts[0] == counts[1] and counts[0][0]["failures"]["broken"] == 2 * 32 + 5 * 4  # rounds, validations

    def lines(run, name, keys):
        rows = [json.loads(x) for x in (run / name).read_text().splitlines()]
        return sorted(json.dumps({k: r.get(k) for k in keys}, sort_keys=True) for r in rows)

    keys = ("step", "round", "reward", "prompt", "completion")  # a step-0 resume writes step 0's lines after round 1's
    assert lines(resumed, FAILURES_FILE, keys) == lines(straight, FAILURES_FILE, keys)

    def metrics(run):
        return [(m["event"], m["step"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert metrics(resumed) == metrics(straight)


def test_resume_stops_at_the_reward_failure_rate_where_the_straight_run_does(
    tiny_dir, prompt_dir, tmp_path, reward_file
):
    """A reward that fails on every call, 8 calls a round, the rate checked from the 16th call on:
    the straight run stops (E549) in round 2. Resumed inside round 1 (read back, no calls), the run
    must stop in round 2 too (it once counted from 0 again and stopped only in round 3)."""
    kw = {"steps": 6, "rounds": 3, "prompts_per_round": 2, "rewards": f"{reward_file}:even,{reward_file}:broken",
          "max_reward_failure_rate": 0.5}  # fmt: skip
    straight, cfg = (cfg_for(tiny_dir, prompt_dir, tmp_path / x, reward_file, **kw) for x in "ab")
    tiny.assert_resume_stops_where_the_straight_run_does(run_rft, straight, cfg, 3, _load_state)  # step 1, round 1


def test_a_relative_reward_file_resumes_from_another_folder(tiny_dir, prompt_dir, tmp_path, reward_file, monkeypatch):
    """`--rewards rules.py:even` given relative is saved absolute (and used so from the start), so a
    resume inside round 2 from another folder, which holds another rules.py, calls the same
    function, reads round 2 back and ends where the straight run does."""
    from mlxpt.runs import read_config

    straight, _ = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file))
    base = {"model": str(tiny_dir), "data": str(prompt_dir), "runs_dir": str(tmp_path / "b" / "runs"),
            "eval_every": 0, "learning_rate": 1e-2, "warmup_steps": 0, "num_layers": -1, "max_seq_len": 256,
            "regression_data": "none"}  # fmt: skip
    monkeypatch.chdir(reward_file.parent)
    cfg = build_config("rft", {**base, **flags(reward_file, rewards="rules.py:even")})
    assert cfg.rft.rewards == f"{reward_file}:even"
    part, outcome = run_rft(cfg, stop=tiny.StopAfter(7))
    assert outcome == "interrupted" and read_config(part)["rft"]["rewards"] == f"{reward_file}:even"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rules.py").write_text("def even(prompt, completion, **row):\n    return 0.0\n")
    monkeypatch.chdir(elsewhere)
    events = []
    resumed = build_config(None, resume=str(part), resume_config=read_config(part))
    _, outcome = run_rft(resumed, resume_dir=part, emit=events.append)
    assert outcome == "finished" and not [e for e in events if e["event"] == "progress"]  # round 2 read back
    assert_same_state(straight, part)


def test_step_search_resume_inside_a_round_equals_uninterrupted(tiny_dir, prompt_dir, tmp_path, reward_file):
    """Stopped inside round 2 of a step-beam run: the resumed run reads the round's kept
    solutions back and ends where the straight run does."""
    kw = {"strategy": "step-beam", "scorer": "logprob", "samples_per_prompt": 2, "expand": 2}
    straight, _ = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file, **kw))
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", reward_file, **kw)
    part, outcome = run_rft(cfg, stop=tiny.StopAfter(7))
    assert outcome == "interrupted" and _load_state(part)[1]["loop"]["step"] == 3
    events = []
    resumed, outcome = run_rft(cfg, resume_dir=part, emit=events.append)
    assert outcome == "finished" and not [e for e in events if e["event"] == "progress"]
    assert_same_state(straight, resumed)


def test_rationalize_hints_only_failed_prompts_and_trains_without_the_hint(
    tiny_dir, prompt_dir, tmp_path, reward_file, monkeypatch
):
    """--rationalize (STaR): the prompts whose samples were all rejected are sampled again with
    "The answer is N." in their prompt; the rewards see the prompt without it (the `unhinted`
    reward rejects anything that saw the hint), and what they keep trains after the prompt's own
    tokens, never the hinted ones. A resumed run reads the hinted samples back."""
    import mlxpt.train.rft as rft
    from mlxpt.models.loader import load_tokenizer

    sampled, trained = [], []
    real_sample, real_collate = rft.sample_scored, rft.collate
    monkeypatch.setattr(
        rft, "sample_scored", lambda spec, ex, *a: sampled.append([e.tokens for e in ex]) or real_sample(spec, ex, *a)
    )
    monkeypatch.setattr(
        rft, "collate", lambda ex, pad: trained.extend(list(e.tokens) for e in ex) or real_collate(ex, pad)
    )
    kw = {"rationalize": True, "samples_per_prompt": 1, "rewards": f"{reward_file}:unhinted"}
    events = []
    run_dir, outcome = run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "a", reward_file, **kw), emit=events.append)
    assert outcome == "finished"
    tok = load_tokenizer(str(tiny_dir))
    rows = [json.loads(x) for x in (prompt_dir / "train.jsonl").read_text().splitlines()]
    saved = json.loads((run_dir / ROUNDS_DIR / "round-001.json").read_text())
    failed = [p for p in saved["prompts"] if not p["accepted"]]
    assert 0 < len(failed) < 8  # `even` on one sample each: some prompts fail, some do not
    for p in saved["prompts"]:
        assert ("hint_samples" in p) == (not p["accepted"])  # only the failed prompts are hinted
        assert all(k.get("hint") for k in p["kept"]) == (not p["accepted"]) or not p["kept"]
    s = saved["stats"]
    assert s["hinted"] == len(failed) and s["hint_samples"] == len(failed) and 0 < s["hint_kept"] <= len(failed)
    assert s["samples"] == 8 + len(failed) and s["pass_at_n"] == (8 - len(failed)) / 8
    assert s["accepted"] == 8 - len(failed) + s["hint_accepted"]  # every accepted draw, hinted ones too
    # round 1's second generation: the failed prompts, each with its answer as the hint
    hinted = [tok.decode(t) for t in sampled[1]]
    assert len(hinted) == len(failed)
    for text, p in zip(hinted, failed, strict=True):
        assert f"The answer is {rows[p['prompt']]['answer']}." in text
    # every trained row starts with an unhinted prompt; no hinted prompt is ever trained
    starts = {tuple(t) for t in sampled[0]}
    hinted_sets = {tuple(t) for t in sampled[1]}
    for row in trained:
        assert any(tuple(row[: len(t)]) == t for t in starts)
        assert not any(tuple(row[: len(t)]) == t for t in hinted_sets)
    said = [e for e in events if e["event"] == "round"][0]
    assert said["hinted"] == len(failed)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m["event"] == "step"]
    assert steps[0]["rft_hint_kept"] == s["hint_kept"]  # the TUI monitor charts it beside rft_kept
    from app.charts import CHARTS, series_for

    assert "rft_hint_kept" in {label for spec in CHARTS for label, _, _ in series_for(spec, steps, [])}
    # stopped inside round 2: the resumed run reads the hinted round back and ends where the straight run does
    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "b", reward_file, **kw)
    part, outcome = run_rft(cfg, stop=tiny.StopAfter(7))
    assert outcome == "interrupted"
    events = []
    resumed, outcome = run_rft(cfg, resume_dir=part, emit=events.append)
    assert outcome == "finished" and not [e for e in events if e["event"] == "progress"]
    assert_same_state(run_dir, resumed)


def test_rationalize_bad_settings_and_rows_without_an_answer(tiny_dir, prompt_dir, tmp_path, reward_file):
    """A hint without {answer} (or with another field, or an unpaired brace), --rationalize with
    a step search, and prompt rows without an answer are refused before any run folder; a run
    that does not rationalize samples as before (its round files stay valid: the hint is not
    in their fingerprint)."""
    from mlxpt.cli import main

    for kw in (
        {"hint": "Think hard."},
        {"hint": "The answer is {answer}, not {other}."},
        {"hint": "The answer is {answer"},
        {"strategy": "step-beam", "scorer": "logprob"},
    ):
        with pytest.raises(ConfigError) as e:
            run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, rationalize=True, **kw))
        assert e.value.code == "E592", (kw, e.value.line())
    # the `even` reward does not read answers; the hint does
    (tmp_path / "train.jsonl").write_text('{"prompt": "What is 2+2?"}\n')
    runs = tmp_path / "runs"
    argv = ["train", "rft", "--model", str(tiny_dir), "--data", str(tmp_path / "train.jsonl"), "--runs-dir", str(runs),
            "--rewards", f"{reward_file}:even", "--accept", "1"]  # fmt: skip
    assert main([*argv, "--rationalize"]) == 1
    assert main([*argv, "--rationalize", "--hint", "no field"]) == 1
    assert not runs.exists()
    from mlxpt.train.rft import RFTTask

    fps = []
    for hint in ("The answer is {answer}.", "Answer: {answer}"):
        t = RFTTask.__new__(RFTTask)
        t.cfg = cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, hint=hint)
        t.r = t.cfg.rft
        fps.append(t._fingerprint([], 0, 0))
    assert fps[0] == fps[1]


def test_a_round_that_accepts_nothing_stops_or_continues(tiny_dir, prompt_dir, tmp_path, reward_file):
    from mlxpt.runs import read_status

    cfg = cfg_for(tiny_dir, prompt_dir, tmp_path / "stop", reward_file, accept=2.0)  # `even` gives at most 1
    with pytest.raises(MlxptError) as e:
        run_rft(cfg)
    assert e.value.code == "E590" and "round 1 kept none of its 32 samples (0 accepted" in e.value.line()
    assert "--resume" in e.value.line() and "--accept" in e.value.line()
    run_dir = next((tmp_path / "stop" / "runs").iterdir())
    assert read_status(run_dir)["status"] == "failed" and _load_state(run_dir)[1]["loop"]["step"] == 0
    assert json.loads((run_dir / ROUNDS_DIR / "round-001.json").read_text())["stats"]["kept"] == 0
    # continue: round 1 (the first 32 reward calls) is empty, round 2 trains steps 1-2 in its place
    events = []
    cfg = cfg_for(
        tiny_dir, prompt_dir, tmp_path / "go", reward_file, rewards=f"{reward_file}:late", on_empty="continue"
    )
    run_dir, outcome = run_rft(cfg, emit=events.append)
    assert outcome == "finished"
    assert [(e["round"], e["step"], e["kept"] > 0) for e in events if e["event"] == "round"] == [
        (1, 0, False), (2, 0, True), (3, 2, True)
    ]  # fmt: skip
    assert any("round 1 kept none" in e["message"] for e in events if e["event"] == "warning")
    # every round empty: `rounds` of them in a row stop the run even under continue
    with pytest.raises(MlxptError) as e:
        run_rft(cfg_for(tiny_dir, prompt_dir, tmp_path / "never", reward_file, accept=2.0, on_empty="continue"))
    assert e.value.code == "E591"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_signal_during_sampling_resumes_where_it_stopped(tiny_dir, prompt_dir, tmp_path, reward_file, sig):
    """A process killed while sampling round 2 (one prompt a chunk), or Ctrl-C'd there (it stops
    at the next chunk, not after the round: exit 130, status interrupted at round 2's first step):
    the resumed run reads the finished chunks back, samples the rest and ends where an
    uninterrupted run does."""
    kw = flags(reward_file, sample_batch=1, eval_every=0, regression_data="none", learning_rate=1e-2, num_layers=-1)
    kw.update(model=str(tiny_dir), data=str(prompt_dir), max_seq_len=256, warmup_steps=0)
    straight, _ = run_rft(build_config("rft", {**kw, "runs_dir": str(tmp_path / "a")}))
    argv = ["train", "rft", "--events", "json", "--runs-dir", str(tmp_path / "b")]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    # the same BLAS threads as this process: the resumed half runs here (reduction order, exact resume)
    env = {**os.environ, "RFT_SLOW_REWARD": "0.03"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxpt.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline, run_dir = time.monotonic() + 120, None
    try:
        for line in proc.stdout:
            e = json.loads(line) if line.startswith("{") else {}
            run_dir = Path(e["run_dir"]) if e.get("event") == "start" else run_dir
            if e.get("event") == "progress" and e.get("round") == 2 and e["done"] >= 3:
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline
        if sig == signal.SIGINT:  # it stops by itself at the next chunk, long before the round's 8
            rest = [json.loads(x) for x in proc.communicate(timeout=60)[0].splitlines() if x.startswith("{")]
    finally:
        proc.kill()
        proc.wait(30)
    assert run_dir is not None
    chunks = len((run_dir / ROUNDS_DIR / "round-002.part.jsonl").read_text().splitlines())
    assert chunks >= 3
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        from mlxpt.runs import read_status

        assert proc.returncode == 130 and chunks < 8, (proc.returncode, chunks)
        said = [e["message"] for e in rest if e.get("event") == "progress"]
        assert said and said[-1].startswith(f"round 2: sampling stopped after {chunks}/8 chunks"), said
        assert read_status(run_dir)["status"] == "interrupted" and read_status(run_dir)["step"] == 2
    events = []
    from mlxpt.runs import read_config

    cfg = build_config(None, resume=str(run_dir), resume_config=read_config(run_dir))
    _, outcome = run_rft(cfg, resume_dir=run_dir, emit=events.append)
    assert outcome == "finished"
    back = [e for e in events if e["event"] == "progress" and "read back" in e["message"]]
    assert back and back[0]["round"] == 2 and back[0]["done"] >= 3
    assert_same_state(straight, run_dir)


def test_from_an_sft_run(tiny_dir, data_dir, prompt_dir, tmp_path, reward_file):
    from mlxpt.config import SFTConfig
    from mlxpt.train.sft import run_sft

    sft, _ = run_sft(tiny.run_config(SFTConfig, tiny_dir, data_dir, tmp_path / "sft", steps=2, rank=4))
    events = []
    run_dir, outcome = run_rft(
        cfg_for(tiny_dir, prompt_dir, tmp_path, reward_file, steps=2, rounds=1, from_run=str(sft)), emit=events.append
    )
    assert outcome == "finished"
    start = next(e for e in events if e["event"] == "start")
    assert start["from_run"] == str(sft)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["lineage"]["method"] == "sft" and saved["adapter"]["rank"] == 4
