"""Chaining (`mlxpt train <method> --from RUN`): a new run starts from an earlier run's adapter.

`resolve_start` finds and checks the source before any weights are read: a run folder (its final
adapter, `adapters.safetensors` at the run root), one of its checkpoints, or any adapter folder in
mlx-lm's format (mlx-lm and mlx-lm-lora write the same two files). `adopt_settings` makes the new
run's adapter the source's shape: settings the person did not set are taken from the source, a
setting set (by flag or YAML, even to its default) that contradicts it is refused, naming both
values. The adapter bytes are read once, so the weights loaded, the copy kept in the new run
(START_FILE, read again on resume) and the sha256 in its lineage are the same bytes even while
the source run is still writing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from mlxpt.config import AdapterConfig
from mlxpt.config.sections import given_adapter_settings
from mlxpt.errors import ConfigError
from mlxpt.models.adapters import ADAPTER_FILE, _check_checkpoint, find_adapter, read_adapter_config
from mlxpt.runs import read_config, read_status
from mlxpt.runs.guards import is_run_dir

START_FILE = "start_adapters.safetensors"  # the new run's copy of the adapter it started from
REWARD_HEAD_FILE = "reward_head.safetensors"  # models/heads.py's (not imported: it imports mlx)


@dataclass
class Start:
    """A checked source adapter: its folder, config, bytes and what the new run records of it."""

    folder: Path
    adapter_config: dict
    data: bytes
    lineage: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def resolve_start(from_run: str, runs_dir: str | Path | None = None, run_dir: str | Path | None = None) -> Start:
    """Find and check the adapter `from_run` names (see the module docstring); `runs_dir` and
    `run_dir` are the new run's outputs, which it may never be or contain."""
    given = Path(from_run).expanduser()
    if not str(from_run).strip() or not given.exists():
        raise ConfigError(
            "E570", "--from folder not found", str(from_run), "pass a run folder (runs/<id>) or an adapter folder"
        )
    if not given.is_dir():
        raise ConfigError(
            "E571", "--from takes a folder, not a file", str(from_run),
            f"pass the folder that holds {ADAPTER_FILE} (a run folder or an adapter folder)",
        )  # fmt: skip
    folder = given.resolve()
    _check_not_an_output(folder, runs_dir, run_dir, str(from_run))
    run = is_run_dir(folder)
    status = (read_status(folder) or {}) if run else {}
    if run and not (folder / ADAPTER_FILE).is_file():
        state = f"{status.get('status', 'unknown')} at step {status.get('step', 0)}"
        raise ConfigError(
            "E572", f"this run has not saved an adapter yet ({state})", str(from_run),
            "wait for its first checkpoint (or finish it with `mlxpt train --resume`), or pick another run",
        )  # fmt: skip
    refuse_reward_model(folder, "--from", str(from_run))
    folder = find_adapter(folder)  # E221 without adapter files, E703 for pickles
    _check_checkpoint(folder)  # a checkpoint is used only if it matches its manifest
    adapter_config = read_adapter_config(folder)
    if adapter_config.get("fine_tune_type", "lora") == "full":
        raise ConfigError(
            "E574", "this adapter is full fine-tuning (whole layers), not LoRA/DoRA", str(from_run),
            "fuse it and pass the fused folder as --model instead",
        )  # fmt: skip
    data = (folder / ADAPTER_FILE).read_bytes()
    return Start(folder, adapter_config, data, _lineage(folder, adapter_config, data), _warnings(folder, status))


def refuse_reward_model(folder: Path, flag: str, where: str) -> None:
    """E579 for a reward model's or PRM's run: its adapter is a scoring backbone, not a policy."""
    if (Path(folder) / REWARD_HEAD_FILE).is_file():
        raise ConfigError(
            "E579", f"this is a reward model; {flag} takes a policy's adapter (sft, dpo, grpo, ...)", where,
            "score completions with it instead (mlxpt generate --reward-model), or pick a policy run",
        )  # fmt: skip


def _check_not_an_output(folder: Path, runs_dir, run_dir, given: str) -> None:
    """An output is never one of its inputs: the new run's own folder, or the folder of runs."""
    for out, what in ((run_dir, "this run's own folder"), (runs_dir, "the runs folder (--runs-dir)")):
        if out is not None and folder == Path(out).resolve():
            raise ConfigError(
                "E576", f"--from is {what}: a run cannot start from its own output", given,
                "name one earlier run inside it, e.g. runs/<id>",
            )  # fmt: skip
    if run_dir is not None and Path(run_dir).resolve() in folder.parents:
        raise ConfigError("E576", "--from lies inside this run's own folder", given, "name an earlier run")
    if not is_run_dir(folder) and any(c.is_dir() and is_run_dir(c) for c in folder.iterdir()):
        raise ConfigError("E576", "--from is a folder of runs, not a run", given, "name one run inside it")


def _lineage(folder: Path, adapter_config: dict, data: bytes) -> dict:
    """What the new run records of its source (config.json's `lineage`)."""
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    out: dict = {"path": str(folder), "sha256": hashlib.sha256(data).hexdigest()}
    shape = ("fine_tune_type", "num_layers", "lora_parameters", "prefix_parameters", "adapter_parameters")
    out["adapter"] = {k: adapter_config.get(k) for k in shape if k in adapter_config or k in shape[:3]}
    if is_run_dir(run):
        try:
            config = read_config(run)
        except ConfigError:
            config = {}
        status = read_status(run) or {}
        step = int(folder.name.split("-")[-1]) if run != folder else status.get("step")
        out |= {"run": run.name, "method": config.get("method"), "step": step, "status": status.get("status")}
        out["model"] = (config.get("model") or {}).get("model") if isinstance(config.get("model"), dict) else None
        out["model_path"] = config.get("model_path")
        if isinstance(config.get("lineage"), dict):  # a chain: sft -> dpo -> grpo
            out["parent"] = config["lineage"]
    else:
        out |= {"run": None, "model": adapter_config.get("model")}  # mlx-lm writes the base model here
    return out


def _warnings(folder: Path, status: dict) -> list[str]:
    if status and status.get("status") != "finished":
        return [
            f"--from run is {status.get('status', 'unknown')} at step {status.get('step')}: starting from the "
            f"adapter it last saved ({folder / ADAPTER_FILE})"
        ]
    return []


# ---- the new run's adapter settings ---------------------------------------------------------

DEFAULTS = {f.name: f.default for f in fields(AdapterConfig)}


def source_settings(adapter_config: dict) -> dict:
    """The source adapter's shape as our settings (fine_tune_type, rank, alpha, num_layers, targets)."""
    lora = adapter_config.get("lora_parameters") or {}
    rank = int(lora.get("rank", DEFAULTS["rank"]))
    out = {
        "fine_tune_type": adapter_config.get("fine_tune_type", "lora"),
        "rank": rank,
        "alpha": float(lora.get("scale", DEFAULTS["alpha"] / DEFAULTS["rank"])) * rank,
        "num_layers": int(adapter_config["num_layers"]),
    }
    keys = lora.get("keys")
    out["targets"] = "all" if not keys else ",".join(sorted(keys))
    prefix, bottleneck = adapter_config.get("prefix_parameters"), adapter_config.get("adapter_parameters")
    if isinstance(prefix, dict):  # prefix tuning: its length and projection are its shape (models/peft.py)
        out |= {"prefix_length": int(prefix["length"]), "prefix_projection": int(prefix.get("projection", 0))}
    if isinstance(bottleneck, dict):
        out["adapter_size"] = int(bottleneck["size"])
    return out


def adopt_settings(cfg: AdapterConfig, adapter_config: dict, where: str) -> list[str]:
    """Give `cfg` the source adapter's shape: a setting the person did not set (flag or YAML, as
    `build_config` noted; without that note, one left at its default) takes the source's value;
    one set must agree with it, even when it equals the default (E575 names both values). Returns
    what it took. `dropout` stays the new run's: it is a training setting, not part of the shape."""
    src, taken = source_settings(adapter_config), []
    given = given_adapter_settings(cfg)
    for name, value in src.items():
        mine = getattr(cfg, name)
        if _same(name, mine, value):
            continue
        unset = name not in given if given is not None else mine == DEFAULTS[name]
        if unset:
            setattr(cfg, name, value)
            taken.append(f"{name}={value}")
            continue
        raise ConfigError(
            "E575", f"{name}={mine} does not match the --from adapter's {name}={value}", where,
            f"drop --{name.replace('_', '-')} (it is taken from the adapter) or set it to {value}",
        )  # fmt: skip
    return taken


def _same(name: str, mine, theirs) -> bool:
    if name == "alpha":
        return math.isclose(float(mine), float(theirs), rel_tol=1e-6)
    if name == "targets":
        short = lambda t: {k.strip().rsplit(".", 1)[-1] for k in str(t).split(",") if k.strip()}  # noqa: E731
        return str(mine).strip() in ("", "all") and theirs == "all" or short(mine) == short(theirs)
    if name == "num_layers" and mine == -1:
        return True  # all layers: the weights' names decide (checked when they are loaded)
    return mine == theirs
