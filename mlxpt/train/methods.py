"""The training methods by name: what `mlxpt train METHOD`, the TUI and the Python API run.

Each entry is a `runner.Method` (plain values: reader, encoder, layout wish, objective, task,
memory shape); its config class and presets live in the `config` package under the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mlxpt.errors import ConfigError
from mlxpt.train.distill import DISTILL
from mlxpt.train.dpo import DPO
from mlxpt.train.grpo import GRPO
from mlxpt.train.prm import PRM
from mlxpt.train.rft import RFT
from mlxpt.train.rm import RM
from mlxpt.train.runner import Method, run_training
from mlxpt.train.sft import SFT

METHODS: dict[str, Method] = {
    "sft": SFT,
    "dpo": DPO,
    "simpo": replace(DPO, name="simpo"),  # DPOConfig with the simpo preset (config/sections.py)
    "orpo": replace(DPO, name="orpo"),
    "rm": RM,
    "grpo": GRPO,
    "rft": RFT,
    "prm": PRM,
    "distill": DISTILL,
}


def run_method(
    name: str,
    cfg,
    resume_dir: str | Path | None = None,
    emit: Callable[[dict], None] = lambda e: None,
    stop=None,
) -> tuple[Path, str]:
    """Train (or resume) one run of the method `name`; return (run folder, "finished" | "interrupted")."""
    if name not in METHODS:
        raise ConfigError("E503", f"method={name!r} is not one of {', '.join(METHODS)}", "method", "pick one of them")
    return run_training(METHODS[name], cfg, resume_dir=resume_dir, emit=emit, stop=stop)
