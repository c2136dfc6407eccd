"""Scoring with a trained process reward model (`mlxpt train prm`), and the PRM's metrics.

    prm = load_process_reward_model("runs/<id>-prm")
    prm.score_steps(prompt, ["12 + 7 = 19", "19 - 5 = 14"])        # [p1, p2]
    prm.score_many(prompt, [steps_a, steps_b, ...])                 # one batched forward pass

Each score is the probability that the solution is still correct after that step (the head's
logit through a sigmoid), read at the step's end token exactly as in training (data/stepwise.py:
the prompt as the chat template renders it, then every step followed by `prm.delimiter`). A
prefix of steps scores as it does inside the longer solution, so a search may score partial
solutions. A string prompt is one user turn; a message list is a chat prompt (as in training).

`check_compatible(model_path, tokenizer)` (or `load_process_reward_model(run, expect_model=...)`)
refuses (E528) a PRM trained on another base model or with another tokenizer than the policy's.

The metrics are pure functions over per-solution lists of scores and labels (labels >= 0.5 count
as correct): step accuracy, first-error-step accuracy and the ROC AUC over steps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlxpt.config import PRMConfig
from mlxpt.data.encode import _Tok, pad_id_of
from mlxpt.data.stepwise import _prompt, check_delimiter, encode_head, encode_steps
from mlxpt.decode.reward_model import load_head_run
from mlxpt.errors import DataError, MlxptError, ModelError

THRESHOLD = 0.5  # a score (or a label) at or above it says "correct so far"


# ---- metrics ---------------------------------------------------------------------------------------


def _pairs(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[float]]) -> list[tuple[float, bool]]:
    """(score, label is correct) of every step; solutions and steps must line up."""
    if len(scores) != len(labels) or any(len(s) != len(y) for s, y in zip(scores, labels, strict=True)):
        raise ValueError("scores and labels must have one value per step of every solution")
    return [
        (float(p), float(y) >= THRESHOLD)
        for row_scores, row_labels in zip(scores, labels, strict=True)
        for p, y in zip(row_scores, row_labels, strict=True)
    ]


def step_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[float]], threshold: float = THRESHOLD):
    """Share of steps whose score is on the same side of `threshold` as their label (None: no steps)."""
    pairs = _pairs(scores, labels)
    return sum((p >= threshold) == y for p, y in pairs) / len(pairs) if pairs else None


def first_error(values: Sequence[float], threshold: float = THRESHOLD) -> int | None:
    """Index of the first value below `threshold` (the first wrong step), None if there is none."""
    return next((i for i, v in enumerate(values) if float(v) < threshold), None)


def first_error_accuracy(
    scores: Sequence[Sequence[float]], labels: Sequence[Sequence[float]], threshold: float = THRESHOLD
):
    """Share of solutions whose first step scored below `threshold` is their first wrong step
    (a fully correct solution counts when no step scores below it); None for no solutions."""
    _pairs(scores, labels)
    hits = [first_error(s, threshold) == first_error(y) for s, y in zip(scores, labels, strict=True)]
    return sum(hits) / len(hits) if hits else None


def roc_auc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """Area under the ROC curve of `scores` for the binary `labels` (>= 0.5 positive): the chance
    that a correct step outscores a wrong one, ties counting half. None when a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64) >= THRESHOLD
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def step_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[float]]) -> dict:
    """The three metrics, plus the AUC of the last step alone (the PRM read as an outcome model);
    metrics that are undefined on these data are left out."""
    out = {
        "step_accuracy": step_accuracy(scores, labels),
        "first_error_accuracy": first_error_accuracy(scores, labels),
        "auc": roc_auc([p for s in scores for p in s], [y for ys in labels for y in ys]),
        "last_step_auc": roc_auc([s[-1] for s in scores if s], [y[-1] for y in labels if y]),
    }
    return {k: v for k, v in out.items() if v is not None}


# ---- batching ---------------------------------------------------------------------------------------


def collate_steps(
    seqs: Sequence[Sequence[int]], ends: Sequence[Sequence[int]], pad_id: int, pad_to: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (B, L) int32 right-padded, positions (B, S) int32 of each step's end token,
    weights (B, S) float32: 1 for a real step, 0 for padding, whose position is 0)."""
    L = -(-max(len(s) for s in seqs) // pad_to) * pad_to
    S = max(max((len(e) for e in ends), default=1), 1)
    inputs = np.full((len(seqs), L), pad_id, dtype=np.int32)
    positions = np.zeros((len(seqs), S), dtype=np.int32)
    weights = np.zeros((len(seqs), S), dtype=np.float32)
    for i, (s, e) in enumerate(zip(seqs, ends, strict=True)):
        inputs[i, : len(s)] = s
        positions[i, : len(e)] = e
        weights[i, : len(e)] = 1.0
    return inputs, positions, weights


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) without overflow for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


# ---- the model -------------------------------------------------------------------------------------


def model_identity(ref: str | Path) -> tuple[str, str]:
    """(resolved folder, fingerprint) of a model reference; a run folder stands for its base model.
    The fingerprint (config.json and the weight files' names and sizes) makes a copy of the same
    model in another folder the same model."""
    from mlxpt.models.loader import resolve
    from mlxpt.runs import read_config
    from mlxpt.runs.guards import is_run_dir

    p = Path(ref).expanduser()
    if p.is_dir() and is_run_dir(p):
        saved = read_config(p)
        ref = saved.get("model_path") or (saved.get("model") or {}).get("model") or str(ref)
    folder = resolve(str(ref)).resolve()
    h = hashlib.sha256()
    try:
        h.update((folder / "config.json").read_bytes())
        for w in sorted(folder.glob("*.safetensors")):
            h.update(f"{w.name}:{w.stat().st_size}".encode())
    except OSError:
        h.update(str(folder).encode())
    return str(folder), h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id) and the end-of-sequence id."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


class ProcessRewardModel:
    """Scores the steps of (partial) solutions with a trained PRM head: see the module doc."""

    def __init__(self, model, tokenizer, delimiter: str = "\n", model_path: str | None = None, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.delimiter = delimiter  # what ends every step: step search cuts its steps at it
        self.model_path = model_path  # the base model the PRM was trained on (resolved folder)
        self._tok = _Tok(tokenizer)
        self._pad = pad_id_of(tokenizer)

    # -- encoding
    def encode_prompt(self, prompt, where: str = "score") -> list[int]:
        """Token ids of the prompt, as training encodes it (checked as training data is)."""
        problems: list[MlxptError] = []

        def err(code, what, hint=None):
            problems.append(DataError(code, what, where, hint))

        got = _prompt({"prompt": prompt}, err)
        if got is None:
            raise problems[0]
        return encode_head(self._tok, got[0], got[1], self.delimiter, where)

    def encode(self, prompt, steps: Sequence[str], where: str = "score") -> tuple[list[int], list[int]]:
        """(tokens, end index of each step) of prompt + steps, exactly as in training."""
        return encode_steps(self._tok, self.encode_prompt(prompt, where), _check_steps(steps, where), self.delimiter)

    # -- scoring
    def score_steps(self, prompt, steps: Sequence[str]) -> list[float]:
        """P(correct so far) after each step of one (partial) solution, in [0, 1]."""
        return self.score_many(prompt, [steps])[0]

    def score_many(self, prompt, step_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        """score_steps for several (partial) solutions of one prompt: one batched forward pass
        (of at most `batch_size` rows each; more solutions take several)."""
        if isinstance(step_lists, str) or not isinstance(step_lists, Sequence):
            raise DataError(
                "E529", "score_many takes a list of step lists", "score_many", "use score_steps for one solution"
            )  # fmt: skip
        head = self.encode_prompt(prompt, "score_many")
        encoded = [
            encode_steps(self._tok, head, _check_steps(s, f"score_many[{i}]"), self.delimiter)
            for i, s in enumerate(step_lists)
        ]
        out: list[list[float]] = [[] for _ in encoded]
        todo = [i for i, (_, ends) in enumerate(encoded) if ends]
        todo.sort(key=lambda i: len(encoded[i][0]))  # similar lengths share a pass
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s : s + self.batch_size]
            logits = self.logits([encoded[i][0] for i in idx], [encoded[i][1] for i in idx])
            for row, i in enumerate(idx):
                out[i] = sigmoid(logits[row, : len(encoded[i][1])]).astype(float).tolist()
        return out

    def logits(self, seqs: Sequence[Sequence[int]], ends: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, S) head logits at the step ends of already-encoded rows, one forward pass."""
        import mlx.core as mx

        from mlxpt.models.heads import head_rewards

        inputs, positions, _ = collate_steps(seqs, ends, self._pad)
        r = head_rewards(self.model, mx.array(inputs), mx.array(positions))
        mx.eval(r)
        return np.array(r, dtype=np.float32)

    # -- compatibility with a policy
    def check_compatible(self, model_path: str | Path | None = None, tokenizer=None) -> None:
        """Refuse (E528) a policy whose base model (a model reference or a run folder) or whose
        tokenizer is not the one this PRM was trained on."""
        if model_path is not None and self.model_path is not None:
            check_same_model(self.model_path, model_path)
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(self.tokenizer):
            raise ModelError(
                "E528", "the policy's tokenizer is not the one the PRM was trained with", "tokenizer",
                "use a PRM trained on the policy's base model",
            )  # fmt: skip


def check_same_model(trained_on: str | Path, model_path: str | Path) -> None:
    """Refuse (E528) `model_path` unless it is the model `trained_on` (see model_identity)."""
    mine, theirs = model_identity(trained_on), model_identity(model_path)
    if mine[1] != theirs[1]:
        raise ModelError(
            "E528", f"the PRM was trained on {mine[0]}, the policy's base model is {theirs[0]}", str(model_path),
            "train a PRM on the policy's base model (mlxpt train prm --model ...)",
        )  # fmt: skip


def _check_steps(steps, where: str) -> list[str]:
    """Steps as a list of strings (a search may score an empty step: it is scored as it is)."""
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise DataError(
            "E529", f"steps are {type(steps).__name__}, expected a list of strings", where, "one string per step"
        )
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise DataError(
                "E529", f"step {i + 1} is {type(s).__name__}, expected a string", where, "one string per step"
            )
    return list(steps)


def check_base(run_dir: str | Path, expect_model: str | Path | None) -> bool:
    """Refuse (E528) a PRM run whose saved base model is not `expect_model` (a model reference or a
    run folder), from the run's config alone: nothing loads. False where either is not known (the
    load's checks then decide)."""
    if expect_model is None or not Path(run_dir, "config.json").is_file():
        return False
    from mlxpt.runs import read_config

    saved = read_config(run_dir)
    if saved.get("method") != "prm":
        return False
    # the folder the PRM trained on, or (moved or cleared since, e.g. a converted alias) its reference
    trained_on = saved.get("model_path")
    if not trained_on or not Path(trained_on).is_dir():
        trained_on = (saved.get("model") or {}).get("model")
    if not trained_on:
        return False
    check_same_model(trained_on, expect_model)
    return True


def saved_delimiter(run_dir: str | Path) -> str | None:
    """The step delimiter a PRM run was trained with, from its config alone (nothing loads); None
    where the folder is no readable prm run (loading it then says why)."""
    if not Path(run_dir, "config.json").is_file():
        return None
    from mlxpt.runs import read_config

    try:
        saved = read_config(run_dir)
        if saved.get("method") != "prm":
            return None
        section = saved.get("prm") if isinstance(saved.get("prm"), dict) else {}
        return check_delimiter(section.get("step_delimiter", PRMConfig().prm.step_delimiter))
    except MlxptError:
        return None


def load_process_reward_model(
    run_dir: str | Path, expect_model: str | Path | None = None, tokenizer=None, batch_size: int = 32
) -> ProcessRewardModel:
    """The PRM of a finished (or checkpointed) `mlxpt train prm` run folder. With `expect_model`
    (the policy's model reference or run folder) and/or `tokenizer` (the policy's), a PRM trained
    on another base model or tokenizer is refused (E528), after the cheap checks and before the
    PRM's weights load for `expect_model`."""
    checked = check_base(run_dir, expect_model)  # before the PRM's weights load
    model, tok, cfg, saved = load_head_run(run_dir, "prm", PRMConfig, "E527", "process reward model")
    delimiter = check_delimiter(cfg.prm.step_delimiter)
    prm = ProcessRewardModel(model, tok, delimiter, saved.get("model_path") or cfg.model.model, batch_size)
    prm.check_compatible(None if checked else expect_model, tokenizer)
    return prm
