"""MLX backend: mlx-lm model + adapters, `nn.value_and_grad`, compiled steps, bias-corrected
Adam/AdamW (like torch), one evaluation per accumulation window plus one per update.

The base model of a LoRA/DoRA run is the adapter as created (B = 0, m = ||W||): its small arrays
are kept and swapped in for the KL of output="logp_kl" and `kl_to_reference`, so no second copy of
the weights is ever held. The reference of DPO/GRPO (`token_logps(reference=True)`) is the same,
unless the run started from a saved adapter (`start_from`, `--from`): then it is that adapter.

Plain SFT (`sft_objective`, rows or packed bins) runs the vocabulary head and its log-softmax only
at the trained positions: the backbone's hidden states are gathered at the flat positions the host
reads off the mask (`data/batching.trained_positions`), where the head can be split off the model
and gives its logits unchanged (`vocab_head`, `head_matches`); else, and for every other output
and objective (--kl-to-base included), the full (B, L, V) logits.

With `grad_checkpoint` (--grad-checkpoint) each transformer block is recomputed in the backward
instead of keeping its activations (mlx_checkpoint.py): the same loss and gradients, less memory."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np

from mlxpt import _blas

_blas.activate()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

from mlxpt.backends import mlx_checkpoint, packing  # noqa: E402
from mlxpt.backends.base import check_adapter_fits, no_base_error  # noqa: E402
from mlxpt.backends.mlx_logprob import token_logprob  # noqa: E402
from mlxpt.backends.mlx_packing import packed_token_logp, segment_caches  # noqa: E402
from mlxpt.backends.shared_prefix import grouped_token_logp, self_check  # noqa: E402
from mlxpt.data.batching import trained_positions  # noqa: E402
from mlxpt.models.adapters import save_adapter  # noqa: E402
from mlxpt.models.heads import head_rewards  # noqa: E402
from mlxpt.models.memory import check_fits  # noqa: E402
from mlxpt.objectives import sft_objective  # noqa: E402


def token_logp(model, inputs, targets):
    """(B, L) float32 log-probability of each target token."""
    logits = model(inputs).astype(mx.float32)
    return token_logprob(logits, targets)


def vocab_head(model):
    """(backbone, head) of an mlx-lm Llama-family model: `backbone(inputs, cache)` gives the final
    normed hidden states, `head(hidden)` the logits (`lm_head`, or the tied embedding's
    `as_linear`). None where the model does not have that shape (the full-logits path is used).
    Both look their module up when called, so adapters put on the head later are used."""
    inner, args = getattr(model, "model", None), getattr(model, "args", None)
    if not isinstance(inner, nn.Module) or not hasattr(inner, "layers"):
        return None
    tied = getattr(args, "tie_word_embeddings", None)
    if tied is False and isinstance(model.get("lm_head"), nn.Module):
        head = lambda h: model.lm_head(h)  # noqa: E731
    elif tied is True and hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        head = lambda h: model.model.embed_tokens.as_linear(h)  # noqa: E731
    else:
        return None
    return (lambda inputs, cache=None: model.model(inputs, cache=cache)), head


def head_matches(model, found) -> bool:
    """Does head(backbone(x)) give the model's own logits? (a model that scales or caps its
    logits after the head does not: it keeps the full-logits path). Eval mode, one short row."""
    training = model.training
    model.eval()
    try:
        x = mx.arange(8, dtype=mx.int32)[None]
        full = model(x).astype(mx.float32)
        split = found[1](found[0](x)).astype(mx.float32)
        worst, scale = mx.abs(full - split).max(), 1 + mx.abs(full).max()
        return full.shape == split.shape and bool((worst <= 1e-4 * scale).item())
    except Exception:  # noqa: BLE001 - an architecture this does not fit: full logits
        return False
    finally:
        model.train(training)


def trained_token_logp(model, found, inputs, targets, index, segments=None):
    """(1, K) float32 log-probs of `targets` at the flat positions `index` of (B, L) only: the
    backbone runs over every position (packed bins: `segments`, mlx_packing.py), the vocabulary
    head and its log-softmax over the K gathered ones."""
    backbone, head = found
    hidden = backbone(inputs, None if segments is None else segment_caches(model, segments))
    picked = hidden.reshape(-1, hidden.shape[-1])[index]
    logits = head(picked).astype(mx.float32)
    return token_logprob(logits, targets.reshape(-1)[index])[None]


def position_logprobs(model, found, inputs, index, ids):
    """(N, K) float32 log-softmax over the vocabulary at the flat positions `index` of (B, L),
    gathered at `ids` (N, K) where it has any (a teacher's top-k), else all V (distillation).
    With `found` (vocab_head), the head runs at those positions only."""
    if found is not None:
        hidden = found[0](inputs)
        logits = found[1](hidden.reshape(-1, hidden.shape[-1])[index]).astype(mx.float32)
    else:
        logits = model(inputs).astype(mx.float32)
        logits = logits.reshape(-1, logits.shape[-1])[index]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, ids, axis=-1) if ids.size else logp


def base_logits(model, initial, inputs):
    """(B, L, V) float32 logits with the trainable arrays `initial` (a tree) swapped in for one
    pass, in eval mode, no gradient. Works inside `value_and_grad` and `mx.compile`: the traced
    parameters are put back afterwards, so the model's state leaves the trace unchanged."""
    tuned, training = model.trainable_parameters(), model.training
    model.update(initial)
    model.eval()
    try:
        return mx.stop_gradient(model(inputs).astype(mx.float32))
    finally:
        model.update(tuned)
        model.train(training)


def kl_per_position(logits, base):
    """(B, L) KL(softmax(logits) || softmax(base)) over the last axis."""
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    lq = base - mx.logsumexp(base, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(-1)


def make_optimizer(name: str, weight_decay: float = 0.0):
    if name == "sgd":
        return optim.SGD(learning_rate=0.0)
    if name == "adam":
        return optim.Adam(learning_rate=0.0, bias_correction=True)
    return optim.AdamW(learning_rate=0.0, weight_decay=weight_decay, bias_correction=True)


def _to_numpy(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


class MLXBackend:
    name = "mlx"

    def __init__(
        self, model, optimizer, objective=sft_objective, compile: bool = True, adapter_config=None, output="logp",
        save=None, grad_checkpoint: bool = False,
    ):  # fmt: skip
        """`objective(logp, *batch[2:]) -> (loss_sum, weight, aux)`; see mlxpt/objectives.py.

        output="logp_kl" (SFT with --kl-to-base): the objective gets `(logp, kl)`, kl per position
        against the adapter-off pass (`base_logits`); full fine-tuning is refused (E550).
        output="reward" (a reward model): batches are `(inputs, last index per row, *rest)` and the
        objective gets `head_rewards` (B,) instead of per-token log-probs; the model carries a
        trainable `reward_head` (models/heads.py). `save(folder, model, adapter_config)` replaces
        the adapter save (a reward model saves its head too). `grad_checkpoint`: recompute each
        block in the backward (mlx_checkpoint.py; E780/E781 where the model does not allow it)."""
        if grad_checkpoint:
            mlx_checkpoint.enable(model)
        self.grad_checkpoint = grad_checkpoint
        self.model, self.optimizer = model, optimizer
        self.objective = sft_objective if objective is None else objective
        self._save = save or save_adapter
        self.output = output
        self.adapter_config = adapter_config or {}
        optimizer.init(model.trainable_parameters())
        self._grads = self._rng_at_start = None
        self._loss = self._ntok = self._aux = None
        # the adapter as created: the base model (LoRA/DoRA start as a no-op)
        full = self.adapter_config.get("fine_tune_type") == "full"
        self._initial = None if full else tree_flatten(model.trainable_parameters())
        if self._initial is not None:
            mx.eval([v for _, v in self._initial])  # constants of the compiled KL step: never lazy
            self._initial_tree = tree_unflatten(self._initial)
        elif output == "logp_kl":
            raise no_base_error("kl_to_base", "use lora/dora or --kl-to-base 0")
        # the reference of DPO/GRPO: the adapter as created, or the one the run started from (--from)
        self._reference = self._initial
        # the vocabulary head apart from the backbone: plain SFT runs it at trained positions only
        found = vocab_head(model)
        self._head = found if found is not None and head_matches(model, found) else None
        self._compile = compile
        # (model, grads, loss, weight, metrics) -> the same summed over data-parallel ranks, or None
        self.sum_across = None
        self._build(compile)

    def set_objective(self, objective) -> None:
        """The loss to train: a method's, built once the runner knows its layout."""
        self.objective = objective
        self._build(self._compile)

    def outputs(self, model, batch) -> tuple:
        """(what the objective gets, the rest of the batch): per-token log-probs from
        `(inputs, targets, ...)`, rewards per row from `(inputs, last, ...)`, or with
        output="grouped" log-probs of completions from `(prompts, left_pad, completions, ...)`,
        each prompt run once per group (shared_prefix.py), or with output="logp_kl" the pair
        (log-probs, KL to the base per position) from `(inputs, targets, ...)`, or with
        output="packed" log-probs of rows packed into bins from `(inputs, targets, segments, ...)`
        (packing.py)."""
        if self.output == "packed":
            return packed_token_logp(model, *batch[:3]), batch[3:]
        if self.output == "reward":
            return head_rewards(model, batch[0], batch[1]), batch[2:]
        if self.output == "grouped":
            return grouped_token_logp(model, *batch[:3]), batch[3:]
        if self.output == "distill":  # (inputs, targets, index, weight, ids, teacher): train/distill.py
            return position_logprobs(model, self._head, batch[0], batch[2], batch[4]), (batch[3], batch[5])
        if self.output == "logp_kl":
            base = base_logits(model, self._initial_tree, batch[0])
            logits = model(batch[0]).astype(mx.float32)
            logp = token_logprob(logits, batch[1])  # as token_logp
            return (logp, kl_per_position(logits, base)), batch[2:]
        return token_logp(model, batch[0], batch[1]), batch[2:]

    def loss_fn(self, model, *batch):
        if self._gathers(len(batch) - 1):  # (inputs, targets[, segments], index, weight): see _arrays
            *front, index, weight = batch
            segments = front[2] if self.output == "packed" else None
            logp = trained_token_logp(model, self._head, front[0], front[1], index, segments)
            return self.objective(logp, weight[None])
        out, rest = self.outputs(model, batch)
        return self.objective(out, *rest)

    def _gathers(self, size: int) -> bool:
        """Does a batch of `size` arrays train the vocabulary head at its trained positions only?
        Plain SFT (`sft_objective`: the loss reads log-probs where the mask is nonzero, nothing
        else) on rows or packed bins of a model whose head was found; --kl-to-base (output
        "logp_kl") and every other objective keep the full logits."""
        layout = {"logp": 3, "packed": 4}.get(self.output)
        return self._head is not None and self.objective is sft_objective and size == layout

    def _arrays(self, batch) -> list:
        """The batch as mlx arrays; where the head is gathered, the mask (last) becomes the flat
        trained positions and their weights (`trained_positions`, on the host): the objective gets
        log-probs and weights (1, K) with the same loss sum and weight as (B, L) ones."""
        if not self._gathers(len(batch)):
            return [mx.array(a) for a in batch]
        index, weight = trained_positions(np.asarray(batch[-1]))
        return [mx.array(a) for a in (*batch[:-1], index, weight)]

    def share_prompts(self) -> tuple[bool, str]:
        """Switch to output="grouped" if it gives this model's plain log-probs (GRPO batches then
        come in that layout). (switched, what the check found)."""
        self.model.eval()  # no dropout in the comparison
        ok, found = self_check(self.model, token_logp)
        if ok:
            self.output = "grouped"
        return ok, found

    def pack_rows(self) -> tuple[bool, str]:
        """Switch to output="packed" if packed bins give this model's plain per-row log-probs
        (SFT batches then come as `collate_packed` lays them out). (switched, what was found)."""
        if self.output != "logp":
            return False, f"output {self.output!r} scores whole rows"
        self.model.eval()
        ok, found = packing.self_check(
            lambda i, t: np.array(token_logp(self.model, mx.array(i), mx.array(t))),
            lambda i, t, s: np.array(packed_token_logp(self.model, mx.array(i), mx.array(t), mx.array(s))),
        )
        if ok:
            self.output = "packed"
        return ok, found

    def _build(self, compile: bool) -> None:
        model, opt = self.model, self.optimizer
        value_and_grad = nn.value_and_grad(model, self.loss_fn)

        def grad_step(*batch):
            (loss, ntok, aux), grads = value_and_grad(model, *batch)
            return loss, ntok, aux, grads

        def make_update(clip: float):
            def update(grads, scale):
                grads = tree_map(lambda g: g * scale, grads)
                if clip > 0:
                    grads, _ = optim.clip_grad_norm(grads, clip)
                opt.update(model, grads)

            ustate = [model.state, opt.state]
            return partial(mx.compile, inputs=ustate, outputs=ustate)(update) if compile else update

        def loss_only(*batch):
            return self.loss_fn(model, *batch)

        if compile:
            state = [model.state, mx.random.state]
            # the adapter as created is read by the KL's base pass: an input, never written
            inputs = state + ([self._initial_tree] if self._initial is not None else [])
            grad_step = partial(mx.compile, inputs=inputs, outputs=state)(grad_step)
            loss_only = partial(mx.compile, inputs=inputs, outputs=state)(loss_only)
        self._make_update, self._updates = make_update, {}
        self._grad_step, self._loss_only = grad_step, loss_only

    def begin_window(self) -> None:
        self._rng_at_start = mx.array(mx.random.state[0])

    def accumulate(self, batch) -> None:
        if self._rng_at_start is None:  # window start: remember the RNG so an abandoned window can rewind
            self.begin_window()
        self.model.train()
        loss, ntok, aux, grads = self._grad_step(*self._arrays(batch))
        if self._grads is None:
            self._grads, self._loss, self._ntok, self._aux = grads, loss, ntok, aux
        else:
            self._grads = tree_map(mx.add, self._grads, grads)
            self._loss, self._ntok = self._loss + loss, self._ntok + ntok
            self._aux = {k: self._aux[k] + v for k, v in aux.items()}

    def reduce(self) -> tuple[float, float, float, dict]:
        if self.sum_across is not None:  # data-parallel: every rank's window (train/distributed.py)
            self._grads, self._loss, self._ntok, self._aux = self.sum_across(
                self.model, self._grads, self._loss, self._ntok, self._aux
            )
        ntok = mx.maximum(self._ntok, 1)
        sq = sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(self._grads))
        norm = mx.sqrt(sq) / ntok
        mx.eval(self._grads, self._loss, self._ntok, norm, self._aux)
        return self._loss.item(), self._ntok.item(), norm.item(), {k: v.item() for k, v in self._aux.items()}

    def apply(self, lr: float, clip: float) -> None:
        self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
        clip = float(clip or 0.0)
        if clip not in self._updates:  # the clip value is baked into the compiled update
            self._updates[clip] = self._make_update(clip)
        self._updates[clip](self._grads, 1.0 / mx.maximum(self._ntok, 1))
        mx.eval(self.model.state, self.optimizer.state)
        self.discard()

    def discard(self, rewind: bool = False) -> None:
        if rewind and self._rng_at_start is not None:
            self._set_rng(self._rng_at_start)
        self._grads = self._loss = self._ntok = self._aux = self._rng_at_start = None

    @staticmethod
    def _set_rng(key) -> None:
        mlx_checkpoint.set_rng(key)

    def evaluate(self, batch) -> tuple[float, float, dict]:
        self.model.eval()
        loss, ntok, aux = self._loss_only(*self._arrays(batch))
        mx.eval(loss, ntok, aux)
        return loss.item(), ntok.item(), {k: v.item() for k, v in aux.items()}

    def get_state(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            "adapters": _to_numpy(self.model.trainable_parameters()),
            "optimizer": _to_numpy(self.optimizer.state),
            "rng": {"key": np.array(mx.random.state[0])},
        }

    def set_state(self, arrays) -> None:
        self.model.load_weights([(k, mx.array(v)) for k, v in arrays["adapters"].items()], strict=False)
        for k, v in arrays["optimizer"].items():
            _set_path(self.optimizer.state, k, mx.array(v))
        self._set_rng(arrays["rng"]["key"])
        mx.eval(self.model.state, self.optimizer.state, mx.random.state)

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())

    def start_from(self, arrays: dict[str, np.ndarray]) -> None:
        """Load a saved LoRA/DoRA adapter (`--from`) as the trainable weights and the reference."""
        current = dict(tree_flatten(self.model.trainable_parameters()))
        check_adapter_fits(arrays, {k: v.shape for k, v in current.items()})
        self.model.load_weights([(k, mx.array(v).astype(current[k].dtype)) for k, v in arrays.items()], strict=False)
        mx.eval(self.model.parameters())
        self._reference = tree_flatten(self.model.trainable_parameters())

    def at_start(self) -> bool:
        if self._reference is None:  # full fine-tuning: no snapshot (only fresh runs ask)
            return True
        current = dict(tree_flatten(self.model.trainable_parameters()))
        return all(bool(mx.array_equal(current[k], v).item()) for k, v in self._reference)

    def token_logps(self, *arrays, reference: bool = False) -> np.ndarray:
        """(B, L) log-probs of `targets` in eval mode, no gradient; `arrays` are `(inputs,
        targets)`, or with output="grouped" `(prompts, left_pad, completions)`. `reference`: under the adapter
        as it was created (the base model for LoRA/DoRA) or as the run started (`start_from`),
        swapped in for this pass only: the trainable arrays are small, so the reference costs no
        second copy of the weights."""
        self.model.eval()
        if reference and self._initial is None:
            raise no_base_error("fine_tune_type", "use lora or dora, or set beta 0", "the reference pass")
        if reference:
            current = tree_flatten(self.model.trainable_parameters())
            self.model.load_weights(self._reference, strict=False)
        try:
            if self.output in ("packed", "distill") and len(arrays) == 2:  # whole rows (forgetting monitor, eval)
                out = token_logp(self.model, *(mx.array(a) for a in arrays))
            else:
                out = self.outputs(self.model, [mx.array(a) for a in arrays])[0]
            mx.eval(out)
        finally:
            if reference:
                self.model.load_weights(current, strict=False)
        return np.array(out)

    def logprobs_with(self, arrays: list, inputs, index) -> np.ndarray:
        """(N, V) float32 log-probs at the flat positions `index` of `inputs`, eval mode, no
        gradient, with the trainable arrays `arrays` [(name, mx array)] swapped in for this pass
        (a teacher that is this base + another adapter: no second copy of the weights)."""
        self.model.eval()
        current = tree_flatten(self.model.trainable_parameters())
        self.model.load_weights(arrays, strict=False)
        try:
            ids = mx.zeros((0,), mx.int32)
            out = position_logprobs(self.model, self._head, mx.array(inputs), mx.array(index), ids)
            mx.eval(out)
        finally:
            self.model.load_weights(current, strict=False)
        return np.array(out)

    def kl_to_reference(self, inputs) -> np.ndarray:
        """(B, L) float32 KL(p_tuned || p_base) after each prefix of `inputs`, eval mode, no gradient."""
        if self._initial is None:
            raise no_base_error()
        self.model.eval()
        x = mx.array(inputs)
        kl = kl_per_position(self.model(x).astype(mx.float32), base_logits(self.model, self._initial_tree, x))
        mx.eval(kl)
        return np.array(kl, np.float32)

    def param_counts(self) -> tuple[int, int]:
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return int(trainable), int(sum(v.size for _, v in tree_flatten(self.model.parameters())))

    def check_memory(self, shape) -> dict:
        return check_fits(self.model, replace(shape, grad_checkpoint=self.grad_checkpoint))

    def save_adapter(self, folder) -> None:
        self._save(folder, self.model, self.adapter_config)


def _set_path(tree, key: str, value) -> None:
    """Set the leaf at a flat `a.0.b` key in place: compiled functions hold references to `tree`."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree.setdefault(part, {})
    if isinstance(tree, list):
        tree[int(leaf)] = value
    else:
        tree[leaf] = value
