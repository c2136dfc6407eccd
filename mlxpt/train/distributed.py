"""Data-parallel training on `mx.distributed`, launched by `mlx.launch` (ring, MPI or JACCL).

Every rank runs the same `mlxpt train` process on the same data and settings (checked at start:
E722). The loop's plan is over global windows (`loop.iter_windows`); each micro-batch of it is
split into contiguous per-rank shards (`shard`), so the data order does not depend on the world
size. Each rank accumulates token-sum gradients of its shard; `sum_window` adds the windows of all
ranks with one `all_sum` over a flat buffer (gradients, loss sum, token weight and metrics), so the
per-token normalisation, the logged loss, grad norm and metrics are those of the single process.
Rank 0 alone writes the run folder, prints and validates; every rank restores from it on resume.

A stop (a signal to any rank) is agreed with a tiny `all_sum` of the stop flag wherever the loop
asks (`Agreed`), so all ranks stop at the same step. A rank that dies makes `all_sum` fail on the
others ("connection to a peer was lost") or, where no socket closes (a machine gone), block: a
watchdog thread bounds each collective (`MLXPT_DIST_TIMEOUT`, default 900 s) and exits with one
line naming the run to resume.

With one process (no launcher) nothing here imports MLX and every function is the identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from mlxpt.errors import ConfigError, MlxptError

# set by an mlx.launch (ring/jaccl: MLX_RANK) or mpirun (OMPI_*/PMI_*) parent
_LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
EXIT_PEER_LOST = 3  # RELIABILITY.md exit codes: 3 = resources (a machine of the run is gone)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    group: object = None
    run_dir: str | None = None  # for the resume line of a lost peer
    step: int = 0
    timeout: float = 900.0
    stats: dict = field(default_factory=lambda: {"reduce_s": 0.0, "reduce_bytes": 0, "reduces": 0})


WORLD = World()


def launched() -> bool:
    """Started by a distributed launcher (several ranks, or one started through it)."""
    return any(os.environ.get(k) is not None for k in _LAUNCH_ENV)


def launch_rank() -> int:
    """This process's rank as its launcher set it (0 without a launcher): known before `init`,
    for what only rank 0 should print that early."""
    for k in _LAUNCH_ENV:
        raw = os.environ.get(k)
        if raw is not None:
            return int(raw) if raw.strip().isdigit() else 0
    return 0


def init(backend: str) -> World:
    """Join the launcher's group once (a plain process: a world of one, without importing MLX).
    The numpy backend has no collectives: more than one rank is refused (E720)."""
    global WORLD
    if WORLD.group is not None or not launched():
        return WORLD
    from mlxpt import _blas

    _blas.activate()  # before mlx is first imported, as the backend does (else the reference BLAS)
    import mlx.core as mx

    group = mx.distributed.init()
    WORLD = World(rank=group.rank(), size=group.size(), group=group, timeout=_timeout())
    if WORLD.size > 1 and backend != "mlx":
        raise ConfigError(
            "E720",
            f"--backend {backend} cannot train on {WORLD.size} ranks (it has no collectives)",
            "--backend",
            "use --backend mlx, or run one process without mlx.launch / --ranks",
        )
    return WORLD


def _timeout() -> float:
    raw = os.environ.get("MLXPT_DIST_TIMEOUT", "900")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError("E721", f"MLXPT_DIST_TIMEOUT={raw!r} is not a positive number of seconds",
                          "MLXPT_DIST_TIMEOUT", "unset it (900 s) or give seconds, e.g. 600")  # fmt: skip
    return value


def is_main() -> bool:
    return WORLD.rank == 0


def size() -> int:
    return WORLD.size


def rank() -> int:
    return WORLD.rank


def shard(indices: list[int]) -> list[int]:
    """This rank's contiguous part of one micro-batch of the global plan (all of it on one rank)."""
    n, r, w = len(indices), WORLD.rank, WORLD.size
    return indices[r * n // w : (r + 1) * n // w] if w > 1 else indices


def check_batches(n_rows: int, batch_size: int, what: str = "--batch-size") -> None:
    """Every micro-batch of the plan must give each rank at least one row (E723): the plan's
    batches hold `batch_size` rows, and the last of an epoch the remainder. Every rank refuses;
    rank 0 alone prints it (the others' output goes to the same launcher)."""
    w = WORLD.size
    if w == 1:
        return
    last = n_rows % batch_size
    if batch_size < w or 0 < last < w:
        small = batch_size if batch_size < w else last
        near = _fitting_batch(n_rows, batch_size, w)
        if near is not None:
            hint = f"use a batch size such as {near} (at least {w}, its remainder on {n_rows} rows 0 or at least {w}), or fewer ranks"
        else:  # fewer rows than ranks: no batch size gives every rank a row
            hint = f"no batch size gives each of {w} ranks a row of {n_rows}: use at most {max(1, n_rows)} rank(s), or more data"
        e = ConfigError(
            "E723",
            f"a micro-batch of {small} rows cannot be split over {w} ranks ({n_rows} training rows, batch size {batch_size})",
            what,
            hint,
        )
        if WORLD.rank != 0:
            e.errors = []  # refused here too, said once: the CLI prints each of `errors`
        raise e


def _fitting_batch(n_rows: int, batch_size: int, w: int) -> int | None:
    """The batch size nearest `batch_size` (the smaller of two) whose every micro-batch gives each
    of `w` ranks a row; None with fewer rows than ranks (n_rows itself fits otherwise)."""
    if n_rows < w:
        return None
    for d in range(abs(n_rows - batch_size) + 1):
        for b in (batch_size - d, batch_size + d):
            if w <= b <= n_rows and (n_rows % b == 0 or n_rows % b >= w):
                return b
    return n_rows


# -- collectives, each under the watchdog --------------------------------------------------------


def _lost(reason: str) -> str:
    others = [r for r in range(WORLD.size) if r != WORLD.rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    if WORLD.run_dir is None:  # before the run folder was made or reopened: e.g. rank 0 refused the run
        return (
            f"error E725: rank {WORLD.rank}: {who} is gone ({reason}) before the run started; nothing was "
            "trained or saved: its own message, if it printed one, says why"
        )
    run = WORLD.run_dir
    saved = f"last checkpoint: step {WORLD.step}" if WORLD.step else "no checkpoint yet"
    return (
        f"error E725: rank {WORLD.rank}: {who} is gone ({reason}); {saved}; "
        f"completed checkpoints in {run} are intact; resume on any number of ranks: "
        f"mlx.launch -n N --backend ring -- mlxpt train --resume {run}  (or: mlxpt train --resume {run})"
    )


def _guarded(fn):
    """Run `fn` (one collective, evaluated) with a watchdog: past the timeout, or if the ring
    reports a lost peer, print one line and exit at once (os._exit: a blocked collective holds
    the main thread, so no handler or `finally` would ever run)."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(WORLD.timeout):
            _die(f"no answer for {WORLD.timeout:.0f} s; MLXPT_DIST_TIMEOUT sets the limit")

    threading.Thread(target=watch, daemon=True).start()
    try:
        return fn()
    except RuntimeError as e:  # the ring backend: "[ring] connection to a peer was lost"
        _die(str(e).strip() or type(e).__name__)
    finally:
        done.set()


def _die(reason: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    line = _lost(reason)
    os.write(2, (line + "\n").encode())
    _mark_failed(line)
    os._exit(EXIT_PEER_LOST)


def _mark_failed(line: str) -> None:
    """Rank 0's status.json says "failed" (with the line) instead of "running" with a dead pid."""
    if WORLD.rank != 0 or WORLD.run_dir is None:
        return
    from mlxpt.runs import read_status, write_status

    try:
        before = read_status(WORLD.run_dir) or {}
        keep = {k: v for k, v in before.items() if k not in ("status", "step", "error", "pid", "updated")}
        write_status(WORLD.run_dir, "failed", **keep, step=WORLD.step, error=line.removeprefix("error "))
    except Exception:  # noqa: BLE001 - exiting either way; the checkpoints are what matters
        pass


def _collective(name: str, x):
    """mx.distributed.<name>(x) over the world, evaluated under the watchdog (`_guarded`)."""
    import mlx.core as mx

    def run():
        y = getattr(mx.distributed, name)(x, group=WORLD.group, stream=mx.cpu)
        mx.eval(y)
        return y

    return _guarded(run)


def _all_sum(x):
    return _collective("all_sum", x)


def _all_gather(x):
    return _collective("all_gather", x)


def sum_floats(values: list[float]) -> list[float]:
    """Sums over ranks of a few numbers (float64: token counts stay exact)."""
    if WORLD.size == 1:
        return list(values)
    import mlx.core as mx

    return _all_sum(mx.array(values, dtype=mx.float64)).tolist()


def any_rank(flag: bool) -> bool:
    """Is `flag` set on any rank?"""
    return sum_floats([1.0 if flag else 0.0])[0] > 0 if WORLD.size > 1 else flag


def barrier() -> None:
    if WORLD.size > 1:
        sum_floats([0.0])


def broadcast_text(text: str) -> str:
    """Rank 0's `text` on every rank."""
    if WORLD.size == 1:
        return text
    import mlx.core as mx
    import numpy as np

    raw = np.frombuffer(text.encode(), np.uint8) if WORLD.rank == 0 else np.zeros(0, np.uint8)
    n = int(sum_floats([float(raw.size)])[0])
    buf = np.zeros(n, np.uint8)
    buf[: raw.size] = raw
    return bytes(np.array(_all_sum(mx.array(buf)))).decode()


def gather_texts(text: str) -> list[str]:
    """Every rank's `text` on every rank, in rank order (`[text]` on one rank): the parts of a
    job split over the ranks (RFT's sampled chunks, a teacher's answers), as JSON."""
    if WORLD.size == 1:
        return [text]
    import mlx.core as mx
    import numpy as np

    raw = np.frombuffer(text.encode(), np.uint8)
    sizes = np.array(_all_gather(mx.array([raw.size], dtype=mx.int32))).reshape(-1)
    buf = np.zeros(max(1, int(sizes.max())), np.uint8)  # one length for all; never an empty array
    buf[: raw.size] = raw
    every = np.array(_all_gather(mx.array(buf))).reshape(WORLD.size, -1)
    return [bytes(every[r, : int(sizes[r])]).decode() for r in range(WORLD.size)]


def gather_parts(arrays: tuple, meta: dict) -> list[tuple[tuple, dict]]:
    """Every rank's (numpy arrays, JSON-able dict), in rank order (`[(arrays, meta)]` on one
    rank): what each rank holds of a job that rank 0 alone saves (GRPO's sampled window)."""
    if WORLD.size == 1:
        return [(tuple(arrays), meta)]
    import base64

    import numpy as np

    def pack(a) -> dict:
        a = np.ascontiguousarray(a)
        return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}

    def unpack(d: dict):
        return np.frombuffer(base64.b64decode(d["data"]), np.dtype(d["dtype"])).reshape(d["shape"]).copy()

    texts = gather_texts(json.dumps({"arrays": [pack(a) for a in arrays], "meta": meta}))
    return [(tuple(unpack(a) for a in obj["arrays"]), obj["meta"]) for obj in map(json.loads, texts)]


def check_same(cfg_dict: dict, train: list, valid: list) -> None:
    """Every rank has the same resolved settings and encoded data (E722 on every rank if not)."""
    if WORLD.size == 1:
        return
    import mlx.core as mx
    import numpy as np

    # where rank 0 writes is its own business (the others write nothing)
    keep = {k: ({i: x for i, x in v.items() if i != "runs_dir"} if isinstance(v, dict) else v)
            for k, v in cfg_dict.items() if k != "runs_dir"}  # fmt: skip
    digests = [
        hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).digest(),
        _data_digest(train + valid),
    ]
    mine = np.frombuffer(b"".join(digests), np.uint8)
    every = np.array(_all_gather(mx.array(mine))).reshape(WORLD.size, -1)
    for what, part in (("settings", slice(0, 32)), ("data", slice(32, 64))):
        other = [r for r in range(WORLD.size) if not np.array_equal(every[r, part], mine[part])]
        if other:
            raise ConfigError(
                "E722",
                f"rank {WORLD.rank}'s {what} differ from rank {other[0]}'s (hash of the resolved {what})",
                "mlx.launch",
                "start every rank with the same command, config and data files (copy them to every host)",
            )


def _data_digest(examples: list) -> bytes:
    h = hashlib.sha256()
    for e in examples:  # one example at a time: no copy of the whole data set as text
        h.update(repr(_tokens(e)).encode())
    return h.digest()


def _tokens(example) -> tuple:
    """What an encoded example trains on, without its file path (which may differ per host)."""
    d = vars(example) if hasattr(example, "__dict__") else {}
    return tuple((k, repr(v)) for k, v in sorted(d.items()) if k not in ("where", "row"))


class Agreed:
    """A stop flag that all ranks read alike: `requested` sums the local flags over ranks (one
    tiny all_sum per read), and stays set once any rank asked. Every rank reads it at the same
    points of the loop, so they stop at the same step."""

    def __init__(self, local):
        self.local, self.agreed = local, False

    @property
    def requested(self) -> bool:
        if not self.agreed:
            self.agreed = any_rank(bool(self.local.requested))
        return self.agreed

    def __bool__(self) -> bool:
        return self.requested


def agreed(stop):
    """`stop` as every rank reads it (itself on one rank)."""
    return stop if WORLD.size == 1 else Agreed(stop)


def sum_window(model, grads, loss, ntok, aux) -> tuple:
    """(grads, loss sum, weight, metrics) of one window summed over ranks with one all_sum of a
    flat float32 buffer (gradients in their tree order, then the scalars). The bytes and time of
    each call are counted in WORLD.stats (bench/distributed.py reads them)."""
    if WORLD.size == 1:
        return grads, loss, ntok, aux
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(grads)
    keys = sorted(aux)
    scalars = mx.stack([mx.array(v).astype(mx.float32).reshape(()) for v in (loss, ntok, *(aux[k] for k in keys))])
    buf = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in flat] + [scalars.reshape(-1)])
    mx.eval(buf)
    t0 = time.perf_counter()
    total = _all_sum(buf)
    WORLD.stats["reduce_s"] += time.perf_counter() - t0
    WORLD.stats["reduce_bytes"] += buf.nbytes
    WORLD.stats["reduces"] += 1
    out, at = [], 0
    for name, g in flat:
        out.append((name, total[at : at + g.size].reshape(g.shape).astype(g.dtype)))
        at += g.size
    tail = total[at:]
    summed_aux = {k: tail[2 + i] for i, k in enumerate(keys)}
    return tree_unflatten(out), tail[0], tail[1], summed_aux


def sum_arrays(arrays: dict) -> dict:
    """{name: numpy array} summed over ranks (each rank fills its part, zeros elsewhere: exact)."""
    if WORLD.size == 1:
        return arrays
    import mlx.core as mx
    import numpy as np

    keys = sorted(arrays)
    flat = np.concatenate([np.asarray(arrays[k], np.float32).reshape(-1) for k in keys] or [np.zeros(0, np.float32)])
    total = np.array(_all_sum(mx.array(flat)))
    out, at = {}, 0
    for k in keys:
        a = np.asarray(arrays[k])
        out[k] = total[at : at + a.size].reshape(a.shape).astype(a.dtype)
        at += a.size
    return out


def launch_command(ranks: int, argv: list[str]) -> list[str]:
    """`mlx.launch -n RANKS --backend ring -- <this mlxpt> argv` (the `--ranks` shortcut), run as
    `python -m mlxpt.launch` (mlxpt/launch.py: mlx.launch without its busy I/O threads)."""
    if ranks < 1:
        raise ConfigError("E724", f"--ranks {ranks} is not a number of processes", "--ranks",
                          "give 1 or more, e.g. --ranks 2")  # fmt: skip
    if launched():
        raise ConfigError("E726", "--ranks inside mlx.launch would start ranks of ranks", "--ranks",
                          "drop --ranks when starting through mlx.launch")  # fmt: skip
    import importlib.util

    if importlib.util.find_spec("mlx._distributed_utils.launch") is None:
        raise MlxptError("E727", "mlx.launch is not installed beside this Python", sys.executable,
                         "install mlx (it ships mlx.launch), or start the ranks with your own mlx.launch")  # fmt: skip
    # MLX's launcher through mlxpt.launch: the same launcher without its rank threads' spin
    launcher = [sys.executable, "-m", "mlxpt.launch"]
    return [*launcher, "-n", str(ranks), "--backend", "ring", "--", sys.executable, "-m", "mlxpt.cli", *argv]


def rollout_stats(stats: list[dict], names: list[str]) -> dict:
    """GRPO's step-report numbers over every rank's groups (sums of rewards, squares, counts,
    lengths; the longest completion by all_gather); {} on one rank (the caller's are exact)."""
    if WORLD.size == 1:
        return {}
    import mlx.core as mx
    import numpy as np

    rewards = np.array([r for s in stats for r in s["rewards"]], dtype=np.float64)
    lengths = [n for s in stats for n in s["lengths"]]
    parts = [rewards.sum(), (rewards**2).sum(), rewards.size, sum(s["zero_std"] for s in stats),
             sum(s["groups"] for s in stats), sum(lengths), len(lengths), sum(s["truncated"] for s in stats)]  # fmt: skip
    for name in names:
        vals = np.array([sc[name] for s in stats for sc in s["per_fn"] if sc[name] is not None], np.float64)
        parts += [vals.sum(), (vals**2).sum(), vals.size]
    t = sum_floats([float(x) for x in parts])
    longest = int(np.array(_all_gather(mx.array([max(lengths, default=0)]))).max())
    n = t[2]
    out = {
        "reward_mean": t[0] / n if n else math.nan,
        "reward_std": _std(t[0], t[1], n),
        "zero_std_fraction": t[3] / max(1.0, t[4]),
        "completion_len_mean": t[5] / max(1.0, t[6]),
        "completion_len_max": longest,
        "truncated_fraction": t[7] / max(1.0, t[6]),
    }
    for i, name in enumerate(names):
        s1, s2, k = t[8 + 3 * i : 11 + 3 * i]
        out[f"reward/{name}"] = s1 / k if k else None
        out[f"reward_std/{name}"] = _std(s1, s2, k)
    return out


def _std(s1: float, s2: float, n: float) -> float:
    """Sample standard deviation (ddof 1) from a sum and a sum of squares."""
    return math.sqrt(max(0.0, (s2 - s1 * s1 / n) / (n - 1))) if n > 1 else 0.0


def sync_rng() -> None:
    """Every rank takes rank 0's RNG key (at each window start): ranks that sampled different
    lengths (GRPO) drew different numbers of keys, and a checkpoint holds rank 0's alone, so
    this keeps a resume on the same ranks exact."""
    if WORLD.size == 1:
        return
    import mlx.core as mx
    import numpy as np

    key = np.array(mx.random.state[0]).astype(np.uint32)
    mine = key if WORLD.rank == 0 else np.zeros_like(key)
    hi, lo = (int(x) for x in np.array(_all_sum(mx.array(mine))).tolist())
    mx.random.seed((hi << 32) | lo)  # key(seed) == [seed >> 32, seed & 0xffffffff]


def leave(code: int) -> int:
    """With several ranks, exit now with `code` (everything is saved and flushed): a rank still
    in interpreter shutdown when mlx.launch stops the others would die by its SIGTERM instead."""
    if WORLD.size == 1:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def report() -> dict:
    """The gradient all-reduce's totals for the "done" event ({} on one rank)."""
    if WORLD.size == 1:
        return {}
    s = WORLD.stats
    return {"world_size": WORLD.size, "allreduce_s": s["reduce_s"], "allreduce_bytes": s["reduce_bytes"],
            "allreduces": s["reduces"]}  # fmt: skip


def per_rank(cfg):
    """`cfg` as one rank sees a micro-batch (its shard: at most ceil(batch_size / N) rows), for
    the memory estimate; `cfg` itself on one rank."""
    if WORLD.size == 1:
        return cfg
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, batch_size=-(-cfg.data.batch_size // WORLD.size)))


# methods checked on several ranks (2 ranks equal 1: tests/test_distributed.py); a new method
# joins once its own files (caches, rounds) are written by rank 0 alone
DATA_PARALLEL = ("sft", "dpo", "simpo", "orpo", "rm", "grpo", "prm", "rft", "distill")


def check_method(name: str) -> None:
    if WORLD.size > 1 and name not in DATA_PARALLEL:
        raise ConfigError(
            "E728",
            f"{name} does not train on several ranks yet (it writes files of its own on every rank)",
            "mlx.launch / --ranks",
            f"run it as one process; data-parallel methods: {', '.join(DATA_PARALLEL)}",
        )
