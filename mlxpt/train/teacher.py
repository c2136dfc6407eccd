"""The teacher of a distillation run (train/distill.py): what `--teacher` names (a model, or a run /
adapter folder: its base + adapter), the check that it shares the student's tokenizer, and its
log-probs and answers: through the student's own model with the teacher's adapter arrays swapped
in where the base is the same (no second copy of the weights), else a second model loaded once,
frozen (MLX only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxpt.config.distill import DistillConfig
from mlxpt.errors import ConfigError, MlxptError
from mlxpt.models import chaining
from mlxpt.models.adapters import ADAPTER_FILE, CONFIG_FILE
from mlxpt.models.loader import load_tokenizer, resolve
from mlxpt.runs import read_config
from mlxpt.runs.guards import is_run_dir
from mlxpt.train.runner import TaskContext

PROBES = ("Hello, world!", " 12345 + 678 = 13023", "naïve café ☕ — ok?", "\n\n    def f(x):\n\treturn x")


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher as named: its base model reference and, for a run / adapter, the adapter folder."""

    ref: str
    base: str
    adapter: Path | None = None


def resolve_teacher(cfg: DistillConfig) -> TeacherSpec:
    """--teacher as a model, or a run / adapter folder (base read from the run or the adapter)."""
    ref = str(cfg.distill.teacher)
    p = Path(ref).expanduser()
    if not (p.is_dir() and (is_run_dir(p) or (p / CONFIG_FILE).is_file() or (p / ADAPTER_FILE).is_file())):
        return TeacherSpec(ref, ref)
    try:
        start = chaining.resolve_start(ref, cfg.train.runs_dir)
    except MlxptError as e:  # its words name --from: say --teacher
        raise ConfigError(e.code, e.what.replace("--from", "--teacher"), "--teacher " + ref, e.hint) from None
    run = start.folder.parent.parent if start.folder.parent.name == "checkpoints" else start.folder
    base = start.lineage.get("model_path") or start.lineage.get("model") or start.adapter_config.get("model")
    if is_run_dir(run) and not base:
        base = (read_config(run).get("model") or {}).get("model")
    if not base:
        raise ConfigError(
            "E743", "the teacher adapter does not say which base model it belongs to", f"--teacher {ref}",
            "give a run folder of mlxpt, or fuse the adapter and pass the fused model as --teacher",
        )  # fmt: skip
    return TeacherSpec(ref, str(base), start.folder)


def same_base(cfg: DistillConfig, spec: TeacherSpec) -> bool:
    try:
        return resolve(spec.base).resolve() == resolve(cfg.model.model).resolve()
    except MlxptError:
        return False


def check_tokenizers(student, cfg: DistillConfig, spec: TeacherSpec, rows: list) -> None:
    """The teacher's tokenizer is the student's: vocabulary size, the ids of a few probe strings
    and the chat template's output on the first row (E744, one line naming both models)."""
    if same_base(cfg, spec):
        return
    try:
        teacher = load_tokenizer(spec.base, cfg.model.trust_remote_code)
    except MlxptError as e:  # its words name a model: say it is the teacher
        raise type(e)(e.code, f"teacher: {e.what}", f"--teacher {spec.ref}", e.hint) from None
    found = None
    heads = [_vocab_size(ref) for ref in (spec.base, cfg.model.model)]
    if len(student.get_vocab()) != len(teacher.get_vocab()):
        found = f"vocabularies of {len(teacher.get_vocab())} and {len(student.get_vocab())} tokens"
    elif heads[0] != heads[1]:
        found = f"output layers of {heads[0]} and {heads[1]} tokens"
    for text in PROBES:
        if found is None and student.encode(text) != teacher.encode(text):
            found = f"{text!r} tokenises differently"
    chat = next((r.data["messages"] for r in rows if r.kind == "chat"), None)
    if found is None and chat is not None and getattr(student, "chat_template", None):
        try:
            ours, theirs = (tok.apply_chat_template(chat, tokenize=True) for tok in (student, teacher))
        except Exception as e:  # noqa: BLE001 - a template that cannot render this row is a mismatch too
            ours, theirs = None, type(e).__name__
        if ours != theirs:
            found = "the chat template renders the first row differently"
    if found is not None:
        raise ConfigError(
            "E744", f"the teacher and the student do not share a tokenizer ({found}): teacher {spec.base}, "
            f"student {cfg.model.model}", "--teacher", "distil from a teacher of the same model family (same tokenizer)",
        )  # fmt: skip


def _vocab_size(ref: str):
    try:
        return json.loads((resolve(ref) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None


class Teacher:
    """The teacher's log-probs at trained positions and its answers: the student's model with the
    teacher's adapter swapped in (shared base), or a second model loaded once, frozen."""

    def __init__(self, ctx: TaskContext, spec: TeacherSpec):
        cfg, backend = ctx.cfg, ctx.backend
        self.backend, self.model, self.arrays = backend, None, None
        student = backend.get_state()["adapters"]
        arrays = None
        if same_base(cfg, spec):
            if spec.adapter is None:  # the base itself: the adapter as created (LoRA/DoRA: a no-op)
                noop = backend.adapter_config.get("fine_tune_type", "lora") in ("lora", "dora")
                arrays = {k: np.array(v) for k, v in dict(backend._initial).items()} if noop else None
            else:
                from mlxpt.backends.numpy_weights import read_safetensors

                saved = read_safetensors(spec.adapter / ADAPTER_FILE)
                fits = {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in student.items()}
                arrays = {k: np.asarray(v, student[k].dtype) for k, v in saved.items()} if fits else None
                if not fits:
                    ctx.emit({"event": "warning", "message": "the teacher's adapter has another shape than this "
                              "run's: loading the teacher as a second model (use its --rank/--num-layers to share)"})  # fmt: skip
        self.shared = arrays is not None
        if self.shared and backend.name == "mlx":
            import mlx.core as mx

            self.arrays = [(k, mx.array(v)) for k, v in arrays.items()]
        elif self.shared:
            self.arrays = arrays
        elif backend.name != "mlx":
            raise ConfigError("E745", "the numpy backend cannot load a second model", "--backend", "use --backend mlx")
        else:
            from mlxpt.backends.mlx_backend import head_matches, vocab_head
            from mlxpt.models.loader import load

            m = cfg.model
            adapter = None if spec.adapter is None else str(spec.adapter)
            self.model, _ = load(spec.base, adapter, quantize=m.quantize, trust_remote_code=m.trust_remote_code)
            self.model.freeze()
            found = vocab_head(self.model)
            self.head = found if found is not None and head_matches(self.model, found) else None

    def logprobs(self, inputs: np.ndarray, index: np.ndarray) -> np.ndarray:
        """(N, V) float32 log-probs at the flat positions `index` of `inputs`."""
        if self.shared:
            return np.asarray(self.backend.logprobs_with(self.arrays, inputs, index), np.float32)
        import mlx.core as mx

        from mlxpt.backends.mlx_backend import position_logprobs

        out = position_logprobs(self.model, self.head, mx.array(inputs), mx.array(index), mx.zeros((0,), mx.int32))
        return np.array(out, np.float32)

    def generate(self, tokenizer, prompts: list, max_tokens: int, sampler=None) -> list:
        """One answer per prompt (decode/batch.generate_many) from the teacher."""
        from mlxpt.decode.batch import generate_many

        if not self.shared:
            return generate_many(self.model, tokenizer, prompts, max_tokens, sampler)
        from mlx.utils import tree_flatten

        model = self.backend.model
        current = tree_flatten(model.trainable_parameters())
        model.load_weights(self.arrays, strict=False)
        try:
            model.eval()
            return generate_many(model, tokenizer, prompts, max_tokens, sampler)
        finally:
            model.load_weights(current, strict=False)


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs) of the k most likely tokens per row, most likely first."""
    k = min(k, logp.shape[-1])
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, ids, -1)
    order = np.argsort(-vals, axis=-1)
    return np.take_along_axis(ids, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1)
