"""Crash safety: a real training process on the tiny model (SFT, DPO with its reference cache, and
GRPO with its sampled completions) is SIGKILLed again and again, at random times and at named
points inside checkpointing, rotation, adapter export and resume, and resumed each time. After
every kill: the newest checkpoint verifies against its manifest and loads, the newest `keep`
completed checkpoints are all there, and the next resume starts from the newest. At the end: no
temp files, and the adapters, optimiser and RNG equal an uninterrupted run's."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxpt.runs import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from reliability.harness import assert_arrays_close, checkpoint_arrays, resume_args, step_of, temp_files, train_args

pytestmark = pytest.mark.reliability

STEPS, KEEP, RANDOM_KILLS = 72, 2, 24
# (name, fault spec): the process kills itself with SIGKILL at the first matching call, or after
# it ("kill-after"), or half way through a write ("kill-half").
NAMED = [
    ("mid-step, before the update", {"op": "apply", "nth": 2}),
    ("checkpoint: temp dir just created", {"op": "mkdir", "match": ".tmp-step", "action": "kill-after"}),
    ("checkpoint: torn adapters file", {"op": "write", "match": ".tmp-step-N/adapters", "action": "kill-half"}),
    ("checkpoint: between files", {"op": "create", "match": ".tmp-step-N/optimizer"}),
    ("checkpoint: state.json created empty", {"op": "create", "match": "/state.json", "action": "kill-after"}),
    ("checkpoint: torn manifest", {"op": "write", "match": "/manifest.json", "action": "kill-half"}),
    ("checkpoint: manifest written, not synced", {"op": "fsync", "match": "/manifest.json"}),
    ("checkpoint: complete, before publish", {"op": "rename", "match": "rename:checkpoints/step-N"}),
    ("checkpoint: published, before rotation", {"op": "rename", "match": "checkpoints/step-N", "action": "kill-after"}),
    ("rotation: old checkpoint hidden", {"op": "rename", "match": ".tmp-deleted", "action": "kill-after"}),
    (
        "rotation or clean-up: mid-delete of an old checkpoint",
        {"op": "rmtree", "match": ".tmp-deleted", "action": "kill-half"},
    ),
    ("adapter export: torn temp file", {"op": "write", "match": "<run>/.tmp-adapters", "action": "kill-half"}),
    ("adapter export: before rename", {"op": "replace", "match": "<run>/adapters.safetensors"}),
    ("adapter export: config before rename", {"op": "replace", "match": "<run>/adapter_config.json"}),
    ("status: before rename", {"op": "replace", "match": "<run>/status.json", "nth": 2}),
    ("metrics: torn line", {"op": "write", "match": "<run>/metrics.jsonl", "action": "kill-half"}),
    ("resume: during metrics trim", {"op": "replace", "match": "<run>/metrics.jsonl"}),
    ("resume: during config rewrite", {"op": "replace", "match": "<run>/config.json"}),
]


def run_chain(zygote, fresh_argv, runs: Path, plan, steps: int, rng: random.Random, tmp_path: Path):
    """Kill one process after another as `plan` says, each resuming the last; then finish the run.
    Returns (tally, run folder); every kill is checked on the spot."""
    run_dir = None
    completed: set[int] = set()  # steps whose checkpoint was reported complete
    tally = {"kills": 0, "named": 0, "unloadable_latest": 0, "lost": 0, "resumes_ok": 0, "not_reached": 0}
    for name, spec in plan:
        if run_dir is None:
            argv, expected_step = fresh_argv, 0
        else:
            argv = resume_args(run_dir)
            newest = latest_checkpoint(run_dir)
            expected_step = step_of(newest) if newest else 0
        # a random kill also dies before its third update at the latest, so that however fast the
        # machine, the random kills cannot use up the steps the named points need
        spec_now = {"op": "apply", "nth": 3} if spec is None else spec
        faults = {**spec_now, "action": spec_now.get("action", "kill"), "root": str(tmp_path)}
        child = zygote.spawn(argv, faults=faults)
        if spec is None:
            start = child.wait_event("start")
            assert start is not None, child.stderr()
            near_end = expected_step > steps - 12  # keep the run from finishing before the plan does
            time.sleep(rng.uniform(0.0, 0.05 if near_end else 0.35))
            child.kill()
        code = child.wait()
        events = child.events()
        starts = [e for e in events if e["event"] == "start"]
        if run_dir is not None:  # this process is the resume of the previous kill
            if starts:
                tally["resumes_ok"] += starts[0]["resumed_from_step"] == expected_step
            else:  # killed on purpose before its start event (clean-up, config rewrite): the next one shows
                tally["resumes_ok"] += code == -9
        if run_dir is None:  # killed before its start event: the only folder under `runs`
            run_dir = Path(starts[0]["run_dir"]) if starts else next(runs.iterdir())
        completed |= {e["step"] for e in events if e["event"] == "checkpoint"}
        if code != -9:
            tally["not_reached"] += 1
            assert code == 0, f"{name}: exit {code}: {child.stderr()[-2000:]}"
            break
        tally["kills"] += 1
        tally["named"] += spec is not None
        # the state a user finds after the crash
        listed = list_checkpoints(run_dir)
        if listed:
            newest = listed[-1]
            try:
                ok = verify_checkpoint(newest) and load_checkpoint(newest) is not None
            except Exception:  # noqa: BLE001 - counted, then asserted below
                ok = False
            tally["unloadable_latest"] += not ok
        present = {step_of(p) for p in listed if verify_checkpoint(p)}
        must_have = sorted(completed | present)[-KEEP:]
        tally["lost"] += len(set(must_have) - present)
        assert tally["unloadable_latest"] == tally["lost"] == 0, (name, [p.name for p in listed], completed)

    newest = latest_checkpoint(run_dir)
    final = zygote.run(resume_args(run_dir), timeout=300)
    start = final.start()
    tally["resumes_ok"] += bool(start) and start["resumed_from_step"] == (step_of(newest) if newest else 0)
    assert final.code == 0, final.stderr()
    return tally, run_dir


def record_and_check(scoreboard, tally: dict, run_dir: Path, ref_dir: Path, plan: list, seconds: float) -> None:
    leftovers = temp_files(run_dir)
    equal = True
    try:
        assert_arrays_close(checkpoint_arrays(ref_dir), checkpoint_arrays(run_dir), atol=1e-6)
        ra, rb = load_file(f"{ref_dir}/adapters.safetensors"), load_file(f"{run_dir}/adapters.safetensors")
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=0, atol=1e-6)
    except AssertionError:
        equal = False
    scoreboard.record(
        "kills",
        kills=tally["kills"],
        named=tally["named"],
        unloadable_latest=tally["unloadable_latest"],
        lost=tally["lost"],
        resumes=tally["kills"],
        resumes_ok=tally["resumes_ok"],
        temp_left=len(leftovers),
        chains=1,
        final_equal=int(equal),
        seconds=int(seconds),
    )
    assert tally["not_reached"] == 0, "a named point was not reached before the run finished"
    assert tally["kills"] == len(plan)
    assert tally["resumes_ok"] == tally["kills"], tally
    assert not leftovers, leftovers
    assert equal, "the killed-and-resumed run differs from the uninterrupted one"


def test_sigkill_anywhere_then_resume_equals_uninterrupted(zygote, tiny_model, small_data, tmp_path, scoreboard):
    # checkpoint frequency changes nothing numerically: the reference saves once, at the end
    ref = zygote.run(train_args(tiny_model, small_data, tmp_path / "ref", STEPS, save_every=STEPS), timeout=300)
    assert ref.code == 0, ref.stderr()
    rng = random.Random(8)
    plan = [("random", None)] * 3 + [(name, spec) for name, spec in NAMED]
    plan += [("random", None)] * (RANDOM_KILLS - 3)
    rng.shuffle(plan[3:])
    t0 = time.monotonic()
    fresh = train_args(tiny_model, small_data, tmp_path / "runs", STEPS, keep=KEEP, name="crash")
    tally, run_dir = run_chain(zygote, fresh, tmp_path / "runs", plan, STEPS, rng, tmp_path)
    record_and_check(scoreboard, tally, run_dir, Path(ref.start()["run_dir"]), plan, time.monotonic() - t0)


DPO_STEPS = 30
DPO_NAMED = [  # the reference log-prob cache is written once, before the first step
    ("dpo reference cache: torn write", {"op": "write", "match": "<run>/.tmp-reference_logps", "action": "kill-half"}),
    ("dpo reference cache: before rename", {"op": "replace", "match": "<run>/reference_logps.safetensors"}),
    ("dpo reference cache: just written", {"op": "replace", "match": "<run>/reference_logps", "action": "kill-after"}),
]


def test_dpo_sigkill_then_resume_equals_uninterrupted(zygote, tiny_model, pref_data, tmp_path, scoreboard):
    ref = zygote.run(train_args(tiny_model, pref_data, tmp_path / "ref", DPO_STEPS, method="dpo", save_every=99))
    assert ref.code == 0, ref.stderr()
    rng = random.Random(9)
    plan = DPO_NAMED + [("random", None)] * 6 + [NAMED[7], NAMED[9]] + [("random", None)] * 2
    t0 = time.monotonic()
    fresh = train_args(tiny_model, pref_data, tmp_path / "runs", DPO_STEPS, method="dpo", keep=KEEP)
    tally, run_dir = run_chain(zygote, fresh, tmp_path / "runs", plan, DPO_STEPS, rng, tmp_path)
    record_and_check(scoreboard, tally, run_dir, Path(ref.start()["run_dir"]), plan, time.monotonic() - t0)


GRPO_STEPS = 20
GRPO_NAMED = [
    ("grpo samples: torn line", {"op": "write", "match": "<run>/samples.jsonl", "action": "kill-half", "nth": 5}),
    ("grpo metrics: torn line", {"op": "write", "match": "<run>/metrics.jsonl", "action": "kill-half", "nth": 2}),
]


def test_grpo_sigkill_then_resume_equals_uninterrupted(zygote, tiny_model, grpo_prompts, tmp_path, scoreboard):
    """Sampling included: the resumed run draws the same completions, so even the logged samples
    equal the uninterrupted run's, line for line (torn lines and redone steps trimmed)."""
    from mlxpt.runs import read_jsonl

    reward = tmp_path / "chars.py"
    reward.write_text("def chars(prompt, completion, **row):\n    return (len(completion) % 7) / 7\n")
    flags = {
        "method": "grpo", "num_generations": 4, "max_completion_length": 8, "beta": 0.04, "num_iterations": 2,
        "rewards": f"{reward}:chars", "log_completions_every": 1, "warmup_steps": 0,
    }  # fmt: skip
    ref = zygote.run(train_args(tiny_model, grpo_prompts, tmp_path / "ref", GRPO_STEPS, save_every=99, **flags))
    assert ref.code == 0, ref.stderr()
    rng = random.Random(10)
    plan = GRPO_NAMED + [("random", None)] * 4 + [NAMED[0], NAMED[7], NAMED[9]] + [("random", None)] * 2
    t0 = time.monotonic()
    fresh = train_args(tiny_model, grpo_prompts, tmp_path / "runs", GRPO_STEPS, keep=KEEP, **flags)
    tally, run_dir = run_chain(zygote, fresh, tmp_path / "runs", plan, GRPO_STEPS, rng, tmp_path)
    ref_dir = Path(ref.start()["run_dir"])
    record_and_check(scoreboard, tally, run_dir, ref_dir, plan, time.monotonic() - t0)
    assert read_jsonl(run_dir / "samples.jsonl") == read_jsonl(ref_dir / "samples.jsonl")
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "step"]
    assert steps == list(range(1, GRPO_STEPS + 1))
