"""Automatic step labels the Math-Shepherd way (Wang et al. 2024), for `mlxpt data label-steps`.

For each prompt (GRPO's `{"prompt", "answer"}` rows) the policy samples one solution, which is cut
into steps at the delimiter. For every prefix of steps but the whole, K continuations are sampled
in one batched generation (decode/batch.py: each prefix prefilled once, its cache shared by its K
rows) and their final answers checked against the row's `answer` (rewards/extract.py). A step's
label is the share of its continuations that reach the answer (soft) or whether any does (hard);
the last step's label is whether the solution's own answer is right. Rows are written in TRL's
stepwise form (data/stepwise.py), with the `answer` and the prompt's `row` index riding along.

Resumable: each row is appended whole and made durable, then `OUT.progress.json` records where
the run stands (its settings, the next prompt, the bytes of OUT that are complete). A rerun with
the same OUT and settings cuts OUT back to its last complete row and goes on with the next prompt;
each prompt samples from a seed of its own (`seed + index`), so an interrupted row comes out the
same when redone. Only a tail label-steps itself can leave is cut (part of a line, or the line of
the next prompt); other settings, or an OUT changed in any other way, are refused (E533).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxpt.data.prompts import PromptRow
from mlxpt.data.stepwise import split_steps
from mlxpt.errors import ConfigError
from mlxpt.rewards.extract import extract, same_answer
from mlxpt.runs.atomic import atomic_write_json

MAX_ROWS = 64  # sequences decoded together: prefixes x rollouts are split into groups of this many


@dataclass(frozen=True)
class LabelSettings:
    """What decides the labels: a resumed OUT must have been made with the same ones."""

    data: str
    policy: str
    rollouts: int = 8
    soft: bool = True
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0
    delimiter: str = "\n"
    extract: str = "auto"
    max_steps: int = 12


@dataclass
class LabelCounts:
    prompts: int = 0  # prompts done (rows written or skipped)
    rows: int = 0
    steps: int = 0
    no_steps: int = 0  # the solution had no non-blank step: no row
    too_many_steps: int = 0  # more than max_steps steps: no row
    generated_tokens: int = 0
    correct_solutions: int = 0
    seconds: float = 0.0


def check_settings(s: LabelSettings) -> None:
    """Refuse (E531) values out of range before anything is read."""
    checks = (
        ("rollouts", s.rollouts >= 1, "use 1 or more continuations per step"),
        ("max-tokens", s.max_tokens >= 1, "use 1 or more"),
        ("max-steps", s.max_steps >= 1, "use 1 or more"),
        (
            "temperature",
            s.temperature > 0,
            "use a positive temperature such as 0.7: at 0 every continuation is the same",
        ),
        ("seed", 0 <= s.seed < 2**32, "use a whole number in [0, 2**32)"),
    )
    for name, ok, hint in checks:
        if not ok:
            raise ConfigError(
                "E531", f"{name}={getattr(s, name.replace('-', '_'))!r} is out of range", f"--{name}", hint
            )
    if not s.delimiter:
        raise ConfigError("E530", "the step delimiter is empty", "--step-delimiter", "use \\n (the default)")


def _seed(seed: int) -> None:
    import mlx.core as mx

    mx.random.seed(seed)


def label_prompt(model, tokenizer, row: PromptRow, index: int, s: LabelSettings, counts: LabelCounts) -> dict | None:
    """The stepwise row of one prompt, or None when its solution has no steps or too many."""
    from mlxpt.decode.batch import GroupStats, generate_group, generate_groups
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.decode.sampling import make_sampler

    answer = row.fields.get("answer")
    sampler = make_sampler(s.temperature)
    _seed(s.seed + index)
    stats = GroupStats()
    prompt_ids = chat_prompt(tokenizer, row.messages)
    solution = generate_group(model, tokenizer, prompt_ids, 1, s.max_tokens, sampler, stats=stats)[0]
    steps = split_steps(solution.text, s.delimiter)
    if not steps or len(steps) > s.max_steps:
        counts.no_steps += not steps
        counts.too_many_steps += len(steps) > s.max_steps
        counts.generated_tokens += stats.generated_tokens
        return None
    prefixes = [s.delimiter.join(steps[:k]) + s.delimiter for k in range(1, len(steps))]
    reached: list[list[bool]] = []
    per_call = max(1, MAX_ROWS // s.rollouts)
    for start in range(0, len(prefixes), per_call):
        part = prefixes[start : start + per_call]
        ids = [prompt_ids + list(tokenizer.encode(p, add_special_tokens=False)) for p in part]
        groups = generate_groups(model, tokenizer, ids, s.rollouts, s.max_tokens, sampler, stats=stats)
        for p, group in zip(part, groups, strict=True):
            reached.append([same_answer(extract(p + c.text, s.extract), answer) for c in group])
    final = same_answer(extract(solution.text, s.extract), answer)
    shares = [sum(r) / len(r) for r in reached] + [float(final)]
    labels = [round(x, 4) for x in shares] if s.soft else [x > 0 for x in shares]
    counts.rows += 1
    counts.steps += len(steps)
    counts.correct_solutions += final
    counts.generated_tokens += stats.generated_tokens
    return {**_prompt_fields(row), "completions": steps, "labels": labels, "answer": answer, "row": index}


def _prompt_fields(row: PromptRow) -> dict:
    """The prompt as the input gave it: a string (with its `system`), or the messages."""
    if isinstance(row.prompt, str):
        system = row.messages[0]["content"] if row.messages[0]["role"] == "system" else None
        return {**({"system": system} if system else {}), "prompt": row.prompt}
    return {"prompt": row.messages}


# ---- the resumable output -----------------------------------------------------------------------


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def start_point(out: Path, s: LabelSettings) -> tuple[int, int]:
    """(next prompt index, rows already written) for OUT; refuses (E533) an OUT that is not this
    job's work in progress. Reads only: the torn tail, if any, is cut when labelling goes on."""
    done, rows, _ = _resume_state(out, s)
    return done, rows


class OutputLock:
    """One label-steps job per OUT: an exclusive flock on OUT itself (created empty when missing),
    held until the job ends. Two jobs on one OUT once both appended every row, each exiting 0."""

    def __init__(self, out: Path):
        self.out, self._fd = Path(out), None

    def __enter__(self) -> OutputLock:
        import fcntl

        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                "E535", "another label-steps job is writing this output", str(self.out),
                "wait for it to finish (rerun the command then to continue), or give another --out",
            ) from None  # fmt: skip
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _resume_state(out: Path, s: LabelSettings) -> tuple[int, int, int]:
    """(next prompt index, rows written, complete bytes of OUT), every check of start_point made."""
    prog = progress_path(out)
    size = out.stat().st_size if out.is_file() else 0
    if not prog.is_file():
        if size:
            raise ConfigError(
                "E533", f"the output exists and is not a label-steps output in progress (no {prog.name})", str(out),
                "choose a new --out, or move the file away",
            )  # fmt: skip
        return 0, 0, 0
    try:
        saved = json.loads(prog.read_text(encoding="utf-8"))
        before, done, rows, complete = saved["settings"], int(saved["next"]), int(saved["rows"]), int(saved["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "E533", f"{prog.name} is unreadable", str(prog), "choose a new --out, or delete both files to start over"
        ) from None
    now = asdict(s)
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        was = ", ".join(f"{k}={before.get(k)!r}" for k in changed)
        raise ConfigError(
            "E533", f"the output was started with other settings ({was})", str(out),
            "rerun with those settings to continue, or choose a new --out",
        )  # fmt: skip
    if size < complete:
        raise ConfigError(
            "E533", f"the output is shorter ({size} bytes) than its {complete} complete bytes: it was changed",
            str(out), "choose a new --out, or delete both files to start over",
        )  # fmt: skip
    if size > complete and not _torn_tail(out, complete, done):
        raise ConfigError(
            "E533", f"the output grew by {size - complete} bytes since label-steps last wrote it", str(out),
            f"move the added lines (after byte {complete}) to another file, or choose a new --out",
        )  # fmt: skip
    return done, rows, complete


def _torn_tail(out: Path, complete: int, done: int) -> bool:
    """Whether the bytes of OUT after `complete` are what label-steps itself leaves when stopped
    between two records: part of one line, or the whole line of prompt `done` (the row is made
    durable before its progress record)."""
    with out.open("rb") as f:
        f.seek(complete)
        tail = f.read()
    if b"\n" not in tail:
        return True
    if tail.index(b"\n") != len(tail) - 1:
        return False
    try:
        row = json.loads(tail)
    except ValueError:
        return False
    return isinstance(row, dict) and type(row.get("row")) is int and row["row"] == done


def append_row(out: Path, row: dict) -> int:
    """Append one JSON line in one write and make it durable; the file's new size."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def label_steps(
    model,
    tokenizer,
    rows: list[PromptRow],
    out: Path,
    s: LabelSettings,
    progress: Callable[[int, int, LabelCounts], None] = lambda done, total, c: None,
) -> LabelCounts:
    """Label every prompt of `rows` from where OUT stands (see the module doc); the counts of this session."""
    out = Path(out)
    start, written, size = _resume_state(out, s)
    counts = LabelCounts(prompts=start, rows=written)
    if start >= len(rows):
        return counts  # nothing to do: OUT is left as it is
    if out.is_file() and out.stat().st_size > size:  # a row torn by a crash, or written before its progress record
        os.truncate(out, size)
    t0 = time.perf_counter()
    if start == 0 and not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    for i in range(start, len(rows)):
        labelled = label_prompt(model, tokenizer, rows[i], i, s, counts)
        if labelled is not None:
            size = append_row(out, labelled)
        counts.prompts = i + 1
        counts.seconds = time.perf_counter() - t0
        record = {"kind": "label-steps", "settings": asdict(s), "next": i + 1, "rows": counts.rows, "bytes": size}
        atomic_write_json(progress_path(out), record)
        progress(i + 1, len(rows), counts)
    counts.seconds = time.perf_counter() - t0
    return counts
