"""Scoring with a trained reward model (`mlxpt train rm`): `load_reward_model(run).score(prompt,
response)`. Prompt + response are encoded exactly as a training pair, batched by length, and the
reward is read at the response's own end-of-turn token; scoring has no training length limit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlxpt.config import RMConfig
from mlxpt.data.encode import _Tok, pad_id_of
from mlxpt.data.preference import _check, _encode
from mlxpt.errors import DataError, ModelError
from mlxpt.models.heads import HEAD_FILE, head_rewards, read_head, set_head
from mlxpt.models.loader import load
from mlxpt.runs import read_config


def collate_rm(seqs: list[list[int]], pad_id: int, pad_to: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (B, L) int32 right-padded, last (B,) int32 index of each row's last token)."""
    L = -(-max(len(s) for s in seqs) // pad_to) * pad_to
    inputs = np.full((len(seqs), L), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        inputs[i, : len(s)] = s
    return inputs, np.array([len(s) - 1 for s in seqs], dtype=np.int32)


class RewardModel:
    """Scores (prompt, response) pairs with a trained reward head: higher is preferred.

    `prompt` is a string (one user turn) or a message list ending with a user turn, chat-templated
    as in training; `response` is a string (one assistant turn) or a list of assistant messages."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._tok = _Tok(tokenizer)
        self._pad = pad_id_of(tokenizer)

    def encode(self, prompt, reply, where: str = "score") -> list[int]:
        """Token ids of prompt + response, exactly as a training pair is encoded."""
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
            r = head_rewards(self.model, mx.array(inputs), mx.array(last))
            mx.eval(r)
            for i, v in zip(idx, np.array(r).tolist(), strict=True):
                scores[i] = float(v)
        return scores


def load_head_run(run_dir: str | Path, method: str, cfg_cls, code: str, what: str) -> tuple:
    """(model with its trained head, tokenizer, the run's config, its saved config.json) of a run
    folder of `method` (`rm`, `prm`) that saved a head; every refusal is a one-line `code` error
    naming `what` the run should be."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(code, f"{what} run folder not found", str(run_dir), f"pass runs/<id> of a {method} run")
    saved = read_config(run_dir)
    if saved.get("method") != method:
        raise ModelError(
            code,
            f"this is a {saved.get('method', 'sft')} run, not a {what}",
            str(run_dir),
            f"train one with `mlxpt train {method}`",
        )
    head_path = run_dir / HEAD_FILE
    if not head_path.is_file():
        raise ModelError(
            code, f"no {HEAD_FILE} in the run (not saved yet, or deleted)", str(run_dir), "finish or resume the run"
        )
    weights = read_head(head_path, code, method)
    sections = ("model", "data", "adapter", "train", method)
    cfg = cfg_cls.from_dict({k: v for k, v in saved.items() if k in sections})
    model, tokenizer = load(
        cfg.model.model,
        adapter=str(run_dir),
        quantize=cfg.model.quantize,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    set_head(model, weights, head_path, code)
    model.eval()
    return model, tokenizer, cfg, saved


def load_reward_model(run_dir: str | Path, batch_size: int = 8) -> RewardModel:
    """The reward model of a finished (or checkpointed) `mlxpt train rm` run folder."""
    model, tokenizer, _, _ = load_head_run(run_dir, "rm", RMConfig, "E518", "reward model")
    return RewardModel(model, tokenizer, batch_size=batch_size)
