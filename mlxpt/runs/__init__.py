"""Run directories, atomic artefacts, checkpoints and graceful signals (no mlx imports here)."""

from mlxpt.runs.atomic import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    save_safetensors_atomic,
    sha256_file,
)
from mlxpt.runs.folder import (
    check_run_name,
    clean_temp,
    new_run_dir,
    read_config,
    read_status,
    write_config,
    write_status,
)
from mlxpt.runs.signals import StopFlag, graceful_signals
from mlxpt.runs.store import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint

__all__ = [
    "StopFlag",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_run_name",
    "clean_temp",
    "graceful_signals",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "new_run_dir",
    "read_config",
    "read_jsonl",
    "read_status",
    "save_checkpoint",
    "save_safetensors_atomic",
    "sha256_file",
    "verify_checkpoint",
    "write_config",
    "write_status",
]
