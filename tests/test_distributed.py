"""Data-parallel training (mlxpt/train/distributed.py): 2 ranks of the ring backend on loopback,
started by mlx.launch, on the tiny model. Every process runs with OPENBLAS_NUM_THREADS=1.

2 ranks x (global) batch 4 -- 2 rows a rank -- equal 1 rank x batch 4 after 5 steps (adapters,
optimiser state and logged losses within 1e-6); resume 2 -> 1 and 1 -> 2 equal the straight run;
a signal to rank 1 stops both at one step with one checkpoint; a rank killed with -9 makes rank 0
exit with one line and a checkpoint that resumes; bad inputs are refused on every rank. RFT
(rounds sampled in waves over the ranks) and distillation (token level with a top-k cache and
on-policy batches, sequence level) equal one rank too, their files written once by rank 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from mlxpt.train.dpo import REFERENCE_FILE

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TOL = 1e-6
REWARD = (
    "def even(prompt, completion, **row):\n    return float(len(completion) % 2)\n\n\n"
    "def halfflat(prompt, completion, **row):  # the same for every completion of half the prompts\n"
    "    return 0.5 if sum(map(ord, prompt)) % 2 else (sum(map(ord, completion)) % 7) / 7\n"
)


def _port() -> int:
    """A free port and the one after it (the ring's two ranks)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return p
    raise RuntimeError("no two free ports")


def command(argv: list[str], ranks: int) -> list[str]:
    """`mlxpt train argv`, on `ranks` ranks through mlx.launch as `--ranks` runs it (mlxpt.launch)."""
    me = [sys.executable, "-m", "mlxpt.cli", "train", *argv]
    if ranks == 1:
        return me
    launch = [sys.executable, "-m", "mlxpt.launch"]
    return [*launch, "-n", str(ranks), "--backend", "ring", "--starting-port", str(_port()), "--", *me]


def quiet_stdin() -> int:
    """A stdin that never has data nor ends: mlx.launch polls its stdin, and on /dev/null (always
    readable) that poll spins a CPU core the ranks need."""
    r, w = os.pipe()
    _KEEP.append(w)
    return r


_KEEP: list[int] = []  # their write ends, closed once the module is done


@pytest.fixture(scope="module", autouse=True)
def _close_pipes():
    yield
    while _KEEP:
        os.close(_KEEP.pop())


def start_ranks(argvs: list[list[str]], tmp: Path) -> list[subprocess.Popen]:
    """One process a rank, given the environment mlx.launch gives them (MLX_RANK and the ring's
    MLX_HOSTFILE) but without mlx.launch: its polling loop keeps a core busy that a 2-core CI
    machine needs for the ranks. (The fault tests and `--ranks` go through mlx.launch.)"""
    port = _port()
    hosts = tmp / f"hosts-{port}.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(argvs))]))
    return [
        subprocess.Popen(
            command(argv, 1),
            cwd=ROOT,
            env={**ENV, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank, argv in enumerate(argvs)
    ]


def train(argv: list[str], ranks: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mlxpt train argv` on 1 or 2 ranks: rank 0's stdout, every rank's stderr, the first
    non-zero exit status (else 0)."""
    if ranks == 1 or "--ranks" in argv:
        stdin = quiet_stdin()
        try:
            return subprocess.run(
                command(argv, 1), cwd=ROOT, env=ENV, stdin=stdin, capture_output=True, text=True, timeout=timeout
            )
        finally:
            os.close(stdin)
    with tempfile.TemporaryDirectory() as tmp:
        procs = start_ranks([argv] * ranks, Path(tmp))
        try:
            outs = [p.communicate(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                p.kill()
    code = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(argv, code, outs[0][0], "".join(err for _, err in outs))


def events(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


def flags(model, data, runs, **kw) -> list[str]:
    base = {
        "model": model, "data": data, "runs_dir": runs, "steps": 5, "batch_size": 4, "max_seq_len": 256,
        "eval_every": 0, "eval_batches": 2, "save_every": 1, "keep": 10, "learning_rate": 1e-4,
        "warmup_steps": 0, "num_layers": -1, "regression_data": "none", "events": "json",
    }  # fmt: skip
    out = []
    for k, v in {**base, **kw}.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def the_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found  # rank 1 made no folder of its own
    return found[0]


def state(run: Path, step: int | None = None) -> dict:
    from mlxpt.runs import latest_checkpoint, load_checkpoint

    ck = latest_checkpoint(run) if step is None else run / "checkpoints" / f"step-{step:08d}"
    arrays, saved = load_checkpoint(ck)
    return {
        **{f"{s}/{k}": v for s in ("adapters", "optimizer") for k, v in arrays[s].items()},
        "step": saved["loop"]["step"],
    }


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "step"]


def assert_same(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
    worst = max(float(np.abs(sa[k] - sb[k]).max()) for k in sa if k != "step")
    assert worst < TOL, worst
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == sa["step"]
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < TOL


def cut_back(run: Path, dest: Path, step: int) -> Path:
    """A copy of `run` as it stood at `step`: later checkpoints removed (resume trims the logs)."""
    shutil.copytree(run, dest)
    for ck in (dest / "checkpoints").iterdir():
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    return dest


@pytest.fixture(scope="module")
def sft(tiny_dir, data_dir, tmp_path_factory):
    """The straight SFT run on 1 rank and on 2 ranks (global batch 4 both), 5 steps, a checkpoint each."""
    base = tmp_path_factory.mktemp("sft")
    runs, starts = {}, {}
    for n in (1, 2):
        p = train(flags(tiny_dir, data_dir, base / f"r{n}"), n)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[n] = the_run(base / f"r{n}")
        starts[n] = next(e for e in events(p.stdout) if e["event"] == "start")
    return base, runs, starts


def test_sft_two_ranks_equal_one(sft):
    _, runs, starts = sft
    assert_same(runs[1], runs[2])
    # the ranks load the BLAS a single process does (mlx imported after mlxpt's BLAS choice)
    assert starts[2]["blas"] == starts[1]["blas"] and starts[2]["world_size"] == 2
    status = json.loads((runs[2] / "status.json").read_text())
    assert status["status"] == "finished" and status["world_size"] == 2
    # a non-averaged gradient (one rank's shard) would move the adapters by ~lr: far above TOL
    assert max(float(np.abs(v).max()) for k, v in state(runs[2]).items() if k.startswith("adapters/")) > 1e-4


@pytest.mark.parametrize("ranks_before,ranks_after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_equals_straight(sft, ranks_before, ranks_after):
    base, runs, _ = sft
    run = cut_back(runs[ranks_before], base / f"cut{ranks_before}{ranks_after}", 3)
    p = train(["--resume", str(run), "--events", "json"], ranks_after)
    assert p.returncode == 0, p.stderr[-2000:]
    start = next(e for e in events(p.stdout) if e["event"] == "start")
    assert start["resumed_from_step"] == 3 and start["world_size"] == ranks_after
    assert_same(runs[1], run)


def test_dpo_two_ranks_equal_one(tiny_dir, pref_dir, tmp_path):
    """Through the `--ranks 2` shortcut (mlx.launch -n 2 --backend ring): the reference pass is
    sharded by batches and gathered once."""
    runs = {}
    for n in (1, 2):
        argv = ["dpo", *flags(tiny_dir, pref_dir, tmp_path / f"r{n}", save_every=5)] + (
            ["--ranks", "2"] if n > 1 else []
        )
        p = train(argv, 1)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[n] = the_run(tmp_path / f"r{n}")
        assert (runs[n] / REFERENCE_FILE).exists()
    assert_same(runs[1], runs[2])


def grpo_on_one_and_two(tiny_dir, tmp_path, reward: str = "even", **kw) -> tuple[dict, dict]:
    """The same GRPO run on 1 and on 2 ranks (8 training prompts, 4 completions of up to 8
    tokens, lr 1e-3; `reward`: a function of REWARD): ({ranks: run}, {ranks: its step events})."""
    import tiny

    (tmp_path / "prompts").mkdir()
    prompts = tiny.write_prompt_dir(tmp_path / "prompts", train=(8, 1), test=(4, 2))
    (tmp_path / "rules.py").write_text(REWARD)
    # lr 1e-3: at 1e-2 Adam's first steps blow float32 rounding of GRPO's near-zero gradients up
    # to ~2e-6 between the two layouts (the samples and losses still agree)
    kw = {"rewards": f"{tmp_path / 'rules.py'}:{reward}", "num_generations": 4, "max_completion_length": 8,
          "eval_batches": 0, "learning_rate": 1e-3, **kw}  # fmt: skip
    runs, steps = {}, {}
    for n in (1, 2):
        p = train(["grpo", *flags(tiny_dir, prompts, tmp_path / f"r{n}", **kw)], n)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[n] = the_run(tmp_path / f"r{n}")
        steps[n] = [e for e in events(p.stdout) if e["event"] == "step"]
    assert_same(runs[1], runs[2])
    return runs, steps


def test_grpo_two_ranks_equal_one_and_resume_exactly(tiny_dir, tmp_path):
    """Each completion draws from keys of its own (the prompt's index in the data), so the ranks'
    groups are the groups one rank samples; a resume on 2 ranks is exact."""
    runs, steps = grpo_on_one_and_two(tiny_dir, tmp_path)
    assert len(steps[2]) == 5 and all(0.0 <= e["reward_mean"] <= 1.0 for e in steps[2])
    # both ranks' groups are in the step report (4 prompts x 4 completions): as on one rank
    for key in ("reward_mean", "reward_std", "completion_len_mean"):
        got = [(a.get(key), b.get(key)) for a, b in zip(steps[1], steps[2], strict=True)]
        assert all(x is not None and abs(x - y) < 1e-6 for x, y in got), (key, got)
    assert any(e["reward_std"] > 0 for e in steps[2])
    run = cut_back(runs[2], tmp_path / "cut", 3)
    p = train(["--resume", str(run), "--events", "json"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same(runs[1], run)


def test_grpo_two_ranks_resume_between_the_updates_of_a_window(tiny_dir, tmp_path):
    """mu = 2: step 3 is saved between the two updates of the window of steps 3-4, whose sampled
    completions both ranks reuse. The checkpoint holds every rank's share, so a resume there on 2
    ranks equals 1 rank's straight run; on another number of ranks it is refused (E554) and
    stays usable."""
    runs, _ = grpo_on_one_and_two(tiny_dir, tmp_path, num_iterations=2)
    for n, other in ((2, 1), (1, 2)):  # a window sampled on n ranks, resumed on the other number
        run = cut_back(runs[n], tmp_path / f"cut{n}", 3)
        before = state(run)
        p = train(["--resume", str(run), "--events", "json"], other)
        assert p.returncode == 1, p.stderr[-2000:]
        assert "E554" in p.stderr and f"resume it on {n} rank(s)" in p.stderr, p.stderr[-2000:]
        assert state(run)["step"] == 3 and all(np.array_equal(before[k], v) for k, v in state(run).items())
    run = tmp_path / "cut2"
    p = train(["--resume", str(run), "--events", "json"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same(runs[1], run)


def test_grpo_dynamic_sampling_two_ranks_equal_one(tiny_dir, tmp_path):
    """--dynamic-sampling on 2 ranks: each draw is split over them and their equal-reward flags
    gathered, so they train on the groups one rank trains on; with mu = 2, a resume between a
    window's updates on 2 ranks equals 1 rank's straight run."""
    kw = {"num_iterations": 2, "dynamic_sampling": 3, "beta": 0.0}
    runs, steps = grpo_on_one_and_two(tiny_dir, tmp_path, "halfflat", **kw)
    fills = [
        (a["draws"], a["kept_groups"], b["draws"], b["kept_groups"]) for a, b in zip(steps[1], steps[2], strict=True)
    ]
    assert all(x[:2] == x[2:] for x in fills) and any(x[0] > 1 for x in fills), fills
    run = cut_back(runs[2], tmp_path / "cut", 3)
    p = train(["--resume", str(run), "--events", "json"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same(runs[1], run)


def test_rft_two_ranks_equal_one_and_resume_exactly(tiny_dir, tmp_path):
    """A round's chunks (2 prompts each: 3 chunks) are sampled in waves over the ranks and
    gathered; rank 0 alone writes the round files. Every sample accepted, one kept a prompt, 5 of
    8 prompts a round: a kept set of 5 at batch 4, whose 1-row batch leaves rank 0 an empty shard
    (it adds a batch that trains nothing). A resume on 2 ranks inside round 2 reads it back."""
    import tiny

    (tmp_path / "prompts").mkdir()
    prompts = tiny.write_prompt_dir(tmp_path / "prompts", train=(8, 1), test=(4, 2))
    (tmp_path / "rules.py").write_text(REWARD)
    kw = {"rewards": f"{tmp_path / 'rules.py'}:even", "accept": 0.0, "samples_per_prompt": 4, "max_completion_length": 8,
          "steps": 4, "rounds": 2, "prompts_per_round": 5, "keep_per_prompt": 1, "sample_batch": 2, "grad_accum": 2,
          "eval_batches": 0}  # fmt: skip
    runs, rounds = {}, {}
    for n in (1, 2):
        p = train(["rft", *flags(tiny_dir, prompts, tmp_path / f"r{n}", **kw), "--keep-truncated"], n)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[n] = the_run(tmp_path / f"r{n}")
        rounds[n] = [e for e in events(p.stdout) if e["event"] == "round"]
    assert_same(runs[1], runs[2])
    assert [e["kept"] for e in rounds[2]] == [5, 5] and len(rounds[1]) == 2
    files = sorted(p.name for p in (runs[2] / "rft").iterdir())
    assert files == ["round-001.json", "round-002.json"], files  # no part file left, no second copy
    for name in files:  # the same samples, kept the same way
        a, b = (json.loads((runs[n] / "rft" / name).read_text()) for n in (1, 2))
        assert a["prompts"] == b["prompts"] and a["fingerprint"] == b["fingerprint"]
    run = cut_back(runs[2], tmp_path / "cut", 3)
    before = (run / "rft" / "round-002.json").stat().st_mtime_ns
    p = train(["--resume", str(run), "--events", "json"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not [e for e in events(p.stdout) if e["event"] == "round"]  # read back, not sampled again
    assert (run / "rft" / "round-002.json").stat().st_mtime_ns == before
    assert_same(runs[1], run)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_distill_two_ranks_equal_one(tiny_dir, data_dir, tmp_path, mode):
    """Token level: each rank scores its shard with the teacher; the teacher's top-k cache is
    computed by row batches over the ranks, gathered, written once by rank 0; on-policy batches
    sample keyed rows. Sequence level: the teacher's answers, chunks over the ranks, gathered,
    cached by rank 0. Both: 2 ranks equal 1, and the cached files are the same."""
    import tiny

    teacher = tiny.make_model(tmp_path / "teacher", seed=1)
    extra = {"teacher_cache": "top-k", "top_k": 16, "on_policy_ratio": 0.7, "grad_accum": 2}
    kw = {"teacher": teacher, "mode": mode, "steps": 3, "max_completion_length": 8, "eval_batches": 0,
          **(extra if mode == "token" else {})}  # fmt: skip
    runs, steps = {}, {}
    for n in (1, 2):
        p = train(["distill", *flags(tiny_dir, data_dir, tmp_path / f"r{n}", **kw)], n)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[n] = the_run(tmp_path / f"r{n}")
        steps[n] = [e for e in events(p.stdout) if e["event"] == "step"]
    assert_same(runs[1], runs[2])
    counts = [[(e["teacher_tokens"], e["on_policy_batches"]) for e in steps[n]] for n in (1, 2)]
    assert counts[0] == counts[1] and counts[1][-1][0] > 0, counts  # every rank's teacher tokens
    cache = runs[2] / "distill"
    if mode == "sequence":
        assert sorted(p.name for p in cache.iterdir()) == ["answers.json"]
        a, b = (json.loads((runs[n] / "distill/answers.json").read_text()) for n in (1, 2))
        assert a == b and len(a["answers"]) > 16  # two chunks of 16: one answered on each rank
        return
    assert 0 < counts[1][-1][1] < 6, counts  # some batches on-policy, some from the cache
    assert sorted(p.name for p in cache.iterdir()) == ["topk-16.json", "topk-16.safetensors"]
    from mlxpt.backends.numpy_weights import read_safetensors

    a, b = (read_safetensors(runs[n] / "distill/topk-16.safetensors") for n in (1, 2))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    # the 2-rank run resumed on 1 rank reads the cache back and ends where the straight run does
    run = cut_back(runs[2], tmp_path / "cut", 1)
    before = (run / "distill/topk-16.safetensors").stat().st_mtime_ns
    p = train(["--resume", str(run), "--events", "json"], 1)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run / "distill/topk-16.safetensors").stat().st_mtime_ns == before
    assert_same(runs[1], run)


def _rank_pid(runs: Path, rank: int, timeout: float = 60) -> int:
    """The pid of rank `rank` of the run writing to `runs` (its environment names the rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if str(runs) not in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    continue
                if f"MLX_RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    return int(d.name)
            except OSError:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} not found")


def _start(argv: list[str]) -> subprocess.Popen:
    stdin = quiet_stdin()
    try:
        return subprocess.Popen(
            command(argv, 2), cwd=ROOT, env=ENV, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(stdin)


def _until_step(proc: subprocess.Popen, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("event") == "step" and json.loads(line)["step"] >= step:
            return
        assert time.monotonic() < deadline
    raise AssertionError("the run ended early: " + proc.stderr.read()[-2000:])


def test_signal_to_rank_1_stops_both_with_one_checkpoint(tiny_dir, data_dir, tmp_path):
    """SIGTERM (SIGINT takes the same path) to rank 1 alone: both stop at one step, exit 130."""
    runs, sig = tmp_path / "runs", signal.SIGTERM
    proc = _start(flags(tiny_dir, data_dir, runs, steps=200, save_every=1000))
    try:
        _until_step(proc, 2)
        os.kill(_rank_pid(runs, 1), sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Node with rank 0 exited with code 130" in err and "Node with rank 1 exited with code 130" in err, err
    run = the_run(runs)
    cks = list((run / "checkpoints").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert len(cks) == 1 and status["status"] == "interrupted"
    assert state(run)["step"] == status["step"] == len(losses(run)) < 200


def _left(runs: Path) -> list[int]:
    """Live processes of the run writing to `runs` (the launcher and the ranks name it)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(runs) in (d / "cmdline").read_bytes().decode(errors="ignore"):
                if (d / "stat").read_text().split()[2] != "Z":
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def _ranks_shortcut(runs: Path, argv: list[str]) -> subprocess.Popen:
    """`mlxpt train argv --ranks 2`, in a session of its own (as a shell starts a job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlxpt.cli", "train", *argv, "--ranks", "2"], cwd=ROOT, env=ENV,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _end(proc: subprocess.Popen, runs: Path) -> None:
    proc.kill()
    for pid in _left(runs):  # a rank or launcher that outlived the test
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize(
    "sig,to", [("SIGTERM", "pid"), ("SIGHUP", "pid"), ("SIGINT", "pid"), ("SIGINT", "group")], ids=str
)
def test_a_signal_to_the_ranks_shortcut_stops_every_rank_at_a_checkpoint(tiny_dir, data_dir, tmp_path, sig, to):
    """SIGTERM/SIGHUP/SIGINT to `mlxpt train --ranks 2` (`kill PID`, a closed terminal; Ctrl-C is
    SIGINT to the group): passed on to the ranks once, so they stop at a checkpoint and exit 130,
    the resume line comes through, and no launcher or rank is left training (a SIGTERM used to
    orphan both ranks, still training and holding the run's lock)."""
    runs, signum = tmp_path / "runs", getattr(signal, sig)
    proc = _ranks_shortcut(runs, flags(tiny_dir, data_dir, runs, steps=10_000, save_every=1000))
    try:
        _until_step(proc, 2)
        os.kill(proc.pid, signum) if to == "pid" else os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=30)
        left = _left(runs)
    finally:
        _end(proc, runs)
    run = the_run(runs)
    status = json.loads((run / "status.json").read_text())
    assert proc.returncode == 130 and f"Resume with: mlxpt train --resume {run}" in err, (proc.returncode, err)
    assert "Traceback" not in err and not left, (left, err)
    assert status["status"] == "interrupted" and state(run)["step"] == status["step"] >= 2, status


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_second_signal_to_the_ranks_shortcut_exits_within_2s(tiny_dir, data_dir, tmp_path):
    from mlxpt.runs import latest_checkpoint, list_checkpoints, verify_checkpoint

    runs = tmp_path / "runs"
    proc = _ranks_shortcut(runs, flags(tiny_dir, data_dir, runs, steps=10_000, save_every=1))
    try:
        _until_step(proc, 2)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)  # apart: two signals at once are one (the kernel keeps one pending)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        proc.communicate(timeout=30)
        took = time.monotonic() - t0
        left = _left(runs)
    finally:
        _end(proc, runs)
    run = the_run(runs)
    assert proc.returncode == 130 and took < 2.0 and not left, (proc.returncode, took, left)
    assert latest_checkpoint(run) is not None and all(verify_checkpoint(p) for p in list_checkpoints(run))


def test_killed_rank_makes_rank_0_exit_with_one_line_and_resume_works(tiny_dir, data_dir, tmp_path):
    runs = tmp_path / "runs"
    proc = _start(flags(tiny_dir, data_dir, runs, steps=30, save_every=2))
    try:
        _until_step(proc, 3)
        os.kill(_rank_pid(runs, 1), signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
    lines = [x for x in err.splitlines() if "E725" in x]
    assert len(lines) == 1 and "rank 0: rank 1 is gone" in lines[0] and "--resume" in lines[0], err
    assert waited < 30
    run = the_run(runs)
    saved = state(run)["step"]
    status = json.loads((run / "status.json").read_text())  # not "running" with a dead pid
    assert status["status"] == "failed" and "E725" in status["error"] and status["step"] == saved, status
    assert saved >= 2
    p = train(["--resume", str(run), "--events", "json"], 1)
    assert p.returncode == 0, p.stderr[-2000:]
    start = next(e for e in events(p.stdout) if e["event"] == "start")
    assert start["resumed_from_step"] == saved and state(run)["step"] == 30


def test_bad_inputs_are_refused_on_every_rank(tiny_dir, data_dir, tmp_path, capsys):
    # --ranks 0 / -1: refused before anything starts
    from mlxpt.cli import main

    for n in ("0", "-1"):
        assert main(["train", "--ranks", n]) == 1
        err = capsys.readouterr().err
        assert "E724" in err and len(err.strip().splitlines()) == 1, err
    # the numpy backend has no collectives
    p = train(flags(tiny_dir, data_dir, tmp_path / "np", backend="numpy"), 2)
    assert p.stderr.count("E720") == 2 and not (tmp_path / "np").exists(), p.stderr
    # a batch that cannot give each rank a row: refused on both, said once (by rank 0), with a
    # batch size that works
    p = train(flags(tiny_dir, data_dir, tmp_path / "bs", batch_size=1), 2)
    assert p.returncode == 1 and not (tmp_path / "bs").exists(), p.stderr
    assert p.stderr.count("E723") == 1 and "use a batch size such as 2 " in p.stderr, p.stderr
    # different settings on the two ranks (started by hand: mlx.launch gives every rank one command)
    argvs = [flags(tiny_dir, data_dir, tmp_path / "mm", learning_rate=lr) for lr in (1e-4, 2e-4)]
    procs = start_ranks(argvs, tmp_path)
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "E722" in err and f"rank {rank}'s settings differ" in err, err
    assert not (tmp_path / "mm").exists()


def test_ranks_shortcut_exits_with_the_ranks_failure(tiny_dir, data_dir, tmp_path):
    """mlx.launch itself exits 0 whatever its ranks did: `--ranks` returns the ranks' status."""
    p = train(flags(tiny_dir, data_dir, tmp_path / "np", backend="numpy") + ["--ranks", "2"], 1)
    assert p.returncode == 1 and "E720" in p.stderr and not (tmp_path / "np").exists(), p.stderr


def test_ranks_status_prefers_a_ranks_own_failure_over_the_launchers_kill():
    from mlxpt.commands.train import ranks_status

    assert ranks_status({1: 1, 0: -15}, 0) == 1  # rank 1 failed first, rank 0 was then terminated
    assert ranks_status({0: 3, 1: -15}, 0) == 3
    assert ranks_status({1: 130, 0: 130}, 0) == 130
    assert ranks_status({0: 0, 1: -9}, 0) == 1  # killed from outside
    assert ranks_status({0: 0, 1: 0}, 0) == 0 and ranks_status({}, 0) == 0
    # a stop signal passed on: the ranks or the launcher ended by it is an interrupt, not 256 - 15
    assert ranks_status({0: -15, 1: -15}, 0, stopped=True) == 130
    assert ranks_status({}, -15, stopped=True) == 130 and ranks_status({}, -15) == 1
    assert ranks_status({0: 3, 1: 130}, 0, stopped=True) == 3


def test_watchdog_exits_a_rank_stuck_in_a_collective():
    """A peer that hangs without closing its socket (a machine gone) blocks all_sum forever: the
    watchdog prints the one line and exits 3 once MLXPT_DIST_TIMEOUT has passed."""
    code = (
        "import time\nfrom mlxpt.train import distributed as d\n"
        "d.WORLD.size, d.WORLD.timeout, d.WORLD.run_dir, d.WORLD.step = 2, 0.5, 'runs/x', 7\n"
        "d._guarded(lambda: time.sleep(30))\n"
    )
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and time.monotonic() - t0 < 20
    line = p.stderr.strip()
    assert (
        line.count("\n") == 0 and "E725" in line and "last checkpoint: step 7" in line and "--resume runs/x" in line
    ), line


def test_a_peer_lost_before_the_run_started_names_no_run_nor_step():
    """Rank 0 refused the run (E521: another process trains it) while rank 1 waited in a
    collective: rank 1's line must not offer a resume of a literal RUN at step 0."""
    code = (
        "from mlxpt.train import distributed as d\n"
        "d.WORLD.size, d.WORLD.rank = 2, 1\n"
        "def lost():\n    raise RuntimeError('[ring] connection to a peer was lost')\n"
        "d._guarded(lost)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    line = p.stderr.strip()
    assert p.returncode == 3 and line.count("\n") == 0 and "E725: rank 1: rank 0 is gone" in line, line
    assert "before the run started" in line and "RUN" not in line and "step" not in line and "--resume" not in line


def test_one_process_is_a_world_of_one(monkeypatch):
    """Without a launcher: no MLX import, every helper is the identity."""
    from mlxpt.train import distributed as d

    for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert d.init("numpy").size == 1 and d.is_main() and d.shard([3, 1, 2]) == [3, 1, 2]
    assert d.sum_floats([1.5, 2.0]) == [1.5, 2.0] and d.broadcast_text("x") == "x" and d.report() == {}
    assert d.gather_texts("x") == ["x"]
    d.check_batches(7, 1)  # nothing to split
    assert d.launch_rank() == 0
    monkeypatch.setenv("MLX_RANK", "1")  # what a launcher sets: known before init (one warning, rank 0's)
    assert d.launch_rank() == 1


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_are_disjoint_contiguous_and_cover_the_batch(monkeypatch, world):
    from mlxpt.errors import ConfigError
    from mlxpt.train import distributed as d

    batch = [9, 4, 7, 1, 0, 5, 8]
    parts = []
    for rank in range(world):
        monkeypatch.setattr(d, "WORLD", d.World(rank=rank, size=world))
        parts.append(d.shard(batch))
    assert [i for p in parts for i in p] == batch and all(parts)
    with pytest.raises(ConfigError) as e:  # 9 rows at batch 4: the last batch has 1 row
        d.check_batches(9, 4)
    assert e.value.code == "E723"
    d.check_batches(8, 4)
    if world == 2:  # the hint names a batch size that works, or none where none does
        assert "such as 3 " in e.value.hint  # 9 = 3 x 3
        with pytest.raises(ConfigError) as e:
            d.check_batches(1, 2)  # 1 row, 2 ranks
        assert "such as" not in e.value.hint and "at most 1 rank" in e.value.hint, e.value.hint


def test_refusals_without_a_launch(monkeypatch):
    from mlxpt.errors import ConfigError
    from mlxpt.train import distributed as d

    def code(fn, *args) -> str:
        with pytest.raises(ConfigError) as e:
            fn(*args)
        assert len(e.value.line().splitlines()) == 1
        return e.value.code

    assert code(d.launch_command, 0, []) == "E724"
    monkeypatch.setenv("MLXPT_DIST_TIMEOUT", "soon")
    assert code(d._timeout) == "E721"
    monkeypatch.setenv("MLX_RANK", "0")
    assert code(d.launch_command, 2, []) == "E726"  # --ranks inside mlx.launch
    monkeypatch.setattr(d, "WORLD", d.World(rank=0, size=2))
    assert code(d.check_method, "a-new-method") == "E728"  # a method not yet checked on several ranks
    for name in ("grpo", "rft", "distill"):
        d.check_method(name)
