"""Replay against forgetting: rows from a second file mixed into every SFT micro-batch.

With `--replay FILE --replay-ratio R` and batch size B, each micro-batch holds k = max(1,
round(R * B)) replay rows (at most B - 1) beside B - k training rows, so the training plan runs
over the training rows alone and an epoch still means the training data once. The replay file
is read, validated and encoded exactly like SFT training data (same formats, same error codes,
`file:line` naming the replay file).

Which replay rows a micro-batch gets is a pure function of (seed, epoch, batch index, position):
each epoch shuffles the replay rows once, and micro-batch i takes the k rows after the first
i * k of that order, wrapping around. A resumed run therefore replays exactly the same rows,
and every replay row is used about equally often.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxpt.data.encode import Example
from mlxpt.data.formats import Row, resolve_splits, scan_jsonl
from mlxpt.errors import ConfigError, DataError

_STREAM = 0x7265706C  # keeps the replay order's RNG apart from the batch plan's


@dataclass
class ReplayExample(Example):
    """An encoded replay row; it travels in the training list so the memory check sees it."""


def replay_count(ratio: float, batch_size: int) -> int:
    """Replay rows per micro-batch: max(1, round(ratio * batch_size)), leaving a training row."""
    return min(batch_size - 1, max(1, round(ratio * batch_size)))


def check_settings(replay: str | None, ratio: float, batch_size: int, data: str, valid: str | None) -> None:
    """Refuse replay settings that cannot work, before any file is read (ConfigError E560-E563)."""
    if not replay and ratio == 0:
        return
    if not replay:
        raise ConfigError(
            "E560", f"--replay-ratio {ratio} without a replay file", "--replay-ratio",
            "name the rows to mix in with --replay FILE, or drop --replay-ratio",
        )  # fmt: skip
    if ratio == 0:
        raise ConfigError(
            "E561", "--replay given with --replay-ratio 0: no replay row would be trained", "--replay",
            "set --replay-ratio, e.g. 0.25 (a quarter of each batch), or drop --replay",
        )  # fmt: skip
    if batch_size < 2:
        raise ConfigError(
            "E562", f"batch size {batch_size} leaves no room for replay rows beside a training row", "--batch-size",
            "use --batch-size 2 or more with --replay",
        )  # fmt: skip
    mine = Path(replay).resolve()
    for what, path in zip(("training", "validation"), resolve_splits(data, valid), strict=True):
        if path is not None and Path(path).resolve() == mine:
            raise ConfigError(
                "E563", f"the replay file is the {what} file ({path})", "--replay",
                "replay other rows, such as the base model's own answers (mlxpt data self-answers)",
            )  # fmt: skip


def scan_replay(path: str | os.PathLike) -> tuple[list[Row], list[DataError]]:
    """The replay file's rows and problems, exactly as for SFT training data (never raises)."""
    if Path(path).is_dir():
        return [], [DataError("E102", "the replay file is a directory", str(path), "point --replay at a .jsonl file")]
    return scan_jsonl(path)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def replay_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The replay rows' order in `epoch`: a permutation of range(n) seeded by (seed, epoch)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, _STREAM])
    return rng.permutation(n)


def replay_picks(order: np.ndarray, k: int, batch_index: int) -> list[int]:
    """The k replay rows of micro-batch `batch_index`: positions i*k .. i*k+k-1 of `order`, wrapped."""
    n = len(order)
    return [int(order[(batch_index * k + p) % n]) for p in range(k)]
