"""Best-of-N scorers: a function from N completions of one prompt to N scores (higher is better).

Specs (the `--scorer` flag):
- `logprob`: mean token log-prob under the model (the sampler's own confidence; free);
- `verifier`: the built-in arithmetic checker: every `a op b = c` step must be right and the
  completion must end in an extractable answer (no gold answer needed);
- `verifier:file.py:fn`: a user check `fn(prompt, completion, **row) -> bool | float`;
- `reward:NAME` / `reward:file.py:fn`: a reward function of the GRPO registry
  (`mlxpt.rewards`), called through its guard (errors and None score -inf, never crash);
  `reward:accuracy` needs the row's gold `answer` (an oracle: useful in `mlxpt eval`, not in chat);
- `rm:RUN`: a trained reward-model run (`mlxpt train rm`), scored in batches;
- `prm:RUN`: a process reward model run (`mlxpt train prm`, decode/prm.py): a completion's steps
  are cut at the PRM's step delimiter (a newline by default), and its score is the lowest step
  score (step-beam and tree read every step, and cut their steps at the same delimiter);
- `prm+verifier:RUN`: the same, each step's PRM score times the arithmetic verifier's check of
  that step (`step_checks`): the verifier rules out a slip, the PRM judges the rest (a wrong
  operation or a missing number, which no arithmetic check sees).

`check_spec` validates a spec before any model loads; `make_scorer` builds it (lazy imports).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlxpt.errors import ConfigError

KINDS = ("logprob", "verifier", "reward:NAME", "reward:file.py:fn", "verifier:file.py:fn", "rm:RUN", "prm:RUN",
         "prm+verifier:RUN")  # fmt: skip
_HINT = (
    "use logprob, verifier, verifier:file.py:fn, reward:NAME, reward:file.py:fn, rm:RUN, prm:RUN or prm+verifier:RUN"
)
PRM_KINDS = ("prm", "prm+verifier")
DEFAULT_DELIMITER = "\n"  # a step search's steps end here unless a PRM scorer or --step-delimiter says otherwise

# "12 * 3 = 36", "36 - 4 = 32", "7 + 5 + 2 = 14"; x and × for multiplication, ÷ for division.
_NUM = r"-?\d+(?:\.\d+)?"
_STEP_RE = re.compile(rf"({_NUM}(?:\s*[-+*/x×÷]\s*{_NUM})+)\s*=\s*({_NUM})(?![\d.]*\s*[-+*/x×÷]\s*\d)")


def _bad(what: str, spec: str) -> ConfigError:
    return ConfigError("E622", what, f"--scorer {spec}", _HINT)


def check_spec(spec: str | None) -> None:
    """Raise ConfigError E622 for a malformed spec or a missing file/folder (nothing is loaded)."""
    if spec is None:
        return
    if not isinstance(spec, str) or not spec.strip():
        raise _bad("empty scorer", str(spec))
    if spec in ("logprob", "verifier"):
        return
    kind, _, rest = spec.partition(":")
    if kind not in ("reward", "verifier", "rm", *PRM_KINDS) or not rest:
        raise _bad(f"unknown scorer {spec!r}", spec)
    if kind == "rm":
        if not Path(rest).expanduser().is_dir():
            raise ConfigError("E622", "reward-model run folder not found", rest, "pass rm:runs/<id> of an rm run")
        return
    if kind in PRM_KINDS:
        if not Path(rest).expanduser().is_dir():
            raise ConfigError(
                "E628",
                "process-reward-model run folder not found",
                f"--scorer {spec}",
                f"pass {kind}:runs/<id> of a prm run",
            )
        return
    if ":" in rest or rest.endswith(".py"):
        path = rest.rsplit(":", 1)[0] if ":" in rest else rest
        if ":" not in rest:
            raise _bad(f"{spec!r} names a file but no function", spec)
        if not Path(path).expanduser().is_file():
            raise ConfigError("E622", "scorer file not found", path, f"give an existing .py file: {kind}:file.py:fn")
    elif kind == "verifier":
        raise _bad(f"unknown verifier {rest!r}", spec)


def check_base_model(spec: str | None, model_ref: str | Path | None) -> None:
    """Refuse (E528) a `prm:RUN` (or `prm+verifier:RUN`) scorer trained on another base model than
    the policy's (`model_ref`: a model reference or a run folder), from the PRM run's config:
    before any weights load. Other scorers score text and may come from any model."""
    run = prm_run(spec)
    if run is None or model_ref is None:
        return
    try:
        from mlxpt.decode.prm import check_base
    except ImportError:  # no PRMs in this install: make_scorer says so (E628)
        return
    check_base(Path(run).expanduser(), model_ref)


def prm_run(spec) -> str | None:
    """The run folder of a `prm:RUN` or `prm+verifier:RUN` spec; None for any other scorer."""
    if not isinstance(spec, str):
        return None
    kind, _, rest = spec.partition(":")
    return rest if kind in PRM_KINDS and rest else None


def prm_delimiter(scorer) -> str | None:
    """The step delimiter of a PRM scorer: a `prm:RUN` spec's (from the run's config; nothing
    loads), a built scorer's or a PRM object's; None for any other scorer."""
    run = prm_run(scorer)
    if run is not None:
        try:
            from mlxpt.decode.prm import saved_delimiter
        except ImportError:  # no PRMs in this install: make_scorer says so (E628)
            return None
        return saved_delimiter(Path(run).expanduser())
    prm = getattr(scorer, "prm", None) or (scorer if hasattr(scorer, "score_many") else None)
    delimiter = getattr(prm, "delimiter", None)
    return delimiter if isinstance(delimiter, str) and delimiter else None


def search_delimiter(scorer, delimiter: str | None) -> str:
    """The text a step search cuts steps at: `delimiter` where given (None: not given), else the
    PRM scorer's, else a newline. A PRM scores steps as it was trained, each followed by its own
    delimiter, so a given one that differs from the PRM's is refused (E638)."""
    theirs = prm_delimiter(scorer)
    if delimiter is None:
        return theirs or DEFAULT_DELIMITER
    if theirs is not None and delimiter != theirs:
        raise ConfigError(
            "E638", f"--step-delimiter {delimiter!r} is not the step delimiter {theirs!r} the PRM was trained with",
            "--step-delimiter", f"give --step-delimiter {theirs!r} (the PRM's), or use a PRM trained with {delimiter!r}",
        )  # fmt: skip
    return delimiter


def step_checks(steps: Sequence[str], finished: bool, extract_how: str = "auto") -> list[float]:
    """The arithmetic verifier per step: each step's share of right `a op b = c` equations (1.0
    with none); the last step of a finished solution with no extractable answer scores 0."""
    from mlxpt.rewards.extract import extract

    out = []
    for text in steps:
        ok, total = arithmetic_steps(text)
        out.append(ok / total if total else 1.0)
    if finished and out and extract("\n".join(steps), extract_how) is None:
        out[-1] = 0.0
    return out


def arithmetic_steps(text: str) -> tuple[int, int]:
    """(correct, total) `a op b = c` steps in `text`, evaluated left to right with * and / first."""
    ok = total = 0
    for expr, result in _STEP_RE.findall(text or ""):
        value = _evaluate(expr)
        if value is None:
            continue
        total += 1
        ok += math.isclose(value, float(result), rel_tol=1e-6, abs_tol=1e-6)
    return ok, total


def _evaluate(expr: str) -> float | None:
    """An arithmetic expression of numbers and + - * / (x, ×, ÷ allowed); None when malformed."""
    tokens = re.findall(r"\d+(?:\.\d+)?|[-+*/x×÷]", expr.replace(" ", ""))
    if len(tokens) > 1 and tokens[0] == "-":  # a leading minus sign
        tokens = ["-" + tokens[1], *tokens[2:]]
    nums, ops = [], []
    expect_num = True
    for t in tokens:
        if expect_num:
            try:
                nums.append(float(t))
            except ValueError:
                return None
        else:
            ops.append({"x": "*", "×": "*", "÷": "/"}.get(t, t))
        expect_num = not expect_num
    if len(nums) != len(ops) + 1:
        return None
    terms, signs, cur = [], [1.0], nums[0]
    for op, n in zip(ops, nums[1:], strict=True):
        if op == "*":
            cur *= n
        elif op == "/":
            if n == 0:
                return None
            cur /= n
        else:
            terms.append(cur)
            signs.append(1.0 if op == "+" else -1.0)
            cur = n
    terms.append(cur)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def arithmetic_verifier(prompt, completion: str, extract_how: str = "auto", **_) -> float:
    """Built-in verifier: 1.0 when every arithmetic step is right and an answer is given, less for
    each wrong step; 0.0 with no extractable answer. No gold answer needed."""
    from mlxpt.rewards.extract import extract

    if extract(completion, extract_how) is None:
        return 0.0
    ok, total = arithmetic_steps(completion)
    if total == 0:
        return 0.5  # an answer, but no checkable work
    return ok / total


@dataclass
class Scorer:
    """`score(prompt, completions, row) -> list[float]`; `name` is the spec it came from."""

    name: str
    score: Callable[[object, Sequence, dict], list[float]]
    needs_row: bool = False  # True for scorers that read row fields such as the gold answer

    def __call__(self, prompt, completions: Sequence, row: dict | None = None) -> list[float]:
        scores = [float(s) for s in self.score(prompt, completions, row or {})]
        if len(scores) != len(completions):
            raise ConfigError("E622", f"scorer gave {len(scores)} scores for {len(completions)} samples", self.name)
        return [s if math.isfinite(s) else -math.inf for s in scores]


def _text(c) -> str:
    return c if isinstance(c, str) else c.text


def _guarded(name: str, fn: Callable) -> Callable:
    """Call `fn` per completion through the reward guard: failures and None score -inf."""
    from mlxpt.rewards import RewardGuard

    guard = RewardGuard([(name, fn, 1.0)], policy="abstain", max_failure_rate=1.0, timeout_s=10.0)

    def score(prompt, completions, row):
        out = []
        for c in completions:
            extra = {"completion_tokens": len(getattr(c, "tokens", []) or [])}
            value = guard.score(prompt, _text(c), {**row, **extra})[name]
            out.append(-math.inf if value is None else float(value))
        return out

    return score


def _load_user_fn(kind: str, rest: str, spec: str) -> tuple[str, Callable]:
    try:
        from mlxpt.rewards import load_reward
    except ImportError:
        raise ConfigError(
            "E622", "the reward registry (mlxpt.rewards) is not available", spec, "use logprob or verifier"
        ) from None
    return load_reward(rest)


def make_scorer(spec: str | None, model=None, tokenizer=None) -> Scorer:
    """The scorer for `spec` (see the module doc); None means `logprob`."""
    spec = spec or "logprob"
    check_spec(spec)
    if spec == "logprob":

        def by_logprob(prompt, completions, row):
            return [
                (sum(c.logprobs) / len(c.logprobs)) if getattr(c, "logprobs", None) else -math.inf for c in completions
            ]

        return Scorer(spec, by_logprob)
    if spec == "verifier":
        return Scorer(spec, _guarded_or_plain("verifier", arithmetic_verifier))
    kind, _, rest = spec.partition(":")
    if kind == "rm":
        from mlxpt.decode.reward_model import load_reward_model

        rm = load_reward_model(rest)

        def by_rm(prompt, completions, row):
            return rm.score_batch([prompt] * len(completions), [_text(c) for c in completions])

        return Scorer(spec, by_rm)
    if kind in PRM_KINDS:
        prm = load_prm(rest, tokenizer)
        verify = kind == "prm+verifier"
        delimiter = getattr(prm, "delimiter", None) or DEFAULT_DELIMITER

        def by_prm(prompt, completions, row):  # steps cut where the PRM's own steps end
            steps = [[x for x in _text(c).split(delimiter) if x.strip()] or [""] for c in completions]
            got = prm.score_many(prompt, steps)
            if verify:
                got = [
                    [a * b for a, b in zip(s, step_checks(t, True), strict=True)]
                    for s, t in zip(got, steps, strict=True)
                ]
            return [min(s) if s else -math.inf for s in got]

        scorer = Scorer(spec, by_prm)
        scorer.prm = prm  # step search scores every step with it (step_search.make_step_scorer)
        scorer.verify_steps = verify
        return scorer
    if kind == "reward" and ":" not in rest and not rest.endswith(".py"):
        try:
            from mlxpt.rewards import REWARDS
        except ImportError:
            raise ConfigError(
                "E622", "the reward registry (mlxpt.rewards) is not available", spec, "use logprob or verifier"
            ) from None
        if rest not in REWARDS:
            raise ConfigError(
                "E622", f"unknown reward {rest!r}", f"--scorer {spec}", f"use one of {', '.join(REWARDS)}"
            )
        return Scorer(spec, _guarded(rest, REWARDS[rest]), needs_row=rest == "accuracy")
    name, fn = _load_user_fn(kind, rest, spec)  # a verifier's True/False scores 1/0
    return Scorer(spec, _guarded(name, fn), needs_row=True)


def load_prm(run: str, tokenizer=None):
    """The process reward model of a `mlxpt train prm` run (decode/prm.py, imported lazily); with
    the policy's `tokenizer`, a PRM trained with another tokenizer is refused."""
    try:
        from mlxpt.decode.prm import load_process_reward_model
    except ImportError:
        raise ConfigError(
            "E628", "process reward models are not available in this install", f"--scorer prm:{run}",
            "use --scorer verifier, logprob or rm:RUN",
        ) from None  # fmt: skip
    return load_process_reward_model(run, tokenizer=tokenizer)


def _guarded_or_plain(name: str, fn: Callable) -> Callable:
    """The guarded scorer when the reward registry exists, else a plain try/except per call."""
    try:
        return _guarded(name, fn)
    except ImportError:

        def score(prompt, completions, row):
            out = []
            for c in completions:
                try:
                    out.append(float(fn(prompt, _text(c), **row)))
                except Exception:  # noqa: BLE001 - a failing check scores lowest, never crashes
                    out.append(-math.inf)
            return out

        return score
