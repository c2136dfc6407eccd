"""mlx-lm's `lora` config keys in a YAML file, read as mlxpt settings (`mlxpt train --config
mlx_lm_config.yaml`): renamed keys map to their mlxpt names, `lora_parameters` and `lr_schedule`
are unpacked, `resume_adapter_file` becomes from_run (its folder); keys about reporting, output
folders or memory (IGNORED) are dropped with a one-line note each, and a key that would change what
is trained but has no mlxpt equivalent is refused with the mlxpt way to get it, every such key at
once. Keys mlxpt already knows are left alone; null, false or 0 values are dropped quietly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from mlxpt.errors import ConfigError

RENAMED = {
    "iters": "steps",
    "max_seq_length": "max_seq_len",
    "steps_per_eval": "eval_every",
    "val_batches": "eval_batches",
    "grad_accumulation_steps": "grad_accum",
    "lora_layers": "num_layers",  # mlx-lm's name before num_layers
}
# Keys that change how mlx-lm reports, where it writes or how it saves memory, not what is
# trained: read, ignored, and named in one note each (mlx-lm's own example config has most of them).
IGNORED = {
    "train": "mlxpt train always trains",
    "test": "evaluate a run with `mlxpt eval --adapter RUN`",
    "test_batches": "evaluate a run with `mlxpt eval --adapter RUN`",
    "steps_per_report": "mlxpt prints about 40 progress lines a run (every step with --events json)",
    "clear_cache_threshold": "not needed",
    "report_to": "metrics are in the run's metrics.jsonl (--events json streams them)",
    "wandb": "metrics are in the run's metrics.jsonl (--events json streams them)",
    "project_name": "name the run with 'name'",
    "config": "the file given to --config is the config",
    "adapter_path": "mlxpt writes each run (adapter, checkpoints, metrics) to its own folder under runs_dir; set 'name' to choose it",
}
# key: what to do instead (these would change what is trained, so they are refused)
UNSUPPORTED = {
    "hf_dataset": "not supported: mlxpt reads local JSONL ('data'); see `mlxpt data convert`",
    "train_mode": "choose the method on the command line: mlxpt train sft|dpo|orpo|grpo ...",
    "train_type": "choose the method on the command line: mlxpt train sft|dpo|orpo|grpo ...",
}
SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}


def from_mlx_lm(flat: dict, known: set[str], source: str) -> dict:
    """`flat` (a YAML mapping, sections flattened) with mlx-lm's keys as mlxpt settings; keys in
    `known` (the method's settings) pass unchanged. Raises one ConfigError naming every refused key."""
    out: dict = {}
    set_by: dict[str, str] = {}
    problems: list[ConfigError] = []

    def note(text: str) -> None:
        print(f"note: {source}: {text}", file=sys.stderr)

    def refuse(code: str, key: str, what: str, hint: str) -> None:
        problems.append(ConfigError(code, f"mlx-lm key {key!r}: {what}", source, hint))

    def put(name: str, value, key: str) -> None:
        if name in out and out[name] != value:
            problems.append(
                ConfigError(
                    "E584", f"{set_by[name]!r} and {key!r} both set {name}, to different values", source,
                    f"keep one of them ({name} is mlxpt's name)",
                )
            )  # fmt: skip
        out[name], set_by[name] = value, key

    for key, value in flat.items():
        if key in known or value is None:
            if key in known:
                put(key, value, key)
            continue
        if key in RENAMED:
            put(RENAMED[key], value, key)
        elif key == "lora_parameters":
            for name, v in _lora(value, key, refuse).items():
                put(name, v, key)
        elif key == "lr_schedule":
            for name, v in _schedule(value, key, refuse).items():
                put(name, v, key)
        elif key == "optimizer_config":
            opt = flat.get("optimizer", "adam")
            conf = value.get(opt) if isinstance(value, dict) else None
            extra = sorted(set(conf or {}) - {"weight_decay"})
            if not isinstance(value, dict) or (conf is not None and not isinstance(conf, dict)):
                refuse("E583", key, "is not a mapping of optimizer: {setting: value}", "drop it")
            elif extra:
                refuse("E580", key, f"{', '.join(extra)} not supported", "mlxpt sets only weight_decay; drop the rest")
            elif conf and "weight_decay" in conf:
                put("weight_decay", conf["weight_decay"], key)
        elif key == "mask_prompt":
            put("mask", "assistant" if value else "none", key)  # mlx-lm without mask_prompt trains every token
        elif key == "resume_adapter_file":
            folder = str(Path(str(value)).parent)  # mlx-lm names the file; its folder has the config too
            put("from_run", folder, key)
            note(f"mlx-lm key 'resume_adapter_file' read as from_run: {folder}")
        elif key == "test_batches" and flat.get("test") is not True:
            continue  # read only by mlx-lm's test pass
        elif key in IGNORED:
            if not (value is True and key == "train") and value not in (False, 0, ""):
                note(f"mlx-lm key {key!r} ignored: {IGNORED[key]}")
        elif key in UNSUPPORTED:
            refuse("E580", key, "has no mlxpt equivalent", UNSUPPORTED[key])
        else:
            out[key] = value  # apply_flat names what is unknown
    if problems:
        first = problems[0]
        first.errors = problems
        raise first
    mlx_lm_only = {*RENAMED, *IGNORED, "lora_parameters", "lr_schedule", "optimizer_config", "resume_adapter_file"}
    if "mask" not in out and "mask" not in flat and any(k in flat for k in mlx_lm_only):
        note(
            "mlx-lm key 'mask_prompt' not given: mlx-lm would train every token of each row, mlxpt trains the "
            "assistant turns (mask: assistant); write mask_prompt: false for mlx-lm's behaviour"
        )
    return out


def _lora(value, key: str, refuse) -> dict:
    if not isinstance(value, dict):
        refuse("E583", key, f"is {type(value).__name__}, expected a mapping", "write {rank: 8, scale: 20.0}")
        return {}
    out = {}
    for k, v in value.items():
        if k in ("rank", "dropout", "alpha"):
            out[k] = v
        elif k == "keys":
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                refuse("E583", key, "'keys' is not a list of module names", "write keys: [self_attn.q_proj, ...]")
            else:
                out["targets"] = ",".join(v)
        elif k != "scale":
            refuse("E580", f"{key}.{k}", "has no mlxpt equivalent", "use rank, scale (or alpha), dropout, keys")
    if "scale" in value:
        if "alpha" in value:
            refuse("E584", key, "gives both scale and alpha", "keep one: alpha = scale x rank")
        elif _number(value["scale"]) is not None:
            # mlx-lm multiplies the update by scale; mlxpt by alpha / rank
            out["alpha"] = _number(value["scale"]) * float(value.get("rank", 8))
        else:
            refuse("E583", f"{key}.scale", f"{value['scale']!r} is not a number", "write e.g. scale: 20.0")
    return out


def _schedule(value, key: str, refuse) -> dict:
    if not isinstance(value, dict) or value.get("name") not in SCHEDULES:
        name = value.get("name") if isinstance(value, dict) else value
        refuse("E583", key, f"schedule {name!r} is not supported", "use schedule: cosine|linear|constant")
        return {}
    out = {"schedule": SCHEDULES[value["name"]]}
    if "warmup" in value:
        out["warmup_steps"] = value["warmup"]
    raw = value.get("arguments") or []
    args = [_number(a) for a in raw] if isinstance(raw, list) else [None]
    if None in args or (args and args[0] <= 0):
        # skipping them would train at mlxpt's default learning rate without a word
        refuse("E583", f"{key}.arguments", f"{raw!r} is not a list of numbers with a positive first one",
               "write e.g. arguments: [1e-5, 1000, 1e-7] (initial lr, steps, end lr)")  # fmt: skip
        return {}
    if args:
        # mlx.optimizers: cosine_decay(init, decay_steps, end=0), linear_schedule(init, end, steps)
        end = (args[2] if len(args) > 2 else 0) if value["name"] == "cosine_decay" else args[1] if len(args) > 1 else 0
        out["learning_rate"] = args[0]
        out["min_lr_ratio"] = float(end) / float(args[0])
    return out


def _number(value) -> float | None:
    """A number as mlx-lm reads it: PyYAML (YAML 1.1) leaves `1e-5` (no dot) a string, which
    mlx-lm's own float resolver reads as a float; so does this. None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None
