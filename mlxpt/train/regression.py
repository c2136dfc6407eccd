"""The forgetting monitor: at each evaluation, how the tuned model does on data it is not trained on.

Every method's run scores a small regression set (`--regression-data`, by default the bundled
general probe: bare sums and word problems of the out-of-distribution splits, assets/ood/arith.jsonl
and test.jsonl, taken in turn, plus plain instructions with the base model's own answers,
assets/general/self_answers.jsonl) and logs
two numbers in its eval events:
- `regression_accuracy`: greedy accuracy (%) on the rows with an `answer` (the answer is read
  with the same extractor as `mlxpt eval`, rewards/extract.py);
- `regression_kl`: the mean per-token KL(tuned || base) over the reference replies of the rows
  with an assistant turn, the base being the adapter-off pass (backend.kl_to_reference): no second
  copy of the weights (not logged for full fine-tuning, which has no such pass).
Step 0 is the base model (adapters start as a no-op); a later accuracy more than
`--forgetting-warn` points below it emits a `forgetting` event and a warning (once per session, and
again each time the drop grows by that much). A resumed run reads step 0's numbers from its
metrics.jsonl. The set is read and checked before any weights are read (E165/E166).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import numpy as np

from mlxpt.config import ASSETS
from mlxpt.errors import DataError

GENERAL = "general"
OFF = ("none", "off", "")
GENERAL_FILES = (
    ASSETS / "ood" / "arith.jsonl",  # bare sums: the base model gets ~23 %, so a drop has room to show
    ASSETS / "ood" / "test.jsonl",  # word problems in other contexts and step counts (base ~4 %)
    ASSETS / "general" / "self_answers.jsonl",  # plain instructions, the base model's own answers
)
MAX_TOKENS = 96  # greedy tokens per answer: the bundled worked answers take under 80
BATCH = 16  # prompts decoded together


@dataclass
class ProbeRow:
    messages: list[dict]  # the prompt: ends with a user turn
    answer: str | None  # scored by greedy accuracy when given
    reply: str | None  # the reference assistant reply: scored by KL to the base when given
    where: str


@dataclass
class Probe:
    rows: list[ProbeRow]
    source: str
    accuracy_rows: list[ProbeRow] = field(default_factory=list)
    kl_rows: list[ProbeRow] = field(default_factory=list)


def _rows_of(path: Path) -> list[ProbeRow]:
    """Every row of one regression file; the JSON-lines walk (UTF-8, one object per line,
    duplicate keys) is the data readers' (data/lines.py), the fields are checked here (E166)."""
    from mlxpt.data.lines import ObjectLines

    lines = ObjectLines(path, "an object with messages and/or prompt + answer")
    rows, errors = [], []
    for where, obj in lines:
        row = _row(obj, where)
        if isinstance(row, DataError):
            errors.append(row)
        else:
            rows.append(row)
    errors = lines.errors + errors
    if errors:
        errors.sort(key=lambda e: int(e.where.rsplit(":", 1)[1]) if e.where and ":" in e.where else 0)
        first = errors[0]
        raise DataError(first.code, first.what, first.where, first.hint, errors=errors)
    return rows


def _row(obj, where: str) -> ProbeRow | DataError:
    hint = 'give "messages" (ending with an assistant reply) and/or "prompt" with "answer"'
    if not isinstance(obj, dict):
        return DataError("E166", "a row must be a JSON object", where, hint)
    msgs = obj.get("messages")
    if msgs is None and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        msgs = [{"role": "user", "content": obj["prompt"]}]
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            msgs.insert(0, {"role": "system", "content": obj["system"]})
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
    )
    if not ok:
        return DataError("E166", "row has no usable messages or prompt", where, hint)
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    reply = None
    if msgs[-1]["role"] == "assistant":
        reply = msgs[-1]["content"]
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        return DataError("E166", "the prompt must end with a user turn", where, hint)
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, (dict, list, bool)) or not str(answer).strip()):
        return DataError("E166", "`answer` must be a number or a short text", where, hint)
    if answer is None and reply is None:
        return DataError("E166", "row has neither an `answer` nor an assistant reply: nothing to score", where, hint)
    return ProbeRow(msgs, None if answer is None else str(answer), reply, where)


def load_probe(spec: str, rows: int) -> Probe | None:
    """The regression set of `--regression-data` (None when it is off): up to `rows` rows scored
    by accuracy and up to `rows` by KL. E165 for a missing or unreadable file, E166 for bad rows."""
    if spec is None or spec.strip().lower() in OFF:
        return None
    if spec == GENERAL:
        paths = [p for p in GENERAL_FILES if p.is_file()]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError("E165", "regression data file not found", spec, "give a JSONL file, `general` or `none`")
        paths = [path]
    per_file = [_rows_of(p) for p in paths]
    all_rows = [r for rows_ in per_file for r in rows_]
    if not all_rows:
        raise DataError("E165", "the regression data has no rows", spec, "add rows, or pass --regression-data none")
    probe = Probe(all_rows, spec)
    # accuracy rows taken from the files in turn (the general probe: sums and word problems alike)
    scored = [[r for r in rows_ if r.answer is not None] for rows_ in per_file]
    probe.accuracy_rows = [r for group in zip_longest(*scored) for r in group if r is not None][:rows]
    # KL on the instructions first (the general behaviour a narrow run may lose), then the rest
    kl = [r for r in all_rows if r.reply is not None]
    kl.sort(key=lambda r: r.answer is not None)
    probe.kl_rows = kl[:rows]
    return probe


class ForgettingMonitor:
    """Scores the probe with the backend's current model; warns on a drop against step 0."""

    def __init__(self, probe: Probe, tokenizer, warn_points: float, emit: Callable[[dict], None], baseline=None):
        self.probe, self.tokenizer, self.warn, self.emit = probe, tokenizer, warn_points, emit
        self.baseline: float | None = baseline  # step 0's accuracy (%), the base model's
        self.warned_at: float | None = None  # the drop last warned about
        self._prompts = [_prompt_ids(tokenizer, r.messages) for r in probe.accuracy_rows]
        self._kl_batch = _kl_batch(tokenizer, probe.kl_rows)

    def __call__(self, backend, step: int) -> dict:
        out: dict = {}
        if self._prompts:
            texts = _greedy(backend, self.tokenizer, self._prompts)
            from mlxpt.rewards.extract import extract, same_answer

            right = sum(
                same_answer(extract(t, "auto"), r.answer) for t, r in zip(texts, self.probe.accuracy_rows, strict=True)
            )
            out["regression_accuracy"] = 100.0 * right / len(texts)
        # full fine-tuning has no adapter-off pass: accuracy only
        if self._kl_batch is not None and backend.adapter_config.get("fine_tune_type") != "full":
            out["regression_kl"] = _mean_kl(backend, *self._kl_batch)
        self._check(step, out.get("regression_accuracy"))
        return out

    def _check(self, step: int, accuracy: float | None) -> None:
        if accuracy is None:
            return
        if step == 0 or self.baseline is None:
            self.baseline = accuracy if step == 0 else self.baseline
            return
        drop = self.baseline - accuracy
        if self.warn <= 0 or drop <= self.warn:
            return
        if self.warned_at is not None and drop < self.warned_at + self.warn:
            return
        self.warned_at = drop
        self.emit({"event": "forgetting", "step": step, "regression_accuracy": accuracy,
                   "baseline": self.baseline, "drop": drop})  # fmt: skip
        self.emit({"event": "warning", "message": (
            f"forgetting: accuracy on the regression data fell {drop:.1f} points below step 0's "
            f"({accuracy:.1f}% against {self.baseline:.1f}%); consider fewer steps, a lower learning rate, "
            f"--kl-to-base or --replay"
        )})  # fmt: skip


def baseline_from(metrics_path: Path) -> float | None:
    """Step 0's regression accuracy from a run's metrics.jsonl (a resumed run's baseline)."""
    from mlxpt.runs import read_jsonl

    if not metrics_path.is_file():
        return None
    for r in read_jsonl(metrics_path):
        if isinstance(r, dict) and r.get("event") == "eval" and r.get("step") == 0:
            v = r.get("regression_accuracy")
            if isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
    return None


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    from mlxpt.decode.generate import chat_prompt

    return chat_prompt(tokenizer, messages)


def _kl_batch(tokenizer, rows: list[ProbeRow]):
    """(inputs, mask) of the reference replies, teacher-forced; None without such rows."""
    if not rows:
        return None
    from mlxpt.data.batching import collate
    from mlxpt.data.encode import encode_all, pad_id_of
    from mlxpt.data.formats import Row

    data = [Row(r.where, "chat", {"messages": [*r.messages, {"role": "assistant", "content": r.reply}]}) for r in rows]
    examples, _ = encode_all(data, tokenizer, mask="assistant", max_len=1024, overlong="truncate")
    if not examples:
        return None
    inputs, _, mask = collate(examples, pad_id_of(tokenizer))
    return inputs, mask


def _mean_kl(backend, inputs: np.ndarray, mask: np.ndarray) -> float:
    total = weight = 0.0
    for s in range(0, len(inputs), BATCH):
        kl = np.asarray(backend.kl_to_reference(inputs[s : s + BATCH]), np.float64)
        m = mask[s : s + BATCH]
        total += float((kl * m).sum())
        weight += float(m.sum())
    return total / max(weight, 1.0)


def _greedy(backend, tokenizer, prompts: list[list[int]]) -> list[str]:
    """Greedy answers of the backend's current model (batched on MLX; one by one on NumPy)."""
    if backend.name == "mlx":
        from mlxpt.decode.batch import generate_many

        backend.model.eval()
        texts = []
        for s in range(0, len(prompts), BATCH):
            texts += [c.text for c in generate_many(backend.model, tokenizer, prompts[s : s + BATCH], MAX_TOKENS)]
        return texts
    eos = {int(i) for i in _eos_ids(tokenizer)}
    texts = []
    for p in prompts:
        ids = [t for t in backend.model.generate(p, MAX_TOKENS, eos=eos) if t not in eos]
        texts.append(tokenizer.decode(ids))
    return texts


def _eos_ids(tokenizer) -> list[int]:
    from mlxpt.decode.generate import add_stop_tokens

    return list(add_stop_tokens(tokenizer).eos_token_ids)
