"""Memory: an estimate of peak training memory before the first step, and a guard during it.

The estimate counts weights, the trainable parameters' gradients and Adam moments, and the
activations autodiff keeps for the backward pass (per layer: projections, MLP, attention scores)
plus the float32 logits and their gradient. It is deliberately coarse (within ~1.5x of measured
peaks here) and errs high; its job is to refuse the hopeless configuration with numbers and a
suggestion instead of driving a laptop into swap.

A method describes its pass as a `Shape`. Most pass whole rows (`Shape.rows`); GRPO with
shared-prompt scoring runs each prompt once per group and the vocabulary head only where a
completion token is predicted (`Shape.shared_prompts`), several times less than its rows.
Its estimate counts every completion at the length cap: 9.3 GB for 4 prompts x 8 completions of
up to 96 tokens on the default model, whose MLX peak measured 4.2 GB with its ~27-token
completions (the whole-row shape said 15.2 GB and refused 8 prompts on a 24 GB machine).

With gradient checkpointing (`Shape.grad_checkpoint`, `--grad-checkpoint`) the backward recomputes
each block from its input: the pass keeps the hidden state at every block boundary (and its
gradient) plus one block's activations at a time, instead of every block's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from mlxpt.errors import ResourceError


@dataclass(frozen=True)
class Shape:
    """What one training pass holds: positions through the layers, positions through the
    vocabulary head, attention (query, key) pairs per head, and how to say it in an error."""

    tokens: int
    head_tokens: int
    attn_pairs: int
    label: str
    teacher_bytes: int = 0  # a second model held beside the one trained (distillation's teacher)
    grad_checkpoint: bool = False  # blocks recomputed in the backward: one block's activations kept

    @classmethod
    def rows(cls, batch_size: int, seq_len: int) -> Shape:
        n = batch_size * seq_len
        return cls(n, n, n * seq_len, f"batch {batch_size} x {seq_len} tokens")

    @classmethod
    def packed(cls, batch_size: int, seq_len: int, capacity: int, efficiency: float | None = None) -> Shape:
        """`batch_size` rows of up to `seq_len` tokens packed into bins of `capacity` positions
        (the worst case: every row at `seq_len`). Attention is one (bin x bin) block per bin, of
        which only the rows' own causal blocks count; the mask itself is computed whole.
        `efficiency` (real tokens / computed positions of the data) goes into the label."""
        per_bin = max(1, capacity // max(seq_len, 1))
        bins = -(-batch_size // per_bin)
        L = min(batch_size, per_bin) * seq_len
        eff = f", {efficiency:.0%} real tokens" if efficiency is not None else ""
        return cls(bins * L, bins * L, bins * L * L, f"batch {batch_size} packed into {bins} x {L} tokens{eff}")

    @classmethod
    def shared_prompts(cls, prompts: int, group: int, prompt_len: int, completion_len: int) -> Shape:
        """Each of `prompts` prompts once, its `group` completions attending to it."""
        p, c = prompt_len, completion_len
        return cls(
            prompts * (p + group * c),
            prompts * group * c,
            prompts * (p * p + group * c * (p + c)),
            f"{prompts} prompts x {group} completions of up to {c} tokens after a {p}-token prompt",
        )


def estimate_bytes(model, shape: Shape) -> dict:
    from mlx.utils import tree_flatten

    from mlxpt.models.peft import activation_bytes

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    train = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", 1024)
    inter = getattr(args, "intermediate_size", 4 * hidden)
    layers = len(model.layers)
    heads = getattr(args, "num_attention_heads", 8)
    vocab = getattr(args, "vocab_size", 32000)
    per_layer = shape.tokens * (14 * hidden + 4 * inter) * 4 + heads * shape.attn_pairs * 4 * 2
    logits = shape.head_tokens * vocab * 4 * 3
    if shape.grad_checkpoint:  # block inputs and their gradients, one block (and its prefix / adapters) at a time
        boundary = shape.tokens * hidden * 4 * 2
        extra = max(activation_bytes(SimpleNamespace(layers=[b]), shape.tokens, heads) for b in model.layers)
        acts = layers * boundary + per_layer + logits + extra
    else:
        acts = layers * per_layer + logits + activation_bytes(model, shape.tokens, heads)  # prefix / adapters
    est = {"weights": weights, "optimizer": 3 * train, "activations": acts, "total": weights + 3 * train + acts}
    if shape.teacher_bytes:
        est["teacher"] = shape.teacher_bytes
        est["total"] += shape.teacher_bytes
    return est


def linux_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (no mlx import); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    """Memory the process may still use: Metal's working set on a Mac, MemAvailable on Linux."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            info = mx.metal.device_info()
            return int(info.get("max_recommended_working_set_size", 0)) or None
    except Exception:  # noqa: BLE001 - any failure here just means "unknown"
        pass
    return linux_available_bytes() if sys.platform.startswith("linux") else None


def check_fits(model, shape: Shape) -> dict:
    """Raise ResourceError (exit 3) when the estimate exceeds what is available."""
    est = estimate_bytes(model, shape)
    avail = available_bytes()
    est["available"] = avail
    if avail and est["total"] > avail and not os.environ.get("MLXPT_SKIP_MEMORY_CHECK"):
        gb = 1e9
        raise ResourceError(
            "E310",
            f"estimated peak memory {est['total'] / gb:.1f} GB (weights {est['weights'] / gb:.1f}, "
            f"activations {est['activations'] / gb:.1f}) exceeds the {avail / gb:.1f} GB available",
            shape.label + (", each block recomputed (--grad-checkpoint)" if shape.grad_checkpoint else ""),
            "lower --batch-size (use --grad-accum to keep the effective batch), --max-seq-len, or use --quantize 4"
            f"{'' if shape.grad_checkpoint else ' or --grad-checkpoint'}; MLXPT_SKIP_MEMORY_CHECK=1 overrides",
        )
    return est


def low_memory(margin: float = 0.03) -> bool:
    """True when the machine is about to swap (less than `margin` of RAM available, Linux)."""
    avail = linux_available_bytes() if sys.platform.startswith("linux") else None
    if avail is None:
        return False
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False
    return avail < margin * total
