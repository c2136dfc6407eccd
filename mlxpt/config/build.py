"""One config builder for the CLI and the TUI: defaults, then a method's preset, then YAML, then
flags; on resume the saved config, of which only a few settings may change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxpt.config.distill import DistillConfig
from mlxpt.config.mlx_lm_keys import from_mlx_lm
from mlxpt.config.prm import PRMConfig
from mlxpt.config.rft import RFTConfig
from mlxpt.config.sections import (
    PREF_METHODS,
    AdapterConfig,
    DPOConfig,
    GRPOConfig,
    RMConfig,
    SFTConfig,
    all_fields,
    apply_flat,
    load_yaml,
)
from mlxpt.errors import ConfigError

METHODS = ("sft", *PREF_METHODS, "rm", "grpo", "prm", "rft", "distill")
# every method's section names
SECTIONS = ("model", "data", "adapter", "train", "reg", "pref", "rm", "grpo", "prm", "rft", "distill")
# what a run's config.json records besides its settings (dropped when it is given to --config)
RUN_RECORD = ("method", "mlxpt_version", "model_path", "data_report", "adapter_config", "lineage")
# settings a resume may change: none of them changes what a step computes (grad_checkpoint only
# trades memory for compute: turn it on to resume a run that ran out of memory)
RESUME_MUTABLE = {"steps", "eval_every", "save_every", "keep", "eval_batches", "max_bad_steps", "forgetting_warn",
                  "grad_checkpoint"}  # fmt: skip

AnyConfig = SFTConfig | DPOConfig | RMConfig | GRPOConfig | PRMConfig | RFTConfig | DistillConfig


def config_class(method: str) -> type[AnyConfig]:
    """The config dataclass of a method: simpo and orpo (and dpo) are DPOConfig with a preset."""
    classes = {
        "sft": SFTConfig,
        "rm": RMConfig,
        "grpo": GRPOConfig,
        "prm": PRMConfig,
        "rft": RFTConfig,
        "distill": DistillConfig,
    }
    return classes.get(method, DPOConfig)


def flatten(d: dict) -> dict:
    """A YAML/saved mapping grouped by section (`train: {steps: 3}`) as flat `name: value`."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in SECTIONS:
            out.update(v)
        else:
            out[k] = v
    return out


def _keep_round_length(cfg, steps: int) -> None:
    """An RFT run resumed with another --steps keeps its rounds' length and gains or loses rounds;
    recomputed from the new --steps and --rounds, the current round was once stretched and rounds
    added beyond --rounds without a word."""
    from dataclasses import replace

    from mlxpt.config.rft import round_plan

    _, per_round = round_plan(replace(cfg, train=replace(cfg.train, steps=steps)))
    cfg.rft.steps_per_round, cfg.rft.rounds = per_round, 0


def resolve_method(method: str | None, resume: str | None = None, resume_config: dict | None = None) -> str:
    """The method asked for, or the resumed run's (naming another one is E510); `sft` by default."""
    if resume:
        saved = _saved(resume, resume_config).get("method", "sft")
        if method not in (None, saved):
            raise ConfigError("E510", f"this is a {saved} run, not {method}", resume, f"drop {method!r}")
        return saved
    return method or "sft"


def build_config(
    method: str | None,
    flags: dict[str, Any] | None = None,
    yaml_path: str | None = None,
    resume: str | None = None,
    resume_config: dict | None = None,
) -> AnyConfig:
    """The validated config of a run: the one path from settings to a config, for the CLI and the TUI.

    `flags` holds the explicitly set options (`name: value`, values as typed or as strings; None
    counts as not set). A new run is the method's defaults, then its preset (simpo, orpo), then
    the YAML file at `yaml_path` (mlx-lm's key names accepted), then `flags`: command line > YAML > defaults. A resumed run
    (`resume`: its folder, `resume_config`: its saved config.json, read by the caller) is the saved
    config with only RESUME_MUTABLE settings changed by `flags`; the YAML file is not read, and
    `trust_remote_code` is off unless `flags` turns it on (the saved value is never trusted).
    Bad values raise ConfigError (one line with its code)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    method = resolve_method(method, resume, resume_config)
    cls = config_class(method)
    if resume:
        cfg = cls.from_dict({k: v for k, v in _saved(resume, resume_config).items() if k in SECTIONS})
        # trust comes from the person, never from a file: a run folder may come from anyone
        cfg.model.trust_remote_code = False
        fixed = sorted(set(flags) - RESUME_MUTABLE - {"trust_remote_code"})
        if fixed:
            raise ConfigError(
                "E510",
                f"cannot change {', '.join(fixed)} when resuming",
                resume,
                f"only {', '.join(sorted(RESUME_MUTABLE))} may change; start a new run for the rest",
            )
        steps = cfg.train.steps
        apply_flat(cfg, flags, source="command line")
        if method == "rft" and cfg.train.steps != steps:
            _keep_round_length(cfg, steps)
        return cfg
    if method not in METHODS:
        raise ConfigError("E503", f"method={method!r} is not one of {', '.join(METHODS)}", "method")
    cfg = cls()
    if method != "sft":
        apply_flat(cfg, PREF_METHODS.get(method, {}), source=method)
    given = set(flags)
    if yaml_path:  # mlx-lm's key names (iters, lora_parameters, ...) are read as ours
        run_config = saved_method(yaml_path) is not None
        settings, yaml_path = yaml_settings(yaml_path, method)
        flat = from_mlx_lm(settings, set(all_fields(cfg)), yaml_path)
        apply_flat(cfg, flat, source=yaml_path)
        given |= _given_in(flat, run_config)
    apply_flat(cfg, flags, source="command line")
    if isinstance(getattr(cfg, "adapter", None), AdapterConfig):  # what --from may not override
        cfg.adapter._given = frozenset(k.replace("-", "_") for k in given)
    _anchor_fingerprinted(cfg)
    return cfg


# settings a run fingerprints its saved work by (RFT's rounds, distill's teacher cache) that name
# files or runs: made absolute now, as config.json saves them, so a resume (which reads them back
# from config.json) computes the same fingerprints
FINGERPRINTED_PATHS = (("rft", "rewards"), ("rft", "scorer"), ("distill", "teacher"))


def _anchor_fingerprinted(cfg) -> None:
    for section, key in FINGERPRINTED_PATHS:
        obj = getattr(cfg, section, None)
        if obj is not None and isinstance(getattr(obj, key, None), str):
            from mlxpt.config.paths import anchor_setting

            setattr(obj, key, anchor_setting(key, getattr(obj, key), Path.cwd()))


def _given_in(flat: dict, run_config: bool) -> set[str]:
    """The settings a --config file sets: a YAML file's keys; of a run's saved config.json (which
    lists every setting), all but the adapter settings at their defaults."""
    if not run_config:
        return set(flat)
    default = AdapterConfig()
    return {k for k, v in flat.items() if not hasattr(default, k) or getattr(default, k) != v}


def run_config_path(path: str) -> str:
    """`--config RUN` (a run folder) means that run's config.json."""
    p = Path(path)
    return str(p / "config.json") if p.is_dir() and (p / "config.json").is_file() else path


def yaml_settings(path: str, method: str) -> tuple[dict, str]:
    """(flat settings, the file read) of `--config`: a YAML file, or a run's saved config (a run
    folder or its config.json: "start fresh with this run's settings", in a new folder). A run's
    record keys (version, resolved paths, lineage) are dropped, and so is `trust_remote_code`:
    trust comes from the person, never from a file. A run of another method is E585."""
    path = run_config_path(path)
    raw = load_yaml(path)
    if isinstance(raw, dict) and "mlxpt_version" in raw:  # a run's config.json
        saved = raw.get("method", "sft")
        if saved != method:
            raise ConfigError(
                "E585", f"this config is a {saved} run's, not {method}", path,
                f"run `mlxpt train {saved} --config {path}`, or give a YAML of {method} settings",
            )  # fmt: skip
        raw = {k: v for k, v in raw.items() if k not in RUN_RECORD}
        if isinstance(raw.get("model"), dict):
            raw["model"].pop("trust_remote_code", None)
    return flatten(raw), path


def saved_method(path: str | None) -> str | None:
    """The method of a run's saved config given to --config (None for any other file)."""
    if not path:
        return None
    p = Path(run_config_path(path))
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_yaml reports it with its line
    return raw.get("method", "sft") if isinstance(raw, dict) and "mlxpt_version" in raw else None


def _saved(resume: str, resume_config: dict | None) -> dict:
    if resume_config is None:
        raise TypeError("build_config: resuming needs the run's saved config (resume_config)")
    return resume_config
