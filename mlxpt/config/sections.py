"""Settings as small dataclasses. Each field carries a one-line help text that the CLI (and
later the TUI form) reuse. Precedence at the boundary: command line > YAML file > defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from mlxpt.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
MODEL_ALIASES = (DEFAULT_MODEL,)  # names models/loader.py resolves (its ALIASES), never paths
ASSETS = Path(__file__).resolve().parents[2] / "assets"


def opt(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field with CLI help (and optional choices) in its metadata."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def default_data() -> str:
    return str(ASSETS / "sft")


@dataclass
class ModelConfig:
    model: str = opt(DEFAULT_MODEL, "model: alias (smollm2-135m), HF/MLX folder, .gguf file or hub id")
    quantize: str = opt(
        "auto",
        "base weights: auto (as stored on Metal, float32 on CPU), none (float), 4 or 8 bit (QLoRA)",
        ("auto", "none", "4", "8"),
    )
    trust_remote_code: bool = opt(False, "allow model folders that ask to run their own Python code")


@dataclass
class DataConfig:
    data: str = opt(default_data(), "train JSONL file, or a folder with train.jsonl / valid.jsonl")
    valid: str | None = opt(None, "validation JSONL file (default: valid.jsonl beside the train data)")
    mask: str = opt(
        "assistant", "trained tokens: every assistant turn, all but the prompt, or all", ("assistant", "prompt", "none")
    )
    max_seq_len: int = opt(512, "longest sequence in tokens")
    overlong: str = opt("truncate", "what to do with longer rows", ("truncate", "drop", "error"))
    batch_size: int = opt(4, "sequences per micro-batch")
    packing: bool = opt(
        True,
        "pack each micro-batch's rows into bins of max_seq_len tokens (no padding, attention kept "
        "inside each row); off where a model's log-probs would change",
    )


@dataclass
class AdapterConfig:
    fine_tune_type: str = opt(
        "lora",
        "what trains: LoRA, DoRA, full weights of the last layers, a prefix (prefix tuning) or bottleneck adapters",
        ("lora", "dora", "full", "prefix", "adapter"),
    )
    rank: int = opt(8, "LoRA/DoRA rank")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = opt(0.0, "LoRA/DoRA: dropout on the adapter input")
    num_layers: int = opt(16, "adapt the last N transformer layers (-1: all)")
    targets: str = opt(
        "all", "LoRA/DoRA: comma-separated module names to adapt (e.g. q_proj,v_proj), or all linear layers"
    )
    prefix_length: int = opt(16, "prefix: trained key/value positions per layer")
    prefix_projection: int = opt(0, "prefix: hidden size of the reparameterisation MLP (0: train the prefix directly)")
    adapter_size: int = opt(16, "adapter: bottleneck width")
    from_run: str | None = opt(None, "start from this run's (or mlx-lm adapter folder's) adapter weights")


def given_adapter_settings(adapter: AdapterConfig) -> frozenset[str] | None:
    """The adapter settings the person set for this run (a flag or a YAML key), as `build_config`
    notes them; None for a config made otherwise (a value other than the default then counts as
    set). `--from` (models/chaining.py) takes the source adapter's value only for the others."""
    return getattr(adapter, "_given", None)


# The adapter settings that belong to one fine-tune type; the others (fine_tune_type, num_layers,
# from_run) serve every type. A new type in fine_tune_type's choices gets a line here.
TYPE_SETTINGS = {
    "lora": ("rank", "alpha", "dropout", "targets"),
    "dora": ("rank", "alpha", "dropout", "targets"),
    "full": (),
    "prefix": ("prefix_length", "prefix_projection"),
    "adapter": ("adapter_size",),
}


def adapter_settings(fine_tune_type: str) -> tuple[str, ...]:
    """The AdapterConfig settings `fine_tune_type` reads, in field order (every one for an unknown
    type: validation names that error). Another type's own settings do nothing for it: the TUI form
    hides them, `mlxpt train` accepts them with a one-line warning."""
    own = TYPE_SETTINGS.get(fine_tune_type)
    others = set() if own is None else {n for names in TYPE_SETTINGS.values() for n in names} - set(own)
    return tuple(f.name for f in fields(AdapterConfig) if f.name not in others)


def ignored_adapter_settings(fine_tune_type: str) -> tuple[str, ...]:
    """The AdapterConfig settings `fine_tune_type` ignores (the rest of `adapter_settings`)."""
    used = adapter_settings(fine_tune_type)
    return tuple(f.name for f in fields(AdapterConfig) if f.name not in used)


@dataclass
class TrainConfig:
    steps: int = opt(200, "optimiser steps")
    learning_rate: float = opt(1e-4, "peak learning rate")
    optimizer: str = opt("adamw", "optimiser (bias-corrected, like torch)", ("adam", "adamw", "sgd"))
    weight_decay: float = opt(0.0, "decoupled weight decay (adamw)")
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(10, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine/linear)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimiser step")
    clip_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    seed: int = opt(0, "seed for adapter init, data order and dropout")
    eval_every: int = opt(50, "validate every N steps (0: only at the end)")
    eval_batches: int = opt(25, "validation micro-batches per evaluation (-1: the whole split, 0: no validation)")
    save_every: int = opt(100, "checkpoint every N steps (and at the end and on Ctrl-C)")
    keep: int = opt(3, "complete checkpoints to keep")
    max_bad_steps: int = opt(5, "stop (exit 4) after this many non-finite steps in a row")
    runs_dir: str = opt("runs", "where run folders are created")
    name: str | None = opt(None, "run name (default: method)")
    backend: str = opt("mlx", "compute backend: mlx, or numpy (the reference, CPU only, slow)", ("mlx", "numpy"))
    grad_checkpoint: bool = opt(
        False, "recompute each transformer block in the backward pass instead of keeping its activations: "
        "much less memory, about a third more compute, the same results",
    )  # fmt: skip
    regression_data: str = opt(
        "general",
        "forgetting monitor: JSONL whose greedy accuracy and KL to the base are logged at each evaluation; "
        "general (the bundled probe) or none",
    )
    regression_rows: int = opt(24, "forgetting monitor: rows of the regression data scored at each evaluation")
    forgetting_warn: float = opt(5.0, "warn when regression accuracy falls this many points below step 0's (0: never)")


@dataclass
class RegulariseConfig:
    """SFT's guards against forgetting: a KL pull to the base model and replayed rows."""

    kl_to_base: float = opt(
        0.0, "weight of KL(tuned || base) per trained token; the base is the adapter-off pass (0: off)"
    )
    replay: str | None = opt(None, "JSONL of rows mixed into every batch (e.g. the base model's own answers)")
    replay_ratio: float = opt(0.0, "fraction of each batch's rows drawn from --replay")


class Sections:
    """A run's settings grouped in sections (model, data, adapter, train, ...). `UNUSED` names the
    fields of a shared section that the method ignores: hidden from its help and form, refused on
    its command line (E504 names the methods that use them), dropped from an older config.json."""

    UNUSED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a nested dict (run config.json) or a flat one (YAML / CLI)."""
        cfg = cls()
        flat: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and k in section_names(cfg):
                flat.update(v)
            else:
                flat[k] = v
        for name in cls.UNUSED:  # written by versions that showed them for every method
            flat.pop(name, None)
        apply_flat(cfg, flat, source="config")
        return cfg


@dataclass
class SFTConfig(Sections):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reg: RegulariseConfig = field(default_factory=RegulariseConfig)


def section_names(cfg) -> list[str]:
    return [f.name for f in fields(cfg)]


def section_fields(cfg, section: str) -> list[dataclasses.Field]:
    """The fields of one section that the config's method uses (its `UNUSED` left out)."""
    unused = getattr(cfg, "UNUSED", ())
    return [f for f in fields(getattr(cfg, section)) if f.name not in unused]


def all_fields(cfg) -> dict[str, tuple[object, dataclasses.Field]]:
    """Flat name -> (section object, field) over the sections of a composite config."""
    out = {}
    for sec in fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in section_fields(cfg, sec.name):
            out[f.name] = (obj, f)
    return out


def _coerce(value, f: dataclasses.Field, source: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError("E501", f"{f.name} cannot be empty", source, f"set a value ({f.metadata.get('help', '')})")
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(value, bool) and kind.startswith(("int", "float")):
            raise ValueError(value)  # YAML's `true` is not the number 1
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        value = str(value) if not isinstance(value, str) else value
    except (TypeError, ValueError):
        raise ConfigError(
            "E502", f"{f.name}={value!r} is not a valid {kind.split(' ')[0]}", source, f.metadata.get("help")
        ) from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            "E503", f"{f.name}={value!r} is not one of {', '.join(choices)}", source, f.metadata.get("help")
        )
    return value


def apply_flat(cfg, flat: dict, source: str) -> None:
    """Set fields of a composite config from a flat dict; unknown keys are an error."""
    known = all_fields(cfg)
    for k, v in flat.items():
        key = k.replace("-", "_")
        if key not in known:
            owners = [m for m, cls in _owners().items() if key in all_fields(cls())]
            if owners:
                raise ConfigError(
                    "E504", f"{k!r} is a setting of {', '.join(owners)}, not of this method", source,
                    f"drop it, or train {owners[0]}",
                )  # fmt: skip
            near = [n for n in known if n.startswith(key[:4])][:3]
            hint = f"did you mean {', '.join(near)}?" if near else "see `mlxpt train sft --help`"
            raise ConfigError("E504", f"unknown setting {k!r}", source, hint)
        obj, f = known[key]
        setattr(obj, key, _coerce(v, f, source))
    validate(cfg, source)


OTHER_OWNERS: dict[str, type] = {}  # methods whose config lives in its own module (prm.py, rft.py)


def _owners() -> dict:
    """Method family -> config class, for naming where a setting belongs."""
    return {"sft": SFTConfig, "dpo/simpo/orpo": DPOConfig, "rm": RMConfig, "grpo": GRPOConfig, **OTHER_OWNERS}


def validate(cfg, source: str = "config") -> None:
    """Range checks that no type system gives us."""
    checks = {  # name: (allowed, how the error says it)
        "batch_size": (lambda v: v >= 1, ">= 1"),
        "max_seq_len": (lambda v: v >= 8, ">= 8"),
        "rank": (lambda v: v >= 1, ">= 1"),
        "prefix_length": (lambda v: v >= 1, ">= 1"),
        "prefix_projection": (lambda v: v >= 0, ">= 0 (0: off)"),
        "adapter_size": (lambda v: v >= 1, ">= 1"),
        "alpha": (lambda v: v > 0, "> 0 (0 gives an adapter that can never change the model)"),
        "num_layers": (lambda v: v >= 1 or v == -1, ">= 1, or -1 for all"),
        "steps": (lambda v: v >= 1, ">= 1"),
        "learning_rate": (lambda v: v > 0, "> 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "seed": (lambda v: 0 <= v < 2**63, "0 to 2**63 - 1"),
        "grad_accum": (lambda v: v >= 1, ">= 1"),
        "clip_grad_norm": (lambda v: v >= 0, ">= 0 (0: off)"),
        "warmup_steps": (lambda v: v >= 0, ">= 0"),
        "keep": (lambda v: v >= 1, ">= 1"),
        "save_every": (lambda v: v >= 1, ">= 1"),
        "eval_every": (lambda v: v >= 0, ">= 0 (0: off)"),
        "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "max_bad_steps": (lambda v: v >= 1, ">= 1"),
        "beta": (lambda v: v >= 0, ">= 0"),  # > 0 for preference losses: checked below
        "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
        "orpo_lambda": (lambda v: v >= 0, ">= 0"),
        "num_generations": (lambda v: v >= 2, ">= 2"),
        "max_completion_length": (lambda v: v >= 1, ">= 1"),
        "temperature": (lambda v: v > 0, "> 0"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (lambda v: v >= 0, ">= 0"),
        "min_p": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "epsilon": (lambda v: 0 < v < 1, "in (0, 1)"),
        "epsilon_high": (lambda v: v is None or v > 0, "> 0"),
        "num_iterations": (lambda v: v >= 1, ">= 1"),
        "dynamic_sampling": (lambda v: v >= 0, ">= 0 (0: off)"),
        "max_reward_failure_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "reward_timeout": (lambda v: v >= 0, ">= 0"),
        "log_completions_every": (lambda v: v >= 0, ">= 0"),
        "center_rewards_coefficient": (lambda v: v >= 0, ">= 0"),
        "regression_rows": (lambda v: v >= 1, ">= 1"),
        "forgetting_warn": (lambda v: v >= 0, ">= 0 (0: never)"),
        "kl_to_base": (lambda v: v >= 0, ">= 0 (0: off)"),
        "replay_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    }
    adapter = getattr(cfg, "adapter", None)
    if isinstance(adapter, AdapterConfig) and adapter.from_run and adapter.fine_tune_type == "full":
        raise ConfigError(
            "E574", "--from-run starts from a LoRA/DoRA adapter; full fine-tuning has none to load", source,
            "use --fine-tune-type lora or dora (or leave it out: the adapter's own type is taken)",
        )  # fmt: skip
    for name, (obj, f) in all_fields(cfg).items():
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError("E505", f"{name}={value!r} is not a finite number", source, f.metadata.get("help"))
        if name == "beta" and isinstance(obj, PreferenceConfig) and not value > 0:
            raise ConfigError("E505", f"beta={value!r} is out of range (> 0)", source, f.metadata.get("help"))
        if name in checks and not checks[name][0](value):
            allowed = checks[name][1]
            raise ConfigError("E505", f"{name}={value!r} is out of range ({allowed})", source, f.metadata.get("help"))


def load_yaml(path: str) -> dict:
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )  # fmt: skip
                seen.add(key)
            return super().construct_mapping(node, deep)

    p = Path(path)
    if not p.is_file():
        raise ConfigError("E506", "config file not found", path, "check the path given to --config")
    try:
        loader = _UniqueKeyLoader(p.read_text(encoding="utf-8"))  # a SafeLoader: plain data only
        try:
            d = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError("E507", f"invalid YAML: {getattr(e, 'problem', e)}", where, "fix the YAML syntax") from None
    if not isinstance(d, dict):
        raise ConfigError("E508", "config must be a mapping of setting: value", path, "see the README for an example")
    return d


def default_pref_data() -> str:
    return str(ASSETS / "pref")


@dataclass
class PreferenceConfig:
    loss_type: str = opt(
        "sigmoid",
        "preference loss: DPO sigmoid/ipo/hinge, or reference-free simpo/orpo",
        ("sigmoid", "ipo", "hinge", "simpo", "orpo"),
    )
    beta: float = opt(0.1, "strength of the implicit KL penalty (DPO) or reward scale (SimPO)")
    label_smoothing: float = opt(0.0, "conservative DPO/SimPO: assumed fraction of flipped labels")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin")
    orpo_lambda: float = opt(0.1, "ORPO weight of the odds-ratio term beside the SFT loss on chosen")
    plain_scoring: bool = opt(
        False, "run each pair's prompt through the model twice, with each response (default: once per pair)"
    )


PREF_METHODS = {"dpo": {}, "simpo": {"loss_type": "simpo", "beta": 2.0}, "orpo": {"loss_type": "orpo"}}


@dataclass
class DPOConfig(Sections):
    """Preference optimisation (dpo, simpo, orpo): SFT's sections plus `pref`."""

    UNUSED = ("packing",)  # rows are not packed for this method

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data=default_pref_data()))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)


@dataclass
class RewardConfig:
    center_rewards_coefficient: float = opt(
        0.0, "reward model: weight of (r_chosen + r_rejected)² that keeps rewards near 0"
    )


@dataclass
class RMConfig(Sections):
    """Reward model (`mlxpt train rm`): a scalar head on a LoRA-tuned backbone, on preference pairs."""

    UNUSED = ("packing",)  # rows are not packed for this method

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data=default_pref_data()))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)


def default_prompt_data() -> str:
    return str(ASSETS / "grpo")


@dataclass
class GRPOSection:
    num_generations: int = opt(8, "completions sampled per prompt (G); the group their advantages are relative to")
    max_completion_length: int = opt(128, "most tokens generated per completion")
    temperature: float = opt(1.0, "sampling temperature of the completions")
    top_p: float = opt(1.0, "nucleus sampling mass of the completions (1: off)")
    top_k: int = opt(0, "sample from the K most likely tokens (0: off)")
    min_p: float = opt(0.0, "drop tokens below min-p x the top probability (0: off)")
    beta: float = opt(0.04, "KL weight to the reference (the model without the adapter); 0 skips the reference pass")
    epsilon: float = opt(0.2, "clip range of the probability ratio (lower side)")
    epsilon_high: float | None = opt(None, "upper clip range (default: epsilon; DAPO uses 0.28)")
    num_iterations: int = opt(1, "optimiser updates per generated batch (mu)")
    loss_type: str = opt(
        "grpo",
        "normalisation as in TRL: grpo (per sequence), dr_grpo (by max length), dapo (by tokens), bnpo",
        ("grpo", "dr_grpo", "dapo", "bnpo"),
    )
    scale_rewards: str = opt(
        "group", "divide advantages by the reward std of the group, the batch, or not", ("group", "batch", "none")
    )
    skip_zero_std_groups: bool = opt(False, "leave out groups whose rewards are all equal (no learning signal)")
    dynamic_sampling: int = opt(
        0,
        "DAPO's dynamic sampling: draw up to N more batches of prompts until batch_size groups have unequal "
        "rewards, and train on those (0: off)",
    )
    mask_truncated_completions: bool = opt(False, "no loss on completions cut at max_completion_length")
    plain_scoring: bool = opt(
        False, "run every completion's prompt through the model again when scoring (default: once per group)"
    )
    rewards: str = opt("accuracy,format", "reward functions: built-in names or path/file.py:function, comma-separated")
    reward_weights: str | None = opt(None, "weights of the reward functions, comma-separated (default: 1 each)")
    reward_on_error: str = opt(
        "abstain", "a reward call that raises, hangs or returns a non-number counts as", ("abstain", "zero", "stop")
    )
    max_reward_failure_rate: float = opt(0.5, "stop the run when a reward function fails more often than this")
    reward_timeout: float = opt(10.0, "seconds a reward call may take before it counts as failed (0: no limit)")
    extract: str = opt(
        "auto",
        "how the accuracy reward finds the final answer: auto, tag, boxed, hash, answer, last_number, re:<regex>",
    )
    format_regex: str | None = opt(None, "regex the format reward requires (default: ends with an 'Answer: n' line)")
    log_completions_every: int = opt(5, "write sampled completions with their rewards every N steps (0: never)")


@dataclass
class GRPOConfig(Sections):
    """GRPO family: SFT's sections (data = prompts, batch_size = prompts per micro-batch) plus `grpo`."""

    UNUSED = ("packing",)  # rows are not packed for this method

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data=default_prompt_data(), batch_size=2))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=100, learning_rate=2e-5, warmup_steps=5, eval_every=25, eval_batches=8
        )
    )
    grpo: GRPOSection = field(default_factory=GRPOSection)
