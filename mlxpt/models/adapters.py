"""Trainable adapters on an mlx-lm model: LoRA, DoRA (mlx-lm's layers) or full weights of the
last N layers. The saved format is mlx-lm's (`adapter_config.json` + `adapters.safetensors`),
so `mlx_lm.generate --adapter-path runs/<id>` works on our runs too."""

from __future__ import annotations

import json
from pathlib import Path

from mlxpt.config import AdapterConfig
from mlxpt.errors import ConfigError, ModelError, SecurityError
from mlxpt.models.peft import PARAMS as PEFT_PARAMS
from mlxpt.models.peft import TYPES as PEFT_TYPES
from mlxpt.models.peft import add_peft, check_config, load_peft, parameters_of

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def _layer_keys(model, targets: str) -> list[str] | None:
    """Full module paths inside a transformer block for short names such as `q_proj`."""
    if targets.strip() in ("", "all"):
        return None
    import mlx.nn as nn

    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    names = [n for n, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    keys = []
    for w in wanted:
        hits = [n for n in names if n == w or n.endswith("." + w)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(
                "E509", f"no linear layer named {w!r} in the model", "targets", f"choose from {', '.join(short)}"
            )
        keys += hits
    return sorted(set(keys))


def apply_adapters(model, cfg: AdapterConfig, seed: int = 0) -> dict:
    """Freeze the base, add trainable adapters; return the mlx-lm adapter config."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    num = n_layers if cfg.num_layers < 0 else min(cfg.num_layers, n_layers)
    model.freeze()
    mx.random.seed(seed)
    if cfg.fine_tune_type == "full":
        for layer in model.layers[n_layers - num :]:
            layer.unfreeze()
        params = None
    elif cfg.fine_tune_type in PEFT_TYPES:  # prefix / bottleneck adapters: models/peft.py
        kind = cfg.fine_tune_type
        return {
            "fine_tune_type": kind,
            "num_layers": num,
            PEFT_PARAMS[kind]: add_peft(model, kind, num, parameters_of(cfg)),
        }
    else:
        params = {
            "rank": cfg.rank,
            "scale": cfg.alpha / cfg.rank,
            "dropout": cfg.dropout,
            "keys": _layer_keys(model, cfg.targets),
        }
        linear_to_lora_layers(model, num, params, use_dora=cfg.fine_tune_type == "dora")
    out = {"fine_tune_type": cfg.fine_tune_type, "num_layers": num}
    if params is not None:
        out["lora_parameters"] = params
    return out


def trainable(model) -> dict:
    """Flat name -> array of the trainable parameters."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(folder: str | Path, model, adapter_config: dict) -> None:
    """Write adapters.safetensors then adapter_config.json, each atomically."""
    import numpy as np

    from mlxpt.runs import atomic_write_json, save_safetensors_atomic

    folder = Path(folder)
    arrays = {k: np.array(v) for k, v in trainable(model).items()}
    save_safetensors_atomic(folder / ADAPTER_FILE, arrays, {"format": "mlx"})
    atomic_write_json(folder / CONFIG_FILE, adapter_config)


def adapter_stamp(folder: str | Path | None) -> tuple | None:
    """What identifies the adapter file a folder holds now (inode, size, mtime): it changes when a
    resumed run saves again. None for no folder or no file."""
    if folder is None:
        return None
    try:
        st = (Path(folder) / ADAPTER_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def find_adapter(path: str | Path) -> Path:
    """The folder holding adapter files for a run folder, a checkpoint or an adapter folder."""
    p = Path(path)
    if not p.exists():
        raise ModelError("E220", "adapter path not found", str(p), "pass a run folder (runs/<id>) or an adapter folder")
    if not p.is_dir():  # a file, or a device or FIFO given by mistake: look beside it
        if p.name not in (ADAPTER_FILE, CONFIG_FILE) and (p.parent / ADAPTER_FILE).is_file():
            # mlx-lm's numbered checkpoints (0000200_adapters.safetensors) sit beside the final
            # adapters.safetensors, which was once loaded in their place without a word
            raise ModelError(
                "E221", f"{p.name} is not the folder's {ADAPTER_FILE}, which is what an adapter folder loads",
                str(p), f"pass the folder, or copy {p.name} as {ADAPTER_FILE} with {CONFIG_FILE} into a folder of its own",
            )  # fmt: skip
        p = p.parent
    if (p / ADAPTER_FILE).is_file() and _config_file(p).is_file():
        return p
    if (p / "adapter_model.safetensors").is_file():
        raise ModelError(
            "E221", "a Hugging Face PEFT adapter (adapter_model.safetensors); mlxpt reads mlx-lm's adapter format",
            str(p), "merge it into its base with PEFT's merge_and_unload() and pass that folder as --model",
        )  # fmt: skip
    pickles = [q.name for q in p.iterdir() if q.suffix in (".npz", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")]
    if pickles:
        raise SecurityError(
            "E703",
            f"refusing non-safetensors adapter file {pickles[0]} (pickle can run code)",
            str(p),
            "use adapters.safetensors",
        )
    raise ModelError(
        "E221", f"no {ADAPTER_FILE} + {CONFIG_FILE} in this folder", str(p), "train a run first, or pass its folder"
    )


def _config_file(folder: Path) -> Path:
    """The adapter config: in the folder, or in the run above a checkpoint (runs/<id>/checkpoints/step-N)."""
    if not (folder / CONFIG_FILE).is_file() and folder.parent.name == "checkpoints":
        return folder.parent.parent / CONFIG_FILE
    return folder / CONFIG_FILE


def read_adapter_config(folder: Path) -> dict:
    try:
        cfg = json.loads(_config_file(folder).read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        if cfg.get("fine_tune_type", "lora") not in ("lora", "dora", "full", *PEFT_TYPES) or "num_layers" not in cfg:
            raise ValueError("missing fine_tune_type/num_layers")
        if cfg.get("fine_tune_type") in PEFT_TYPES:
            check_config(cfg)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ModelError(
            "E222", f"invalid {CONFIG_FILE}: {e}", str(_config_file(folder)), "re-save the adapter"
        ) from None
    return cfg


def load_adapter(model, path: str | Path) -> dict:
    """Add the adapter layers described in `path` to `model` and load their weights."""
    from mlx_lm.tuner.utils import load_adapters

    folder = find_adapter(path)
    cfg = read_adapter_config(folder)
    _check_checkpoint(folder)
    try:
        if cfg.get("fine_tune_type") in PEFT_TYPES:
            load_peft(model, cfg, folder / ADAPTER_FILE)
        elif (folder / CONFIG_FILE).is_file():
            load_adapters(model, str(folder))
        else:  # a checkpoint: the run's config, the checkpoint's weights (what load_adapters does)
            if cfg.get("fine_tune_type", "lora") != "full":
                from mlx_lm.tuner.utils import linear_to_lora_layers

                dora = cfg.get("fine_tune_type") == "dora"
                linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"], use_dora=dora)
            model.load_weights(str(folder / ADAPTER_FILE), strict=False)
    except RuntimeError as e:  # mx.load on a file that is not safetensors (never unpickled)
        if _looks_like_safetensors(folder / ADAPTER_FILE):  # damaged, not hostile: a truncated copy
            raise ModelError(
                "E224", f"{ADAPTER_FILE} is damaged or incomplete ({str(e).splitlines()[0][:80]})", str(folder),
                "use another checkpoint of the run, or re-save the adapter",
            ) from None  # fmt: skip
        raise SecurityError(
            "E704",
            f"{ADAPTER_FILE} is not a valid safetensors file ({str(e).splitlines()[0]})",
            str(folder),
            "re-save the adapter with mlxpt; other formats are never loaded",
        ) from None
    except (ValueError, KeyError) as e:
        first = str(e).splitlines()[0]
        raise ModelError(
            "E223", f"adapter does not fit this model: {first}", str(folder), "load it with the model it was trained on"
        ) from None
    _check_finite(folder / ADAPTER_FILE)
    return cfg


def _check_checkpoint(folder: Path) -> None:
    """A checkpoint (runs/<id>/checkpoints/step-N) is used only if it matches its manifest."""
    if folder.parent.name != "checkpoints" or not (folder / "manifest.json").is_file():
        return
    from mlxpt.runs.store import checkpoint_problems

    problem = checkpoint_problems(folder)
    if problem is not None:
        raise ModelError(
            "E224", f"this checkpoint does not verify ({problem})", str(folder),
            "use another checkpoint of the run (mlxpt lists them in the run folder)",
        )  # fmt: skip


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length, then its JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _check_finite(path: Path) -> None:
    """Refuse an adapter with NaN or inf weights before it generates anything."""
    import mlx.core as mx

    for name, value in mx.load(str(path)).items():
        if not bool(mx.all(mx.isfinite(value)).item()):
            raise ModelError(
                "E225", f"the adapter has non-finite weights ({name})", str(path),
                "use an earlier checkpoint of the run; this one was saved from a diverged state",
            )  # fmt: skip
