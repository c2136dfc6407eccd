"""Verifiable reward functions and the guard every call goes through.

A reward function is a plain callable `(prompt, completion, **row) -> float | None`: `prompt` is
the prompt as given in the data (a string or a message list), `completion` the generated text,
`row` every other field of the data row (e.g. `answer`) plus `completion_tokens` and
`max_completion_length`. Only the keywords a function accepts are passed, so `def f(prompt,
completion, answer)` works as well as `def f(prompt, completion, **row)`. None means "abstain"
(this function has no opinion on this completion).

Built-ins (`REWARDS`): `accuracy` (final answer == row["answer"], robust extraction from
rewards/extract.py), `format` (the completion ends with an `Answer: <number>` line, or matches the
row's/config's `format_regex`), `tags` (`<think>...</think>` then `<answer>...</answer>`),
`length` (DAPO's soft over-length penalty), `arithmetic` (the share of the completion's worked
steps such as `6 * 5 = 30` that are true, the final answer included: a dense signal on the slips
that make most wrong answers of a small model; in the measured GRPO run it raised that share and
lowered accuracy, see BENCHMARKS.md). User functions: `--reward path/to/file.py:function`.

`RewardGuard` calls them: exceptions, NaN/inf, values beyond float32's range, non-numbers and
calls slower than a timeout are caught, counted per function and logged (with the offending
completion) to the run folder. Numbers are any real scalar (int, float, bool as 1/0, NumPy
scalars, Fraction). Each call gets its own copy of the prompt and row, so a function that edits
them cannot change what the next function or step sees;
the policy decides what a failure becomes (`abstain`: dropped from the sum, `zero`: 0.0, `stop`:
the run stops), and a failure rate above `max_failure_rate` stops the run with one clear line.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import numbers
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mlxpt.errors import ConfigError
from mlxpt.rewards.extract import extract, same_answer
from mlxpt.runs.atomic import append_jsonl

FLOAT32_MAX = 3.4028234663852886e38
ANSWER_LINE = r"(?s).*\bAnswer:\s*[-+]?\$?\d[\d,]*(?:\.\d+)?\s*$"
_TAGS = re.compile(r"(?s)^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$")


def accuracy(prompt, completion: str, answer=None, extract_method: str = "auto", **_) -> float | None:
    """1.0 when the extracted final answer equals `answer` (numbers with a tolerance), else 0.0;
    None (abstain) for rows without an answer."""
    if answer is None:
        return None
    return 1.0 if same_answer(extract(completion, extract_method), answer) else 0.0


def format_reward(prompt, completion: str, format_regex: str | None = None, **_) -> float:
    """1.0 when the completion matches `format_regex` (default: ends with an `Answer: n` line)."""
    return 1.0 if re.fullmatch(format_regex or ANSWER_LINE, completion.strip()) else 0.0


def tags(prompt, completion: str, **_) -> float:
    """1.0 for `<think>reasoning</think><answer>answer</answer>` and nothing else, else 0.0."""
    return 1.0 if _TAGS.match(completion) else 0.0


def length(prompt, completion: str, completion_tokens: int = 0, max_completion_length: int = 0, **_) -> float:
    """DAPO's soft over-length penalty: 0 up to L - L/4 tokens, then linearly down to -1 at L."""
    if max_completion_length <= 0:
        return 0.0
    soft = max(1, max_completion_length // 4)
    start = max_completion_length - soft
    if completion_tokens <= start:
        return 0.0
    return max(-1.0, (start - completion_tokens) / soft)


# `a op b = c` with + - * / x × ÷ and parentheses: the left side is the longest run of
# expression characters before an `=` on its line, the right side one number.
_EQUATION = re.compile(r"([\d. \t()+\-*/x×÷]+)=[ \t]*(-?\d+(?:\.\d+)?)(?!\.?\d)")
_TIMES, _DIVIDE = ("*", "x", "×"), ("/", "÷")
_OPERATORS = ("+", "-", *_TIMES, *_DIVIDE)
_TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|[-+*/x×÷()])")
_MAX_DIGITS = 15  # longer numbers are not worked arithmetic; floats would round them


def _evaluate(expr: str) -> tuple[float, int] | None:
    """(value, binary operators) of an arithmetic expression, or None when it is not one.
    Division by zero gives nan (a false equation, not a skipped one)."""
    tokens, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            return None
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens or any(t[0].isdigit() and len(t.replace(".", "")) > _MAX_DIGITS for t in tokens):
        return None
    i, ops = 0, 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def factor():
        nonlocal i
        t = peek()
        if t is None:
            raise ValueError
        i += 1
        if t == "-":
            return -factor()
        if t == "(":
            v = sum_()
            if peek() != ")":
                raise ValueError
            i += 1
            return v
        if not t[0].isdigit():
            raise ValueError
        return float(t)

    def product():
        nonlocal i, ops
        v = factor()
        while peek() in (*_TIMES, *_DIVIDE):
            op, i, ops = peek(), i + 1, ops + 1
            rhs = factor()
            v = v * rhs if op in _TIMES else (v / rhs if rhs else math.nan)
        return v

    def sum_():
        nonlocal i, ops
        v = product()
        while peek() in ("+", "-"):
            op, i, ops = peek(), i + 1, ops + 1
            rhs = product()
            v = v + rhs if op == "+" else v - rhs
        return v

    try:
        value = sum_()
    except (ValueError, RecursionError):
        return None
    return (value, ops) if i == len(tokens) else None


def _holds(value: float, shown: str) -> bool:
    """`value` written as `shown`: exact for an integer, to the decimals shown otherwise."""
    decimals = len(shown.partition(".")[2])
    tolerance = 0.5 * 10.0**-decimals if decimals else 1e-9 * max(1.0, abs(value))
    return math.isfinite(value) and abs(value - float(shown)) <= tolerance + 1e-12


def arithmetic(prompt, completion: str, **_) -> float:
    """Share of the completion's worked steps that are true, 0.0 when it shows no equation.

    Steps: every `left = number` with an operator on the left (`6 * 5 = 30`; a chain `2 * 7 = 14
    + 1 = 15` is two); a bare `38 = 51` only when it is false (a true one says nothing); and the
    final answer, when there is one, holds when it equals the last step's result. So leaving the
    operator out of a slip, or answering something other than what was worked out, cannot hide
    it. A number with decimals only has to match to the decimals shown (`10 / 3 = 3.33`)."""
    right = total = 0
    last, last_end = None, -1
    for m in _EQUATION.finditer(completion):
        left, shown = m.group(1), m.group(2)
        if m.start() == last_end and (not left.strip() or left.strip()[0] in _OPERATORS):
            left = last + left  # `14 + 1 = 15` continuing `2 * 7 = 14` (a blank left: `14 = 15`)
        parsed = _evaluate(left)
        if parsed is None or len(shown.replace(".", "").lstrip("-")) > _MAX_DIGITS:
            continue  # prose, a name (`total = 5`) or a malformed expression
        holds = _holds(parsed[0], shown)
        if parsed[1] == 0 and holds:
            continue
        total, right = total + 1, right + holds
        last, last_end = shown, m.end()
    if last is not None and (answer := extract(completion, "auto")) is not None:
        total, right = total + 1, right + same_answer(answer, last)
    return right / total if total else 0.0


REWARDS: dict[str, Callable] = {
    "accuracy": accuracy,
    "format": format_reward,
    "tags": tags,
    "length": length,
    "arithmetic": arithmetic,
}


def load_reward(spec: str) -> tuple[str, Callable]:
    """(name, function) for a built-in name or `path/to/file.py:function`; ConfigError E520+."""
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if ":" not in spec:
        raise ConfigError(
            "E540",
            f"unknown reward {spec!r}",
            "--reward",
            f"use one of {', '.join(REWARDS)} or path/to/file.py:function",
        )
    path_s, fn_name = spec.rsplit(":", 1)
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise ConfigError("E541", "reward file not found", path_s, "give an existing .py file: --reward file.py:fn")
    try:
        mod_spec = importlib.util.spec_from_file_location(f"mlxpt_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in user code is reported, not raised raw
        raise ConfigError(
            "E542", f"reward file failed to import: {type(e).__name__}: {e}", path_s, "fix the file"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError("E543", f"no function {fn_name!r} in the reward file", path_s, "check the name after ':'")
    try:
        inspect.signature(fn).bind("prompt", "completion")
    except (TypeError, ValueError):
        raise ConfigError(
            "E544",
            f"reward {fn_name!r} must accept (prompt, completion, **row)",
            spec,
            "define it as def f(prompt, completion, **row) -> float | None",
        ) from None
    return fn_name, fn


def parse_rewards(names: str, weights: str | None) -> list[tuple[str, Callable, float]]:
    """The configured reward functions with their weights (default 1.0 each)."""
    specs = [s.strip() for s in names.split(",") if s.strip()]
    if not specs:
        raise ConfigError("E545", "no reward function given", "--rewards", "e.g. --rewards accuracy,format")
    loaded = [load_reward(s) for s in specs]
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(
                "E546", f"reward weights {weights!r} are not numbers", "--reward-weights", "e.g. 1,0.5"
            ) from None
        if len(ws) != len(loaded) or not all(math.isfinite(w) for w in ws):
            raise ConfigError(
                "E546",
                f"{len(ws)} reward weights for {len(loaded)} reward functions",
                "--reward-weights",
                "give one finite weight per reward function, in order",
            )
    else:
        ws = [1.0] * len(loaded)
    names_seen = [n for n, _ in loaded]
    dup = {n for n in names_seen if names_seen.count(n) > 1}
    if dup:
        raise ConfigError("E547", f"reward {sorted(dup)[0]!r} is listed twice", "--rewards", "list each function once")
    return [(n, f, w) for (n, f), w in zip(loaded, ws, strict=True)]


def _accepted_kwargs(fn: Callable) -> set[str] | None:
    """Keyword names `fn` accepts, or None when it takes **kwargs (everything)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class RewardStop(ConfigError):
    pass


class RewardGuard:
    """Calls reward functions safely; see the module doc. One guard per run."""

    POLICIES = ("abstain", "zero", "stop")

    def __init__(
        self,
        rewards: list[tuple[str, Callable, float]],
        policy: str = "abstain",
        max_failure_rate: float = 0.5,
        timeout_s: float = 10.0,
        log_path: Path | None = None,
        min_calls: int = 16,
    ):
        if policy not in self.POLICIES:
            raise ConfigError(
                "E548", f"unknown reward failure policy {policy!r}", "--reward-on-error", "abstain, zero or stop"
            )
        self.rewards, self.policy = rewards, policy
        self.max_failure_rate, self.timeout_s, self.min_calls = max_failure_rate, timeout_s, min_calls
        self.log_path = log_path
        self.calls = {n: 0 for n, _, _ in rewards}
        self.failures = {n: 0 for n, _, _ in rewards}
        # fields each logged failure carries (GRPO: the step whose completions are scored, so a
        # resume can drop the lines of work it redoes)
        self.log_fields: dict = {}
        self._kwargs = {n: _accepted_kwargs(f) for n, f, _ in rewards}

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.rewards]

    def _call(self, fn: Callable, args: tuple, kwargs: dict):
        """(value, error text or None); the call runs in a daemon thread so a hang costs `timeout_s`."""
        if self.timeout_s <= 0:
            try:
                return fn(*args, **kwargs), None
            except Exception as e:  # noqa: BLE001
                return None, f"{type(e).__name__}: {e}"
        box: dict = {}

        def target():
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported, never raised into the loop
                box["error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            return None, f"timed out after {self.timeout_s:g} s"
        return box.get("value"), box.get("error")

    def _fail(self, name: str, reason: str, prompt, completion: str) -> float | None:
        self.failures[name] += 1
        if self.log_path is not None:
            line = {
                "time": time.time(),
                **self.log_fields,
                "reward": name,
                "reason": reason,
                "prompt": prompt,
                "completion": completion[:2000],
            }
            append_jsonl(self.log_path, line)  # a torn line or a full disk is handled there
        where = f"reward {name!r}" + (f" (log: {self.log_path})" if self.log_path else "")
        if self.policy == "stop":
            raise RewardStop(
                "E549", f"reward function failed: {reason}", where, "fix the function, or --reward-on-error abstain"
            )
        calls = self.calls[name]
        if calls >= self.min_calls and self.failures[name] / calls > self.max_failure_rate:
            raise RewardStop(
                "E549",
                f"reward function failed on {self.failures[name]} of {calls} calls (last: {reason})",
                where,
                f"fix the function; runs stop above a {self.max_failure_rate:.0%} failure rate",
            )
        return 0.0 if self.policy == "zero" else None

    def score(self, prompt, completion: str, row: dict) -> dict[str, float | None]:
        """Each function's reward for one completion (None: abstained or failed under `abstain`)."""
        out: dict[str, float | None] = {}
        for name, fn, _ in self.rewards:
            accepted = self._kwargs[name]
            kwargs = row if accepted is None else {k: v for k, v in row.items() if k in accepted}
            self.calls[name] += 1
            value, error = self._call(fn, copy.deepcopy((prompt, completion)), copy.deepcopy(kwargs))
            if error is not None:
                out[name] = self._fail(name, error, prompt, completion)
            elif value is None:
                out[name] = None  # an abstention is an answer, not a failure
            elif not isinstance(value, numbers.Real):  # bools count as 1/0
                out[name] = self._fail(name, f"returned {type(value).__name__}, not a number", prompt, completion)
            else:
                out[name] = self._number(name, value, prompt, completion)
        return out

    def _number(self, name: str, value, prompt, completion: str) -> float | None:
        try:
            v = float(value)
        except Exception:  # noqa: BLE001 - an int too large for a float, a broken __float__
            v = math.inf
        if math.isfinite(v) and abs(v) <= FLOAT32_MAX:
            return v
        why = "beyond float32's range" if math.isfinite(v) else "not a finite float"
        return self._fail(name, f"returned {str(value)[:40]} ({why})", prompt, completion)

    def total(self, scores: dict[str, float | None]) -> float:
        """Weighted sum over the functions that gave a value (abstentions add nothing)."""
        return sum(w * scores[n] for n, _, w in self.rewards if scores[n] is not None)

    def failure_counts(self) -> dict[str, int]:
        return dict(self.failures)

    def counts(self) -> dict[str, dict[str, int]]:
        """The calls and failures so far, per function: what a checkpoint holds (the rate check
        counts over the whole run, so a resumed run needs them back)."""
        return {"calls": dict(self.calls), "failures": dict(self.failures)}

    def restore(self, counts: dict) -> None:
        """Counts as `counts()` gave them; a function they do not name starts at 0."""
        for key, into in (("calls", self.calls), ("failures", self.failures)):
            saved = counts.get(key) or {}
            for name in into:
                into[name] = int(saved.get(name, 0))
