"""NumPy backend: the reference implementation behind the same protocol as the MLX backend.

It needs only NumPy (and the safetensors format, read by hand): this module never imports mlx,
so every algorithm also runs, slowly, on machines without it, and it is the oracle the MLX path
is tested against. Gradients are analytic (numpy_model.py): the objective's closed-form
dL/d(logp) (`GRADS` in mlxpt/objectives.py) is pushed back through the model by hand. With
output="logp_kl" the objective gets (logp, kl to the base per position) and its gradient is the
pair (dL/dlogp, dL/dkl); the base is the adapter as created, a copy kept at construction.

The initial adapter is the MLX path's for the same seed: LoRA A replays MLX's Threefry key
sequence bit for bit (numpy_model.MLXKeys); DoRA's magnitude m agrees to float32 rounding.
`load_adapter_weights(folder)` starts from any saved adapter instead; `start_from(arrays)` does so
for `--from` and makes it the reference of `token_logps(reference=True)` (the KL base stays the
adapter as created).

Differences from the MLX backend, on purpose:
- Dropout masks come from NumPy's PCG64 (seeded by the run seed), not MLX's generator, so runs
  with dropout > 0 are statistically, not bitwise, alike across backends.
- Base weights are always float (quantised files are dequantised on load): `--quantize 4|8`
  (QLoRA) is refused.
- The state's "rng" group holds the PCG64 state instead of an MLX key; adapter and optimiser
  arrays use the MLX names and layout, so checkpoints look the same.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np

from mlxpt.backends import packing
from mlxpt.backends.base import check_adapter_fits, no_base_error
from mlxpt.backends.numpy_model import LINEARS, Model
from mlxpt.errors import ConfigError, ResourceError
from mlxpt.models.memory import linux_available_bytes


class AdamW:
    """mlx.optimizers.Adam/AdamW(bias_correction=True) and plain SGD, op for op in float32."""

    def __init__(self, kind: str = "adamw", weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.kind, self.weight_decay, self.betas, self.eps = kind, weight_decay, betas, eps
        self.step, self.learning_rate = 0, np.float32(0.0)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.step += 1
        self.learning_rate = lr = np.float32(lr)
        if self.kind == "sgd":
            for k, g in grads.items():
                params[k] = params[k] - lr * g
            return
        b1, b2 = self.betas
        step = np.float32(self.step)
        c1 = lr / (np.float32(1) - np.float32(b1) ** step)
        c2 = np.float32(1) / np.sqrt(np.float32(1) - np.float32(b2) ** step)
        for k, g in grads.items():
            p = params[k]
            if self.kind == "adamw":
                p = p * (np.float32(1) - lr * np.float32(self.weight_decay))
            m = b1 * self.m.get(k, np.zeros_like(g)) + (1 - b1) * g
            v = b2 * self.v.get(k, np.zeros_like(g)) + (1 - b2) * np.square(g)
            self.m[k], self.v[k] = m, v
            params[k] = p - (c1 * m) / (np.sqrt(v) * c2 + np.float32(self.eps))


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """mlx.optimizers.clip_grad_norm: scale by min(max_norm / (norm + 1e-6), 1)."""
    total = np.sqrt(sum(np.square(g).sum() for g in grads.values()))
    scale = np.minimum(np.float32(max_norm) / (total + np.float32(1e-6)), np.float32(1.0))
    return {k: g * scale for k, g in grads.items()}


def _rng_to_array(rng: np.random.Generator) -> np.ndarray:
    s = rng.bit_generator.state
    mask = (1 << 64) - 1
    st, inc = s["state"]["state"], s["state"]["inc"]
    return np.array([st >> 64, st & mask, inc >> 64, inc & mask, s["has_uint32"], s["uinteger"]], np.uint64)


def _rng_from_array(a: np.ndarray) -> np.random.Generator:
    a = [int(x) for x in a]
    rng = np.random.default_rng()
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (a[0] << 64) | a[1], "inc": (a[2] << 64) | a[3]},
        "has_uint32": a[4],
        "uinteger": a[5],
    }
    return rng


class NumpyBackend:
    name = "numpy"

    def __init__(
        self, model: Model, objective, grad_fn, optimizer: AdamW, adapter_config=None, seed: int = 0, output="logp"
    ):
        """`objective(logp, *rest) -> (loss_sum, weight, aux)`, `grad_fn(logp, *rest) -> dL/dlogp`;
        output="logp_kl": `logp` is the pair (logp, kl) and `grad_fn` returns (dL/dlogp, dL/dkl)."""
        self.model, self.objective, self.grad_fn, self.optimizer = model, objective, grad_fn, optimizer
        self.adapter_config = adapter_config or {}
        self.output = output
        # the adapter as created: the base of the KL (LoRA/DoRA start as a no-op); full has none
        full = not model.adapters and bool(model.params)
        self._initial = None if full else {k: v.copy() for k, v in model.params.items()}
        self._reference = self._initial  # DPO/GRPO's: as created, or as started (`start_from`)
        if full and output == "logp_kl":
            raise no_base_error("kl_to_base", "use lora/dora or --kl-to-base 0")
        self.rng = np.random.default_rng([seed, 1])  # dropout masks
        self._dropout = any(a.dropout > 0 for a in model.adapters.values())
        self._peak = 0
        self.discard()

    def set_objective(self, objective) -> None:
        """The loss to train and its closed-form dL/dlogp (E512 where there is none)."""
        self.objective, self.grad_fn = objective, grad_of(objective)

    def begin_window(self) -> None:
        self._rng_at_start = _rng_to_array(self.rng)

    def accumulate(self, batch) -> None:
        inputs, targets, *rest = batch
        segments = rest.pop(0) if self.output == "packed" else None
        rest, at = _distill_split(self.output, rest)
        if self._rng_at_start is None:  # window start: remember the RNG so an abandoned window can rewind
            self.begin_window()
        keep: dict = {}
        drop = self.rng if self._dropout else None
        out = self._outputs(inputs, targets, keep=keep, drop_rng=drop, segments=segments, at=at)
        loss, weight, aux = self.objective(out, *rest)
        grad = self.grad_fn(out, *rest)
        if self.output == "logp_kl":
            grads = self.model.backward(keep, *(np.asarray(g, out[0].dtype) for g in grad))
        elif self.output == "distill":
            grads = distill_backward(self.model, keep, np.asarray(grad, out.dtype))
        else:
            grads = self.model.backward(keep, np.asarray(grad, out.dtype))
        self._note_memory()
        if self._grads is None:
            self._grads, self._loss, self._weight, self._aux = grads, loss, weight, dict(aux)
        else:
            self._grads = {k: self._grads[k] + g for k, g in grads.items()}
            self._loss, self._weight = self._loss + loss, self._weight + weight
            self._aux = {k: self._aux[k] + v for k, v in aux.items()}

    def _outputs(self, inputs, targets, keep=None, drop_rng=None, segments=None, at=None):
        """What the objective gets: log-probs (B, L), or with output="logp_kl" (logp, kl);
        output="packed": log-probs with attention confined to each row of a bin (`segments`);
        output="distill": log-probs over the vocabulary at the positions `at` = (index, ids)."""
        if self.output == "distill":
            return distill_logp(self.model, inputs, *at, keep=keep, drop_rng=drop_rng)
        if self.output == "logp_kl":
            return self.model.token_logp_kl(inputs, targets, self._initial, keep=keep, drop_rng=drop_rng)
        return self.model.token_logp(inputs, targets, keep=keep, drop_rng=drop_rng, segments=segments)

    def pack_rows(self) -> tuple[bool, str]:
        """Switch to output="packed" (batches as `collate_packed` lays them out) if packed bins
        give this model's per-row log-probs. (switched, what was found)."""
        if self.output != "logp":
            return False, f"output {self.output!r} scores whole rows"
        ok, found = packing.self_check(
            self.model.token_logp, lambda i, t, s: self.model.token_logp(i, t, segments=s), tol=1e-4
        )
        if ok:
            self.output = "packed"
        return ok, found

    def reduce(self) -> tuple[float, float, float, dict]:
        weight = np.maximum(np.float32(self._weight), np.float32(1))
        norm = np.sqrt(sum(np.square(g).sum() for g in self._grads.values())) / weight
        return float(self._loss), float(self._weight), float(norm), {k: float(v) for k, v in self._aux.items()}

    def apply(self, lr: float, clip: float) -> None:
        scale = np.float32(1.0) / np.maximum(np.float32(self._weight), np.float32(1))
        grads = {k: g * scale for k, g in self._grads.items()}
        if clip and clip > 0:
            grads = clip_grad_norm(grads, clip)
        self.optimizer.update(self.model.params, grads, lr)
        self.discard()

    def discard(self, rewind: bool = False) -> None:
        if rewind and self._rng_at_start is not None:
            self.rng = _rng_from_array(self._rng_at_start)
        self._grads = self._loss = self._weight = self._aux = self._rng_at_start = None

    def evaluate(self, batch) -> tuple[float, float, dict]:
        inputs, targets, *rest = batch
        segments = rest.pop(0) if self.output == "packed" else None
        rest, at = _distill_split(self.output, rest)
        loss, weight, aux = self.objective(self._outputs(inputs, targets, segments=segments, at=at), *rest)
        return float(loss), float(weight), {k: float(v) for k, v in aux.items()}

    def get_state(self) -> dict[str, dict[str, np.ndarray]]:
        opt = self.optimizer
        state = {"step": np.array(opt.step, np.uint64), "learning_rate": np.array(opt.learning_rate, np.float32)}
        for k in opt.m:
            state[k + ".m"], state[k + ".v"] = opt.m[k].copy(), opt.v[k].copy()
        adapters = {k: v.copy() for k, v in self.model.params.items()}
        return {"adapters": adapters, "optimizer": state, "rng": {"pcg64": _rng_to_array(self.rng)}}

    def set_state(self, arrays) -> None:
        self._set_params(arrays["adapters"])
        opt, state = self.optimizer, arrays["optimizer"]
        opt.step, opt.learning_rate = int(state["step"]), np.float32(state["learning_rate"])
        opt.m = {k[:-2]: np.array(v) for k, v in state.items() if k.endswith(".m") and k[:-2] in self.model.params}
        opt.v = {k[:-2]: np.array(v) for k, v in state.items() if k.endswith(".v") and k[:-2] in self.model.params}
        if "pcg64" not in arrays.get("rng", {}):
            raise ConfigError(
                "E513", "this checkpoint was not written by the numpy backend", "rng", "resume it with --backend mlx"
            )
        self.rng = _rng_from_array(arrays["rng"]["pcg64"])

    def _set_params(self, arrays: dict[str, np.ndarray]) -> None:
        params = self.model.params
        for k, v in arrays.items():
            if k not in params or params[k].shape != v.shape:
                raise ConfigError(
                    "E514", f"adapter tensor {k} does not fit this model", k, "use the same model and adapter settings"
                )
            params[k] = np.array(v, params[k].dtype)

    def load_adapter_weights(self, folder: str | Path) -> None:
        """Start from the adapters in `folder`'s adapters.safetensors (e.g. the MLX path's initial ones)."""
        from mlxpt.backends.numpy_model import read_safetensors
        from mlxpt.models.adapters import ADAPTER_FILE

        self._set_params(read_safetensors(Path(folder) / ADAPTER_FILE))

    def start_from(self, arrays: dict[str, np.ndarray]) -> None:
        """Load a saved LoRA/DoRA adapter (`--from`) as the trainable weights and the reference."""
        check_adapter_fits(arrays, {k: v.shape for k, v in self.model.params.items()})
        self._set_params(arrays)
        self._reference = {k: v.copy() for k, v in self.model.params.items()}

    def at_start(self) -> bool:
        if self._reference is None:  # full fine-tuning: no snapshot (only fresh runs ask)
            return True
        return all(np.array_equal(self.model.params[k], v) for k, v in self._reference.items())

    def _note_memory(self) -> None:
        self._peak = max(self._peak, peak_rss())

    def peak_memory(self) -> int:
        return max(self._peak, peak_rss())

    def token_logps(self, inputs, targets, reference: bool = False) -> np.ndarray:
        """(B, L) log-probs of `targets`; `reference`: under the adapter as created or as started."""
        if not reference:
            return self.model.token_logp(np.asarray(inputs), np.asarray(targets))
        if self._reference is None:
            raise no_base_error("fine_tune_type", "use lora or dora, or set beta 0", "the reference pass")
        tuned, self.model.params = self.model.params, self._reference
        try:
            return self.model.token_logp(np.asarray(inputs), np.asarray(targets))
        finally:
            self.model.params = tuned

    def logprobs_with(self, arrays: dict, inputs, index) -> np.ndarray:
        """(N, V) log-probs at the flat positions `index` of `inputs`, no gradient, with the
        trainable arrays `arrays` swapped in (a teacher that is this base + another adapter)."""
        own, self.model.params = self.model.params, {**self.model.params, **arrays}
        try:
            return distill_logp(self.model, np.asarray(inputs), np.asarray(index), np.zeros((0,), np.int32))
        finally:
            self.model.params = own

    def kl_to_reference(self, inputs) -> np.ndarray:
        """(B, L) float32 KL(p_tuned || p_base) after each prefix of `inputs`, no gradient."""
        if self._initial is None:
            raise no_base_error()
        inputs = np.asarray(inputs)
        _, kl = self.model.token_logp_kl(inputs, np.zeros_like(inputs), self._initial)  # targets unused
        return kl.astype(np.float32)

    def param_counts(self) -> tuple[int, int]:
        trainable = sum(v.size for v in self.model.params.values())
        return int(trainable), int(trainable + sum(v.size for v in self.model.w.values()))

    def check_memory(self, shape) -> dict:
        """Weights + Adam state + the layer inputs kept for the backward + one recomputed layer."""
        a, m = self.model.args, self.model
        item = m.dtype.itemsize
        tokens = shape.tokens
        weights = sum(v.nbytes for v in m.w.values()) + sum(v.nbytes for v in m.params.values())
        optimizer = 3 * sum(v.nbytes for v in m.params.values())
        kl = self.output == "logp_kl"  # the base's final hidden states kept, 2 more chunk arrays
        kept = (a.num_hidden_layers - m.first_trainable + 1 + kl) * tokens * a.hidden_size * item
        layer = tokens * (16 * a.hidden_size + 5 * a.intermediate_size) * item
        layer += 3 * a.num_attention_heads * shape.attn_pairs * item
        head = (3 + 2 * kl) * min(shape.head_tokens, 512) * a.vocab_size * item
        est = {"weights": weights, "optimizer": optimizer, "activations": kept + layer + head}
        est["total"] = sum(est.values())
        avail = est["available"] = linux_available_bytes()
        if avail and est["total"] > avail and not os.environ.get("MLXPT_SKIP_MEMORY_CHECK"):
            gb = 1e9
            raise ResourceError(
                "E310",
                f"estimated peak memory {est['total'] / gb:.1f} GB exceeds the {avail / gb:.1f} GB available",
                shape.label,
                "lower --batch-size (use --grad-accum to keep the effective batch) or --max-seq-len; "
                "MLXPT_SKIP_MEMORY_CHECK=1 overrides",
            )
        return est

    def save_adapter(self, folder) -> None:
        from mlxpt.models.adapters import ADAPTER_FILE, CONFIG_FILE
        from mlxpt.runs import atomic_write_json, save_safetensors_atomic

        folder = Path(folder)
        arrays = {k: np.asarray(v, np.float32) for k, v in self.model.params.items()}
        save_safetensors_atomic(folder / ADAPTER_FILE, arrays, {"format": "mlx"})
        atomic_write_json(folder / CONFIG_FILE, self.adapter_config)


def peak_rss() -> int:
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return 0


def _distill_split(output: str, rest: list) -> tuple[list, tuple | None]:
    """A distill batch's rest (index, weight, ids, teacher) -> (objective args, (index, ids))."""
    if output != "distill":
        return rest, None
    index, weight, ids, teacher = rest
    return [weight, teacher], (np.asarray(index), np.asarray(ids))


def distill_logp(model: Model, inputs, index, ids, keep=None, drop_rng=None) -> np.ndarray:
    """(N, K) log-softmax over the vocabulary at the flat positions `index`, gathered at `ids`
    (N, K) where it has any (a teacher's top-k), else all V; `keep` records for distill_backward."""
    hn = model.hidden(np.asarray(inputs), keep=keep, drop_rng=drop_rng)
    z = hn[index] @ model._head_weight().T
    m = z.max(-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    if keep is not None:
        keep.update(index=index, ids=ids, vocab=z.shape[-1])
    return np.take_along_axis(logp, ids, -1) if ids.size else logp


def distill_backward(model: Model, keep: dict, dz: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of sum(dz * logits at the recorded positions) (the divergences' closed forms are
    d/d(logits): each row of dz sums to 0) for every trainable parameter, through the head at
    those positions and then Model.backward_hidden."""
    index, ids, hn = keep["index"], keep["ids"], keep["hn"]
    if ids.size:  # the top-k columns back into the vocabulary
        full = np.zeros((len(index), keep["vocab"]), dz.dtype)
        np.put_along_axis(full, ids, dz, -1)
        dz = full
    dhn = np.zeros_like(hn)
    np.add.at(dhn, index, dz @ model._head_weight())  # padded positions repeat index 0 with dz 0
    return model.backward_hidden(keep, dhn)


def grad_of(objective):
    """The closed-form dL/dlogp of an objective (the GRADS registry; functools.partial is followed)."""
    from mlxpt import objectives

    registry = getattr(objectives, "GRADS", {})
    if isinstance(objective, functools.partial):
        inner = grad_of(objective.func)
        return functools.partial(inner, *objective.args, **objective.keywords)
    grad = registry.get(objective) or getattr(objective, "grad", None)
    if grad is None:
        name = getattr(objective, "__name__", repr(objective))
        raise ConfigError(
            "E512",
            f"objective {name} has no closed-form gradient for the numpy backend",
            "backend",
            "use --backend mlx",
        )
    return grad


def resolve_keys(targets: str) -> list[str] | None:
    """Short names such as `q_proj` -> layer paths (`self_attn.q_proj`); None for all linears."""
    if targets.strip() in ("", "all"):
        return None
    keys = []
    for w in [t.strip() for t in targets.split(",") if t.strip()]:
        hits = [n for n in LINEARS if n == w or n.endswith("." + w)]
        if not hits:
            short = sorted(n.rsplit(".", 1)[-1] for n in LINEARS)
            raise ConfigError(
                "E509", f"no linear layer named {w!r} in the model", "targets", f"choose from {', '.join(short)}"
            )
        keys += hits
    return sorted(set(keys))


def create_numpy_backend(model_cfg, adapter_cfg, train_cfg, objective, output: str = "logp") -> NumpyBackend:
    """Load the folder's safetensors as float32, add adapters as the MLX path does, make the optimiser."""
    from mlxpt.models.loader import check_folder, resolve
    from mlxpt.models.peft import PARAMS as PEFT_PARAMS
    from mlxpt.models.peft import parameters_of

    if str(model_cfg.quantize) in ("4", "8"):
        raise ConfigError(
            "E515",
            "the numpy backend trains float base weights only (no QLoRA)",
            "--quantize",
            "use --quantize auto or none",
        )
    grad_fn = None if objective is None else grad_of(objective)
    path = resolve(model_cfg.model)
    check_folder(path, model_cfg.trust_remote_code)
    model = Model.load(path)
    n = model.args.num_hidden_layers
    num = n if adapter_cfg.num_layers < 0 else min(adapter_cfg.num_layers, n)
    kind = adapter_cfg.fine_tune_type
    keys = None if kind == "full" else resolve_keys(adapter_cfg.targets)
    scale = adapter_cfg.alpha / adapter_cfg.rank
    peft = parameters_of(adapter_cfg) if kind in PEFT_PARAMS else None  # prefix / bottleneck adapters
    model.add_adapters(kind, num, adapter_cfg.rank, scale, adapter_cfg.dropout, keys, seed=train_cfg.seed, peft=peft)
    config = {"fine_tune_type": kind, "num_layers": num}
    if peft is not None:
        config[PEFT_PARAMS[kind]] = peft
    elif kind != "full":
        config["lora_parameters"] = {
            "rank": adapter_cfg.rank,
            "scale": scale,
            "dropout": adapter_cfg.dropout,
            "keys": keys,
        }
    opt = AdamW(train_cfg.optimizer, train_cfg.weight_decay)
    return NumpyBackend(model, objective, grad_fn, opt, adapter_config=config, seed=train_cfg.seed, output=output)
