"""Print the reliability scoreboard (RELIABILITY.md's form) from the JSON the suites write.

    MLXPT_RELIABILITY_JSON=reliability.json pytest -m reliability tests/reliability
    python bench/reliability_report.py reliability.json [--markdown]

Every number comes from the tests' own counts (tests/reliability/conftest.py); nothing is typed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lines(report: dict) -> list[str]:
    s = {k: dict(v) for k, v in report.get("suites", {}).items()}

    def get(suite: str, key: str) -> int:
        return int(s.get(suite, {}).get(key, 0))

    out = []
    if "bad_inputs" in s:
        n, fx, fz, cfg = (get("bad_inputs", k) for k in ("tried", "fixtures", "fuzzed", "config"))
        out.append(
            f"{n} bad inputs ({fx} fixtures + {fz} fuzzed + {cfg} config values) → "
            f"{get('bad_inputs', 'uncaught')} uncaught exceptions, {get('bad_inputs', 'accepted')} silently accepted"
        )
    if "kills" in s:
        k = get("kills", "kills")
        out.append(
            f"{k} kills ({get('kills', 'named')} at named points, {k - get('kills', 'named')} at random times) → "
            f"{get('kills', 'unloadable_latest')} unloadable latest checkpoints, {get('kills', 'lost')} completed "
            f"checkpoints lost, {get('kills', 'resumes_ok')}/{get('kills', 'resumes')} resumes succeed, "
            f"{get('kills', 'final_equal')}/{get('kills', 'chains')} final results equal to an uninterrupted run"
        )
    if "outputs" in s:
        out.append(
            f"{get('outputs', 'tried')} inputs given as an output (run, runs folder, inside the run, base model, "
            f"a symlink to the run; with --force) → {get('outputs', 'refused')} refused, "
            f"{get('outputs', 'intact')} left byte-identical"
        )
    if "destructive" in s:
        out.append(
            f"{get('destructive', 'tried')} writer x input cases (fuse, eval --out/--plot, data self-answers; run, "
            f"a file in it, runs root, model, data, symlinks) → {get('destructive', 'refused')} refused, "
            f"{get('destructive', 'intact')} with every input hash unchanged"
        )
    if "adversarial" in s:
        out.append(
            f"{get('adversarial', 'tried')} adversarial cases (FIFOs and sockets as outputs, long and relative "
            f"paths, edited run folders, pipes, MLXPT_HOME, SIGTERM, two fuses at once) → "
            f"{get('adversarial', 'ok')} as specified"
        )
    if "broken_files" in s:
        out.append(
            f"{get('broken_files', 'tried')} broken model and adapter files (truncated weights, no or bad "
            f"tokenizer, run or adapter folder as a model, adapter config not an object, truncated or NaN "
            f"adapter) → {get('broken_files', 'one_line')} one-line errors naming the file, 0 tracebacks"
        )
    if "writers" in s:
        out.append(
            f"{get('writers', 'resumes_tried')} resumes with no valid checkpoint → {get('writers', 'resumes_refused')} "
            f"refused with nothing touched; {get('writers', 'second_tried')} second writers → "
            f"{get('writers', 'second_refused')} refused with the pid; {get('writers', 'trust_tried')} run configs "
            f"asking for remote code → {get('writers', 'trust_refused')} not trusted"
        )
    if "resume" in s:
        out.append(
            f"{get('resume', 'positions')} interruption positions → {get('resume', 'equal')} resumed runs equal to "
            "the straight run (adapters, optimiser, RNG, metrics, data order)"
        )
    if "numerics" in s:
        j = get("numerics", "injected")
        out.append(
            f"{j} injected NaN/Inf faults → {get('numerics', 'caught')} caught before the update, "
            f"{get('numerics', 'non_finite_written')} non-finite tensors written"
        )
    if "disk_full" in s:
        d = get("disk_full", "points")
        out.append(
            f"{d} disk-full faults (every write point + ulimit -f) → {get('disk_full', 'exit3')} exit 3, "
            f"{get('disk_full', 'intact')} previous checkpoint intact, {get('disk_full', 'resumed')}/{d} resumes succeed"
        )
    if "signals" in s:
        out.append(
            f"{get('signals', 'runs')} signal runs (SIGINT/SIGTERM/SIGHUP once, SIGINT/SIGTERM twice) → "
            f"{get('signals', 'as_specified')} exited as specified"
        )
    if "rewards" in s:
        r, pol = get("rewards", "faulty"), max(1, get("rewards", "policies"))
        out.append(
            f"{r} faulty reward functions ({r // pol} kinds x {pol} policies) → {get('rewards', 'handled')} "
            f"handled per policy, {get('rewards', 'crashes')} crashes; {get('rewards', 'runs')} GRPO runs with a "
            f"faulty reward file → {get('rewards', 'runs_ok')} as specified, {get('rewards', 'failed_calls_logged')}/"
            f"{get('rewards', 'failed_calls')} failed calls logged with their completion"
        )
    if "security" in s:
        p = get("security", "payloads")
        out.append(f"{p} security payloads → {get('security', 'refused')} refused")
    if "static" in s:
        out.append(
            f"static check: {get('static', 'hits')} pickle/eval/exec calls in {get('static', 'files')} source files"
        )
    t = report.get("tests", {})
    out.append(
        f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped or "
        f"expected failures, in {report.get('duration_s', 0):.0f} s"
    )
    return out


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0] if args else "reliability.json")
    if not path.exists():
        print(f"no report at {path}: run `make reliability` first", file=sys.stderr)
        return 1
    report = json.loads(path.read_text())
    body = lines(report)
    if "--markdown" in argv:
        print(f"Reliability scoreboard ({report.get('date')}, `make reliability`):\n")
        print("\n".join(f"- {line}" for line in body))
    else:
        print(f"reliability scoreboard, {report.get('date')}")
        print("\n".join(f"  {line}" for line in body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
