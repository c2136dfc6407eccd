"""The Llama family (llama, mistral, qwen2, qwen3) in NumPy, with LoRA/DoRA and a hand-written backward.

Forward: embeddings -> N x [RMSNorm -> GQA attention (RoPE, causal + padding mask, optional q/k/v
bias and q/k RMSNorm) -> residual -> RMSNorm -> SwiGLU -> residual] -> RMSNorm -> tied or untied
head, exactly as mlx-lm's `models/llama.py`, `qwen2.py`, `qwen3.py`. Adapters use mlx-lm's
parametrisation: LoRA y = W x + b + scale * (dropout(x) @ A) @ B; DoRA y = m / ||W + scale B^T A^T||
* (W x + scale (dropout(x) A) B) + b with the norm held constant in the backward (as mlx-lm does).

Backward: the trainable parameters are the adapters (or, for `full`, every weight of the last
layers). Training keeps only each layer's input; the backward recomputes one layer at a time with
its activations stored, then runs that layer's analytic backward (activation checkpointing). The
head is evaluated in token chunks so (tokens, vocab) logits never exist at once. Everything runs
in the weights' dtype: float32 normally, float64 for finite-difference checks.

Departures from mlx-lm: dropout masks come from NumPy's PCG64, not MLX's generator (the initial
LoRA A does replay MLX's generator, see `MLXKeys`); quantised weights are dequantised to float on
load (no quantised matmul); RoPE scaling covers default, linear and llama3 (not yarn/longrope).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxpt.errors import ModelError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# the order mlx's `named_modules()` visits a block's linears (mlx-lm converts them in this order)
MLX_ORDER = ("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj")
MLX_ORDER += ("self_attn.o_proj", "self_attn.v_proj", "self_attn.k_proj", "self_attn.q_proj")
NEG = -1e30  # additive mask value: finite, so a fully masked row gives a uniform row, not NaN


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
    data = np.memmap(path, dtype=np.uint8, mode="r")
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


# --- small ops with their backward -------------------------------------------------------------


def rms_fwd(x, w, eps):
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + x.dtype.type(eps))
    return x * r * w, (x, r)


def rms_bwd(g, w, saved):
    x, r = saved
    xh = x * r
    gx = g * w
    dx = r * (gx - xh * (gx * xh).mean(-1, keepdims=True))
    dw = (g * xh).reshape(-1, xh.shape[-1]).sum(0)
    return dx, dw


def rope(x, cos, sin, inverse=False):
    """Rotate halves (traditional=False): x (..., L, d), cos/sin (L, d/2)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    if inverse:
        sin = -sin
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def threefry2x32(key: tuple[int, int], c0: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLX's (and JAX's) Threefry-2x32 hash, 20 rounds, on uint32 counter arrays."""
    ks = np.array([key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA], np.uint32)
    x0, x1 = c0 + ks[0], c1 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


class MLXKeys:
    """`mx.random.seed(seed)` followed by MLX's global key sequence, reproduced bit for bit in NumPy
    (mlx/random.cpp: split = bits((2, 2)); uniform = min(bits / (2^32 - 1), 1 - ulp) * range + low)."""

    def __init__(self, seed: int):
        self.key = (seed >> 32 & 0xFFFFFFFF, seed & 0xFFFFFFFF)

    @staticmethod
    def bits(key, n: int) -> np.ndarray:
        half, odd = n // 2, n % 2
        out = np.empty(n, np.uint32)
        i = np.arange(half, dtype=np.uint32)
        out[:half], out[half + odd :] = threefry2x32(key, i, i + np.uint32(half + odd))
        if odd:
            out[half] = threefry2x32(key, np.array([half], np.uint32), np.zeros(1, np.uint32))[0][0]
        return out

    def next(self) -> tuple[int, int]:
        b = self.bits(self.key, 4)
        self.key = (int(b[0]), int(b[1]))
        return int(b[2]), int(b[3])

    def uniform(self, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
        u = self.bits(self.next(), math.prod(shape)).astype(np.float32) / np.float32(2**32 - 1)
        u = np.minimum(u, np.nextafter(np.float32(1), np.float32(0)))
        lo = np.float32(low)
        return ((np.float32(high) - lo) * u + lo).reshape(shape)


class Adapter:
    """One LoRA/DoRA adapter on a linear layer (arrays live in the model's `params`)."""

    def __init__(self, prefix: str, scale: float, dropout: float, dora: bool):
        self.prefix, self.scale, self.dropout, self.dora = prefix, scale, dropout, dora


class Model:
    """A Llama-family model over a dict of float weights (HF names) plus trainable `params`."""

    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray], dtype=np.float32):
        self.args, self.dtype = args, np.dtype(dtype)
        self.w = {k: v.astype(self.dtype) for k, v in weights.items()}
        self.params: dict[str, np.ndarray] = {}  # trainable, by mlx-lm's parameter names
        self.adapters: dict[str, Adapter] = {}  # linear path -> adapter
        self.first_trainable = args.num_hidden_layers
        self.inv_freq = rope_inv_freq(args)
        self.qk_norm = "model.layers.0.self_attn.q_norm.weight" in self.w

    @classmethod
    def load(cls, folder: str | Path, dtype=np.float32) -> Model:
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        return cls(ModelArgs.from_config(config), load_weights(folder, config), dtype)

    # -- adapters --
    def add_adapters(self, kind: str, num_layers: int, rank: int, scale: float, dropout: float,
                     keys: list[str] | None, seed: int) -> None:  # fmt: skip
        """Add LoRA/DoRA to `keys` (None: every linear) of the last `num_layers` layers, or make
        those layers' weights trainable (`full`). LoRA A is drawn exactly as mlx-lm draws it after
        `mx.random.seed(seed)` (see `MLXKeys`), so the same seed gives the same adapter."""
        n = self.args.num_hidden_layers
        first = n - num_layers
        self.first_trainable = min(self.first_trainable, first)
        keyseq = MLXKeys(seed)
        for i in range(first, n):
            p = f"model.layers.{i}."
            if kind == "full":
                for k in [k for k in self.w if k.startswith(p)]:
                    self.params[k] = self.w.pop(k)
                continue
            for lin in MLX_ORDER:
                if keys is not None and lin not in keys:
                    continue
                W = self.w[p + lin + ".weight"]
                out_dims, in_dims = W.shape
                bound = 1 / math.sqrt(in_dims)
                keyseq.next()  # mlx-lm first builds a throwaway nn.Linear: one uniform draw
                a = keyseq.uniform(-bound, bound, (in_dims, rank))
                self.params[p + lin + ".lora_a"] = a.astype(self.dtype)
                self.params[p + lin + ".lora_b"] = np.zeros((rank, out_dims), self.dtype)
                if kind == "dora":
                    w32 = W.astype(np.float32)
                    self.params[p + lin + ".m"] = np.sqrt((w32 * w32).sum(1)).astype(self.dtype)
                self.adapters[p + lin] = Adapter(p + lin, scale, dropout, kind == "dora")

    def _get(self, name):
        return self.params[name] if name in self.params else self.w.get(name)

    # -- linear layer with optional adapter --
    def _lin(self, path, x, st, drop_rng=None):
        """x (N, in) -> (N, out); `st` (a dict or None) receives what the backward needs."""
        W, b = self._get(path + ".weight"), self._get(path + ".bias")
        y = x @ W.T
        ad = self.adapters.get(path)
        keep = xa = pre = c = None
        if ad is not None:
            A, B = self.params[path + ".lora_a"], self.params[path + ".lora_b"]
            xd = x
            if ad.dropout > 0 and drop_rng is not None:
                keep = (drop_rng.random(x.shape) >= ad.dropout).astype(x.dtype) / x.dtype.type(1 - ad.dropout)
                xd = x * keep
            xa = xd @ A  # (N, r)
            if ad.dora:
                pre = y + x.dtype.type(ad.scale) * (xa @ B)
                adapted = W + x.dtype.type(ad.scale) * (B.T @ A.T)
                denom = np.linalg.norm(adapted, axis=1)  # held constant in the backward
                c = self.params[path + ".m"] / denom
                y = c * pre
                pre = (pre, denom)
            else:
                if b is not None:
                    y = y + b
                y = y + x.dtype.type(ad.scale) * (xa @ B)
                b = None
        if b is not None:
            y = y + b
        if st is not None:
            st[path] = (x, keep, xa, pre, c)
        return y

    def _lin_bwd(self, path, g, st, grads, need_dx=True):
        x, keep, xa, pre, c = st[path]
        W = self._get(path + ".weight")
        ad = self.adapters.get(path)
        if path + ".bias" in self.params:
            _acc(grads, path + ".bias", g.sum(0))
        if path + ".weight" in self.params:
            _acc(grads, path + ".weight", g.T @ x)
        if ad is not None and ad.dora:
            pre, denom = pre
            _acc(grads, path + ".m", (g * pre).sum(0) / denom)
            g = g * c
        dx = g @ W if need_dx else None
        if ad is not None:
            A, B = self.params[path + ".lora_a"], self.params[path + ".lora_b"]
            gz = x.dtype.type(ad.scale) * g
            _acc(grads, path + ".lora_b", xa.T @ gz)
            gxa = gz @ B.T  # (N, r)
            _acc(grads, path + ".lora_a", (x if keep is None else x * keep).T @ gxa)
            if need_dx:
                gxd = gxa @ A.T
                dx = dx + (gxd if keep is None else gxd * keep)
        return dx

    # -- one transformer block --
    def _rope_tables(self, offset, L):
        ang = np.arange(offset, offset + L, dtype=np.float32)[:, None] * self.inv_freq[None]
        return np.cos(ang).astype(self.dtype), np.sin(ang).astype(self.dtype)

    def _mask(self, L, S, offset, pad):
        """Additive (B or 1, 1, G*L, S) mask: causal over absolute positions, minus padded keys;
        rows repeat per query head of a KV group (queries are laid out (B, KV, G*L, hd))."""
        G = self.args.num_attention_heads // self.args.num_key_value_heads
        qpos = np.arange(offset, offset + L)[:, None]
        m = np.where(np.arange(S)[None] <= qpos, 0.0, NEG).astype(self.dtype)[None, None]
        if pad is not None:
            m = m + np.where(pad[:, None, None, :S], 0.0, NEG).astype(self.dtype)
        return np.tile(m, (1, 1, G, 1))

    def _block(self, i, x, B, L, rope_cs, mask, cache=None, st=None, drop_rng=None):
        a = self.args
        p = f"model.layers.{i}."
        H, KV, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        G = H // KV
        eps = a.rms_norm_eps
        h, s_n1 = rms_fwd(x, self._get(p + "input_layernorm.weight"), eps)
        q = self._lin(p + "self_attn.q_proj", h, st, drop_rng).reshape(B, L, H, hd)
        k = self._lin(p + "self_attn.k_proj", h, st, drop_rng).reshape(B, L, KV, hd)
        v = self._lin(p + "self_attn.v_proj", h, st, drop_rng).reshape(B, L, KV, hd)
        s_qn = s_kn = None
        if self.qk_norm:
            q, s_qn = rms_fwd(q, self._get(p + "self_attn.q_norm.weight"), eps)
            k, s_kn = rms_fwd(k, self._get(p + "self_attn.k_norm.weight"), eps)
        cos, sin = rope_cs
        q = rope(q.transpose(0, 2, 1, 3), cos, sin)  # (B, H, L, hd)
        k = rope(k.transpose(0, 2, 1, 3), cos, sin)  # (B, KV, L, hd)
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            ck, cv, off = cache
            ck[:, :, off : off + L], cv[:, :, off : off + L] = k, v
            k, v = ck[:, :, : off + L], cv[:, :, : off + L]
        scale = self.dtype.type(hd**-0.5)
        qg = q.reshape(B, KV, G * L, hd)  # the G query heads of a KV head share its keys
        P = softmax((qg * scale) @ k.swapaxes(-1, -2) + mask)  # (B, KV, G*L, S)
        o = P @ v  # (B, KV, G*L, hd)
        o = o.reshape(B, H, L, hd).transpose(0, 2, 1, 3).reshape(B * L, H * hd)
        hh = x + self._lin(p + "self_attn.o_proj", o, st, drop_rng)
        h2, s_n2 = rms_fwd(hh, self._get(p + "post_attention_layernorm.weight"), eps)
        gate = self._lin(p + "mlp.gate_proj", h2, st, drop_rng)
        up = self._lin(p + "mlp.up_proj", h2, st, drop_rng)
        with np.errstate(over="ignore"):
            sig = 1 / (1 + np.exp(-gate))
        act = gate * sig * up
        out = hh + self._lin(p + "mlp.down_proj", act, st, drop_rng)
        if st is not None:
            st.update(n1=s_n1, n2=s_n2, qn=s_qn, kn=s_kn, qg=qg, k=k, v=v, P=P, gate=gate, up=up, sig=sig)
        return out

    def _block_bwd(self, i, g, B, L, rope_cs, st, grads, need_dx=True):
        a = self.args
        p = f"model.layers.{i}."
        H, KV, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        G = H // KV
        # MLP
        dact = self._lin_bwd(p + "mlp.down_proj", g, st, grads)
        gate, up, sig = st["gate"], st["up"], st["sig"]
        silu = gate * sig
        dgate = dact * up * sig * (1 + gate * (1 - sig))
        dh2 = self._lin_bwd(p + "mlp.gate_proj", dgate, st, grads)
        dh2 = dh2 + self._lin_bwd(p + "mlp.up_proj", dact * silu, st, grads)
        dhh, dw = rms_bwd(dh2, self._get(p + "post_attention_layernorm.weight"), st["n2"])
        _acc_if(grads, self.params, p + "post_attention_layernorm.weight", dw)
        dhh = dhh + g
        # attention
        do = self._lin_bwd(p + "self_attn.o_proj", dhh, st, grads)
        do = do.reshape(B, L, H, hd).transpose(0, 2, 1, 3).reshape(B, KV, G * L, hd)
        qg, k, v, P = st["qg"], st["k"], st["v"], st["P"]
        scale = self.dtype.type(hd**-0.5)
        dP = do @ v.swapaxes(-1, -2)  # (B, KV, G*L, S)
        dv = P.swapaxes(-1, -2) @ do  # (B, KV, S, hd), summed over the group
        ds = P * (dP - (dP * P).sum(-1, keepdims=True))
        dq = (ds @ k) * scale  # (B, KV, G*L, hd)
        dk = ds.swapaxes(-1, -2) @ (qg * scale)  # (B, KV, S, hd)
        cos, sin = rope_cs
        dq = rope(dq.reshape(B, H, L, hd), cos, sin, inverse=True).transpose(0, 2, 1, 3)  # (B, L, H, hd)
        dk = rope(dk, cos, sin, inverse=True).transpose(0, 2, 1, 3)
        dv = dv.transpose(0, 2, 1, 3)
        if self.qk_norm:
            dq, dwq = rms_bwd(dq, self._get(p + "self_attn.q_norm.weight"), st["qn"])
            dk, dwk = rms_bwd(dk, self._get(p + "self_attn.k_norm.weight"), st["kn"])
            _acc_if(grads, self.params, p + "self_attn.q_norm.weight", dwq)
            _acc_if(grads, self.params, p + "self_attn.k_norm.weight", dwk)
        N = B * L
        need_n1 = need_dx or p + "input_layernorm.weight" in self.params
        dh = self._lin_bwd(p + "self_attn.q_proj", dq.reshape(N, -1), st, grads, need_n1)
        dk = self._lin_bwd(p + "self_attn.k_proj", dk.reshape(N, -1), st, grads, need_n1)
        dv = self._lin_bwd(p + "self_attn.v_proj", dv.reshape(N, -1), st, grads, need_n1)
        if not need_n1:
            return None
        dx, dw = rms_bwd(dh + dk + dv, self._get(p + "input_layernorm.weight"), st["n1"])
        _acc_if(grads, self.params, p + "input_layernorm.weight", dw)
        return dx + dhh

    # -- whole model --
    def _head_weight(self):
        return self.w["model.embed_tokens.weight"] if self.args.tie_word_embeddings else self.w["lm_head.weight"]

    def _embed(self, inputs):
        return self.w["model.embed_tokens.weight"][inputs.reshape(-1)]

    def hidden(self, inputs, pad=None, keep=None, drop_rng=None):
        """Final normalised hidden states (B*L, D); `keep` (a dict) records layer inputs for `backward`."""
        B, L = inputs.shape
        x = self._embed(inputs)
        cs, mask = self._rope_tables(0, L), self._mask(L, L, 0, pad)
        for i in range(self.args.num_hidden_layers):
            seed = None
            if drop_rng is not None and i >= self.first_trainable:
                seed = int(drop_rng.integers(2**63))
            if keep is not None and i >= self.first_trainable:
                keep[i] = (x, seed)
            x = self._block(i, x, B, L, cs, mask, drop_rng=None if seed is None else np.random.default_rng(seed))
        hn, s = rms_fwd(x, self.w["model.norm.weight"], self.args.rms_norm_eps)
        if keep is not None:
            keep.update(shape=(B, L), pad=pad, final=s, hn=hn)
        return hn

    def logits(self, inputs, pad=None):
        """(B, L, V) logits."""
        B, L = inputs.shape
        return (self.hidden(inputs, pad) @ self._head_weight().T).reshape(B, L, -1)

    def _logp_chunks(self, hn, targets, chunk=512):
        W = self._head_weight()
        t = targets.reshape(-1)
        logp, lse = np.empty(len(t), self.dtype), np.empty(len(t), self.dtype)
        for s in range(0, len(t), chunk):
            z = hn[s : s + chunk] @ W.T
            mx = z.max(-1)
            lse[s : s + chunk] = mx + np.log(np.exp(z - mx[:, None]).sum(-1))
            logp[s : s + chunk] = z[np.arange(len(z)), t[s : s + chunk]] - lse[s : s + chunk]
        return logp, lse

    def token_logp(self, inputs, targets, pad=None, keep=None, drop_rng=None):
        """(B, L) log-probabilities of `targets`; pass `keep={}` to allow `backward(keep, ...)`."""
        hn = self.hidden(inputs, pad, keep, drop_rng)
        logp, lse = self._logp_chunks(hn, targets)
        if keep is not None:
            keep.update(lse=lse, targets=targets.reshape(-1))
        return logp.reshape(inputs.shape)

    def backward(self, keep: dict, glogp: np.ndarray, chunk: int = 512) -> dict[str, np.ndarray]:
        """Gradients of sum(glogp * logp) for every trainable parameter, from `token_logp`'s record."""
        B, L = keep["shape"]
        W, t, lse, hn = self._head_weight(), keep["targets"], keep["lse"], keep["hn"]
        g = glogp.reshape(-1).astype(self.dtype)
        dhn = np.empty_like(hn)
        for s in range(0, len(t), chunk):  # dlogits = g * (onehot - softmax)
            z = hn[s : s + chunk] @ W.T
            dz = -np.exp(z - lse[s : s + chunk, None]) * g[s : s + chunk, None]
            dz[np.arange(len(z)), t[s : s + chunk]] += g[s : s + chunk]
            dhn[s : s + chunk] = dz @ W
        dx, _ = rms_bwd(dhn, self.w["model.norm.weight"], keep["final"])
        grads: dict[str, np.ndarray] = {}
        cs, mask = self._rope_tables(0, L), self._mask(L, L, 0, keep["pad"])
        for i in range(self.args.num_hidden_layers - 1, self.first_trainable - 1, -1):
            x, seed = keep[i]
            st: dict = {}
            rng = None if seed is None else np.random.default_rng(seed)
            self._block(i, x, B, L, cs, mask, st=st, drop_rng=rng)  # recompute with the same dropout
            dx = self._block_bwd(i, dx, B, L, cs, st, grads, need_dx=i > self.first_trainable)
        return {k: grads.get(k, np.zeros_like(v)) for k, v in self.params.items()}

    # -- generation --
    def make_cache(self, B: int, max_len: int) -> list:
        a = self.args
        shape = (B, a.num_key_value_heads, max_len, a.head_dim)
        return [[np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)] for _ in range(a.num_hidden_layers)]

    def step(self, inputs, cache, offset: int, pad=None) -> np.ndarray:
        """Run `inputs` (B, L) at positions offset.. through the KV cache; last-position logits (B, V)."""
        B, L = inputs.shape
        x = self._embed(inputs)
        cs, mask = self._rope_tables(offset, L), self._mask(L, offset + L, offset, pad)
        for i in range(self.args.num_hidden_layers):
            x = self._block(i, x, B, L, cs, mask, cache=(cache[i][0], cache[i][1], offset))
        hn, _ = rms_fwd(x.reshape(B, L, -1)[:, -1], self.w["model.norm.weight"], self.args.rms_norm_eps)
        return hn @ self._head_weight().T

    def generate(self, prompt: list[int], max_tokens: int, sampler=None, eos: set[int] | None = None):
        """Yield up to `max_tokens` new tokens after `prompt` (greedy unless `sampler` is given)."""
        sampler = sampler or make_sampler()
        cache = self.make_cache(1, len(prompt) + max_tokens)
        logits = self.step(np.asarray([prompt], np.int64), cache, 0)
        pos = len(prompt)
        for _ in range(max_tokens):
            z = logits.astype(np.float32)
            logprobs = z - (
                z.max(-1, keepdims=True) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
            )
            tok = int(sampler(logprobs)[0])
            yield tok
            if eos and tok in eos:
                return
            logits = self.step(np.asarray([[tok]]), cache, pos)
            pos += 1


def _acc(grads, name, g):
    grads[name] = grads[name] + g if name in grads else g


def _acc_if(grads, params, name, g):
    if name in params:
        _acc(grads, name, g)


def make_sampler(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None):
    """mlx-lm's sampler chain (top-p, min-p, top-k, then a draw at `temperature`) with a NumPy RNG."""
    if temperature == 0:
        return lambda logprobs: logprobs.argmax(-1)
    rng = np.random.default_rng(seed)

    def sample(logprobs):
        lp = np.array(logprobs, np.float32)
        if 0 < top_p < 1:
            srt = np.sort(lp, -1)
            probs = np.exp(srt)
            above = np.cumsum(probs[..., ::-1], -1)[..., ::-1] - probs  # mass strictly above each
            total = above[..., :1] + probs[..., :1]
            dropped = (above >= top_p * total).sum(-1, keepdims=True)
            lp = np.where(lp < np.take_along_axis(srt, dropped, -1), -np.inf, lp)
        if min_p > 0:
            lp = np.where(lp < lp.max(-1, keepdims=True) + math.log(min_p), -np.inf, lp)
        if 0 < top_k < lp.shape[-1]:
            drop = np.argpartition(-lp, top_k - 1, -1)[..., top_k:]
            np.put_along_axis(lp, drop, -np.inf, -1)
        z = lp.astype(np.float64) / temperature
        cdf = np.cumsum(np.exp(z - z.max(-1, keepdims=True)), -1)
        u = rng.random(len(cdf)) * cdf[:, -1]  # inverse-CDF draw; filtered tokens add no mass
        return np.minimum((cdf < u[:, None]).sum(-1), cdf.shape[-1] - 1)

    return sample
