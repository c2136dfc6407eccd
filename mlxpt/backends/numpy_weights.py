"""Weights for the NumPy backend: `config.json` -> `ModelArgs`, safetensors read without unpickling,
quantised weights dequantised to float, and RoPE frequencies as mlx-lm's `initialize_rope` makes them."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxpt.errors import ModelError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> ModelArgs:
        mt = cfg.get("model_type", "llama")
        if mt not in SUPPORTED:
            raise ModelError(
                "E217", f"the numpy backend has no {mt!r} model", mt, f"use {', '.join(SUPPORTED)} or --backend mlx"
            )
        H = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") if mt != "qwen2" else None
        return cls(
            model_type=mt,
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            num_attention_heads=H,
            num_key_value_heads=cfg.get("num_key_value_heads") or H,
            head_dim=head_dim or cfg["hidden_size"] // H,
            rms_norm_eps=cfg["rms_norm_eps"],
            vocab_size=cfg["vocab_size"],
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", mt != "qwen3"),
        )


# --- loading ---------------------------------------------------------------------------------

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "U32": np.uint32, "I32": np.int32}
_DTYPES |= {"U8": np.uint8, "I8": np.int8, "I64": np.int64, "U16": np.uint16, "I16": np.int16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays (bfloat16 widened to float32); never unpickles."""
    return parse_safetensors(np.memmap(path, dtype=np.uint8, mode="r"), str(path))


def parse_safetensors(data: np.ndarray | bytes, path: str = "") -> dict[str, np.ndarray]:
    """Safetensors bytes (a uint8 array or `bytes`) as NumPy arrays, as read_safetensors."""
    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype=np.uint8)
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + n]))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + n + start : 8 + n + end]
        if info["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _DTYPES:
            arr = raw.view(_DTYPES[info["dtype"]])
        else:
            raise ModelError("E218", f"unsupported tensor dtype {info['dtype']}", f"{path}:{name}", "convert to f32")
        out[name] = np.array(arr.reshape(info["shape"]))
    return out


def dequantize(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """MLX affine dequantisation: uint32 words pack 32/bits values (lowest bits first);
    each group of `group_size` values along the last axis is scale * q + bias."""
    if 32 % bits:
        raise ModelError("E218", f"{bits}-bit weights are not supported by the numpy backend", "", "use 2/4/8 bits")
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    q = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # (..., words, values per word)
    q = q.reshape(*w.shape[:-1], -1, group_size).astype(np.float32)
    out = scales[..., None].astype(np.float32) * q + biases[..., None].astype(np.float32)
    # mlx dequantises into the scales' dtype (float16 for converted models) before any upcast
    return out.reshape(*w.shape[:-1], -1).astype(scales.dtype).astype(np.float32)


def load_weights(folder: Path, config: dict) -> dict[str, np.ndarray]:
    """All float weights of a model folder by Hugging Face name, quantised tensors dequantised."""
    raw: dict[str, np.ndarray] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        raw.update(read_safetensors(f))
    quant = config.get("quantization") or config.get("quantization_config") or {}
    out = {}
    for k, v in raw.items():
        if k.endswith((".scales", ".biases")):
            continue
        base = k.removesuffix(".weight")
        if k.endswith(".weight") and base + ".scales" in raw:
            q = quant.get(base) if isinstance(quant.get(base), dict) else quant
            v = dequantize(v, raw[base + ".scales"], raw[base + ".biases"], q.get("bits", 4), q.get("group_size", 64))
        out[k] = v.astype(np.float32)
    return out


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) of mlx-lm's `initialize_rope` (default, linear, llama3)."""
    d, base, sc = args.head_dim, args.rope_theta, args.rope_scaling or {}
    kind = sc.get("type") or sc.get("rope_type") or "default"
    freqs = base ** (np.arange(0, d, 2, dtype=np.float64) / d)  # wavelength / 2pi per pair
    if kind == "linear":
        freqs = freqs * sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelens = 2 * np.pi * freqs
        freqs = np.where(wavelens > old / lo, freqs * factor, freqs)
        medium = (wavelens > old / hi) & (wavelens < old / lo)
        smooth = (old / wavelens - lo) / (hi - lo)
        freqs = np.where(medium, freqs / ((1 - smooth) / factor + smooth), freqs)
    elif kind != "default":
        raise ModelError("E219", f"RoPE scaling {kind!r} is not in the numpy backend", "rope_scaling", "use mlx")
    return (1.0 / freqs).astype(np.float32)
