"""Reward model on the shared runner: a scalar head on a LoRA-tuned backbone, trained with the
Bradley–Terry loss on preference pairs, and a scorer for any (prompt, response).

Objective: -log σ(r(x, c) - r(x, r)), r = w · h_last, where h_last is the backbone's final
(normed) hidden state at the last token of prompt + response (the end-of-turn token).

Deviations and simplifications:
- The head is one bias-free Linear(hidden, 1) in float32 (a bias cancels in the BT loss and would
  never train); it starts random (normal, std 1/√hidden) from the run seed, so the LoRA weights
  get gradient from step 1. It is saved beside the adapter as `reward_head.safetensors`; the
  adapter files stay mlx-lm's format (the vocabulary head is simply never used).
- The backbone is the instruct model with LoRA/DoRA (or `full` on the last layers), not a
  separately SFT-ed model; chosen and rejected go through one concatenated forward pass.
- Optional centring term λ (r_c + r_r)² (TRL's `center_rewards_coefficient`); off by default.
- Scoring runs the whole prompt + response without the training length limit; the reward is read
  at the response's own end-of-turn token, as in training.
- MLX backend only (the NumPy backend refuses `rm` with E516).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from mlxpt.config import RMConfig
from mlxpt.data.preference import PrefExample
from mlxpt.errors import ConfigError, DataError, ModelError
from mlxpt.train import objectives
from mlxpt.train.dpo import prepare_data, read_rows
from mlxpt.train.loop import Task
from mlxpt.train.runner import Method, pad_id_of, run_training

HEAD_FILE = "reward_head.safetensors"
HEAD = "reward_head"  # the head's attribute on the model (and its key prefix)


def add_reward_head(model, seed: int = 0) -> None:
    """Attach a trainable bias-free Linear(hidden, 1) as `model.reward_head` (float32)."""
    import mlx.core as mx
    import mlx.nn as nn

    hidden = getattr(getattr(model, "args", None), "hidden_size", None)
    if not callable(getattr(model, "model", None)) or not hidden:
        raise ConfigError(
            "E519",
            f"{type(model).__module__} has no `model` backbone with a hidden_size",
            "model",
            "a reward model needs an mlx-lm decoder (llama, mistral, qwen2, ...)",
        )
    head = nn.Linear(hidden, 1, bias=False)
    head.weight = mx.random.normal((1, hidden), key=mx.random.key(seed + 1)) / hidden**0.5
    setattr(model, HEAD, head)


def save_reward_model(folder: str | Path, model, adapter_config: dict) -> None:
    """The head to `reward_head.safetensors`, the rest to mlx-lm's adapter files (each atomic)."""
    from mlxpt.runs import atomic_write_json, save_safetensors_atomic
    from mlxpt.train.adapters import ADAPTER_FILE, CONFIG_FILE, trainable

    folder = Path(folder)
    arrays = {k: np.array(v) for k, v in trainable(model).items()}
    head = {k: v for k, v in arrays.items() if k.startswith(HEAD + ".")}
    save_safetensors_atomic(
        folder / HEAD_FILE, head, {"format": "mlx", "hidden_size": str(head[f"{HEAD}.weight"].shape[1])}
    )
    save_safetensors_atomic(
        folder / ADAPTER_FILE, {k: v for k, v in arrays.items() if k not in head}, {"format": "mlx"}
    )
    atomic_write_json(folder / CONFIG_FILE, adapter_config)


# ---- training ------------------------------------------------------------------------------------


def collate_rm(seqs: list[list[int]], pad_id: int, pad_to: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (B, L) int32 right-padded, last (B,) int32 index of each row's last token)."""
    L = -(-max(len(s) for s in seqs) // pad_to) * pad_to
    inputs = np.full((len(seqs), L), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        inputs[i, : len(s)] = s
    return inputs, np.array([len(s) - 1 for s in seqs], dtype=np.int32)


def collate_pairs(pairs: list[PrefExample], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """2B rows, B chosen then B rejected (prompt + response each)."""
    return collate_rm([p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs], pad_id)


def make_method(cfg: RMConfig) -> Method:
    def task(cfg_, tokenizer) -> Task:
        return Task(
            collate=partial(collate_pairs, pad_id=pad_id_of(tokenizer)),
            length=lambda p: len(p.prompt) + max(len(p.chosen), len(p.rejected)),
            tokens=lambda p: 2 * len(p.prompt) + len(p.chosen) + len(p.rejected),
        )

    objective = partial(objectives.bt_objective, center_coef=cfg.rm.center_rewards_coefficient)
    return Method(
        name="rm", read=read_rows, encode=prepare_data, objective=objective, task=task, rows_per_example=2,
        output="reward",
    )  # fmt: skip


def run_rm(
    cfg: RMConfig,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) a reward model; return (run folder, "finished" | "interrupted")."""
    if cfg.train.backend != "mlx":
        raise ConfigError(
            "E516", f"the {cfg.train.backend} backend cannot train a reward model", "backend", "use --backend mlx"
        )
    if resume_dir is not None:
        from mlxpt.runs import read_config

        method = read_config(resume_dir).get("method", "sft")
        if method != "rm":
            raise ConfigError(
                "E517",
                f"this is a {method} run, not a reward model",
                str(resume_dir),
                f"resume it with `mlxpt train --resume {resume_dir}`, or start a new rm run",
            )
    return run_training(make_method(cfg), cfg, resume_dir=resume_dir, emit=emit, stop=stop)


# ---- scoring -------------------------------------------------------------------------------------


class RewardModel:
    """Scores (prompt, response) pairs with a trained reward head: higher is preferred.

    `prompt` is a string (one user turn) or a message list ending with a user turn, chat-templated
    as in training; `response` is a string (one assistant turn) or a list of assistant messages."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        from mlxpt.data.encode import _Tok

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._tok = _Tok(tokenizer)
        self._pad = pad_id_of(tokenizer)

    def encode(self, prompt, reply, where: str = "score") -> list[int]:
        """Token ids of prompt + response, exactly as a training pair is encoded."""
        from mlxpt.data.preference import _check, _encode

        problems: list[DataError] = []

        def err(code, what, hint=None):
            problems.append(DataError(code, what, where, hint))

        # A string reply is scored whatever it holds (best-of-N may sample an empty one); the
        # prompt, and replies given as message lists, are checked as training data is.
        text, response = isinstance(reply, str), reply
        if isinstance(prompt, str) and isinstance(reply, list):
            prompt = [{"role": "user", "content": prompt}]  # a message-list reply: the chat form
        if text:
            response = [{"role": "assistant", "content": "x"}] if isinstance(prompt, list) else "x"
        row = _check({"prompt": prompt, "chosen": response, "rejected": response}, where, err)
        if row is None:
            raise problems[0]
        if text:
            row.chosen = [{"role": "assistant", "content": reply}]
        head, ids, _ = _encode(row, self._tok)
        return head + ids

    def score(self, prompt, response) -> float:
        """The reward of one response to one prompt."""
        return self.score_batch([prompt], [response])[0]

    def score_batch(self, prompts: Sequence, responses: Sequence) -> list[float]:
        """Rewards of `responses[i]` to `prompts[i]`, in order (batched forward passes)."""
        import mlx.core as mx

        from mlxpt.backends.mlx_backend import row_rewards

        if isinstance(prompts, (str, dict)) or isinstance(responses, (str, dict)):
            raise DataError("E197", "score_batch takes lists of prompts and responses", "score_batch", "use score()")
        if len(prompts) != len(responses):
            raise DataError(
                "E197",
                f"{len(prompts)} prompts but {len(responses)} responses",
                "score_batch",
                "pass one prompt per response (repeat the prompt for best-of-N)",
            )
        seqs = [self.encode(p, r, f"score_batch[{i}]") for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        scores = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            inputs, last = collate_rm([seqs[i] for i in idx], self._pad)
            r = row_rewards(self.model, mx.array(inputs), mx.array(last))
            mx.eval(r)
            for i, v in zip(idx, np.array(r).tolist(), strict=True):
                scores[i] = float(v)
        return scores


def load_reward_model(run_dir: str | Path, batch_size: int = 8) -> RewardModel:
    """The reward model of a finished (or checkpointed) `mlxpt train rm` run folder."""
    from mlxpt.models.loader import load
    from mlxpt.runs import read_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError("E518", "reward model run folder not found", str(run_dir), "pass runs/<id> of an rm run")
    saved = read_config(run_dir)
    if saved.get("method") != "rm":
        raise ModelError(
            "E518",
            f"this is a {saved.get('method', 'sft')} run, not a reward model",
            str(run_dir),
            "train one with `mlxpt train rm`",
        )
    head_path = run_dir / HEAD_FILE
    if not head_path.is_file():
        raise ModelError(
            "E518", f"no {HEAD_FILE} in the run (not saved yet, or deleted)", str(run_dir), "finish or resume the run"
        )
    weights = _read_head(head_path)
    cfg = RMConfig.from_dict({k: v for k, v in saved.items() if k in ("model", "data", "adapter", "train", "rm")})
    model, tokenizer = load(
        cfg.model.model,
        adapter=str(run_dir),
        quantize=cfg.model.quantize,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    add_reward_head(model)
    w = weights.get(f"{HEAD}.weight")
    if w is None or tuple(w.shape) != tuple(model.reward_head.weight.shape):
        raise ModelError(
            "E518",
            f"{HEAD_FILE} does not fit this model (expected {HEAD}.weight of shape {tuple(model.reward_head.weight.shape)})",
            str(head_path),
            "load it with the model it was trained on",
        )
    import mlx.core as mx

    model.reward_head.weight = mx.array(w.astype(np.float32))
    model.eval()
    return RewardModel(model, tokenizer, batch_size=batch_size)


def _read_head(path: Path) -> dict[str, np.ndarray]:
    """The head's tensors; anything but a readable safetensors file is a one-line error (never unpickled)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ModelError(
            "E518", f"{HEAD_FILE} is not a valid safetensors file ({str(e).splitlines()[0][:80]})", str(path),
            "re-save the reward model with mlxpt train rm",
        ) from None  # fmt: skip
