"""The Llama family (llama, mistral, qwen2, qwen3) in NumPy, with LoRA/DoRA and a hand-written backward.

Forward: embeddings -> N x [RMSNorm -> GQA attention (RoPE, causal + padding mask, optional q/k/v
bias and q/k RMSNorm) -> residual -> RMSNorm -> SwiGLU -> residual] -> RMSNorm -> tied or untied
head, exactly as mlx-lm's `models/llama.py`, `qwen2.py`, `qwen3.py`. Adapters use mlx-lm's
parametrisation: LoRA y = W x + b + scale * (dropout(x) @ A) @ B; DoRA y = m / ||W + scale B^T A^T||
* (W x + scale (dropout(x) A) B) + b with the norm held constant in the backward (as mlx-lm does).

Backward: the trainable parameters are the adapters (or, for `full`, every weight of the last
layers). Training keeps only each layer's input; the backward recomputes one layer at a time with
its activations stored, then runs that layer's analytic backward (activation checkpointing). The
head is evaluated in token chunks so (tokens, vocab) logits never exist at once. `token_logp_kl`
adds KL(p || p_base) per position, p_base from a second pass under other trainable arrays (the
adapter as created); only that pass's final hidden states are kept, its logits are recomputed
per chunk in the backward. Everything runs
in the weights' dtype: float32 normally, float64 for finite-difference checks.

Departures from mlx-lm: dropout masks come from NumPy's PCG64, not MLX's generator (the initial
LoRA A does replay MLX's generator, see `MLXKeys`); quantised weights are dequantised to float on
load (no quantised matmul); RoPE scaling covers default, linear and llama3 (not yarn/longrope).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mlxpt.backends import numpy_peft
from mlxpt.backends.numpy_ops import MLXKeys, make_sampler, rms_bwd, rms_fwd, rope, softmax
from mlxpt.backends.numpy_weights import ModelArgs, load_weights, read_safetensors, rope_inv_freq

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# the order mlx's `named_modules()` visits a block's linears (mlx-lm converts them in this order)
MLX_ORDER = ("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj")
MLX_ORDER += ("self_attn.o_proj", "self_attn.v_proj", "self_attn.k_proj", "self_attn.q_proj")
NEG = -1e30  # additive mask value: finite, so a fully masked row gives a uniform row, not NaN


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
                     keys: list[str] | None, seed: int, peft: dict | None = None) -> None:  # fmt: skip
        """Add LoRA/DoRA to `keys` (None: every linear) of the last `num_layers` layers, or make
        those layers' weights trainable (`full`), or add `prefix`/`adapter` with the parameters
        `peft` (numpy_peft.py). LoRA A is drawn exactly as mlx-lm draws it after
        `mx.random.seed(seed)` (see `MLXKeys`), so the same seed gives the same adapter."""
        n = self.args.num_hidden_layers
        first = n - num_layers
        self.first_trainable = min(self.first_trainable, first)
        keyseq = MLXKeys(seed)
        if kind in ("prefix", "adapter"):
            return numpy_peft.add(self, kind, first, peft or {}, keyseq)
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
        bn = None
        if path + "#adapter" in self.adapters:  # a bottleneck adapter on this linear's output
            y, bn = numpy_peft.bottleneck_fwd(self.params, path, y)
        if st is not None:
            st[path] = (x, keep, xa, pre, c)
            st[path + "#adapter"] = bn
        return y

    def _lin_bwd(self, path, g, st, grads, need_dx=True):
        x, keep, xa, pre, c = st[path]
        if st.get(path + "#adapter") is not None:
            g = numpy_peft.bottleneck_bwd(self.params, path, g, st[path + "#adapter"], grads)
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

    def _mask(self, L, S, offset, pad, segments=None):
        """Additive (B or 1, 1, G*L, S) mask: causal over absolute positions, minus padded keys and
        (packed rows) keys of another row; rows repeat per query head of a KV group (queries are
        laid out (B, KV, G*L, hd))."""
        G = self.args.num_attention_heads // self.args.num_key_value_heads
        qpos = np.arange(offset, offset + L)[:, None]
        m = np.where(np.arange(S)[None] <= qpos, 0.0, NEG).astype(self.dtype)[None, None]
        if pad is not None:
            m = m + np.where(pad[:, None, None, :S], 0.0, NEG).astype(self.dtype)
        if segments is not None:  # (B, L): each position's row in a packed bin (training: S == L)
            same = segments[:, None, :, None] == segments[:, None, None, :]
            m = np.where(same, m, NEG).astype(self.dtype)
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
        prefix = self.adapters.get(p + "self_attn#prefix")
        if prefix is not None:  # P trained positions in front of the real keys (numpy_peft.py)
            k, v, mask = numpy_peft.prefix_attend(self, prefix, k, v, mask)
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
        prefix = self.adapters.get(p + "self_attn#prefix")
        if prefix is not None:
            dk, dv = numpy_peft.prefix_bwd(self, prefix, dk, dv, grads)
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

    def hidden(self, inputs, pad=None, keep=None, drop_rng=None, segments=None):
        """Final normalised hidden states (B*L, D); `keep` (a dict) records layer inputs for
        `backward`; `segments` (B, L) confines attention to each position's packed row."""
        B, L = inputs.shape
        x = self._embed(inputs)
        cs, mask = self._rope_tables(0, L), self._mask(L, L, 0, pad, segments)
        for i in range(self.args.num_hidden_layers):
            seed = None
            if drop_rng is not None and i >= self.first_trainable:
                seed = int(drop_rng.integers(2**63))
            if keep is not None and i >= self.first_trainable:
                keep[i] = (x, seed)
            x = self._block(i, x, B, L, cs, mask, drop_rng=None if seed is None else np.random.default_rng(seed))
        hn, s = rms_fwd(x, self.w["model.norm.weight"], self.args.rms_norm_eps)
        if keep is not None:
            keep.update(shape=(B, L), pad=pad, segments=segments, final=s, hn=hn)
        return hn

    def logits(self, inputs, pad=None):
        """(B, L, V) logits."""
        B, L = inputs.shape
        return (self.hidden(inputs, pad) @ self._head_weight().T).reshape(B, L, -1)

    def _logp_chunks(self, hn, targets, base=None, chunk=512):
        """Per token: the target's log-prob and the log-normaliser lse; with `base` hidden states
        also KL(p || p_base) and the base's lse (both None without)."""
        W = self._head_weight()
        t = targets.reshape(-1)
        logp, lse = np.empty(len(t), self.dtype), np.empty(len(t), self.dtype)
        kl = lse_b = None
        if base is not None:
            kl, lse_b = np.empty(len(t), self.dtype), np.empty(len(t), self.dtype)
        for s in range(0, len(t), chunk):
            z = hn[s : s + chunk] @ W.T
            lse[s : s + chunk] = _logsumexp(z)
            logp[s : s + chunk] = z[np.arange(len(z)), t[s : s + chunk]] - lse[s : s + chunk]
            if base is not None:
                zb = base[s : s + chunk] @ W.T
                lse_b[s : s + chunk] = _logsumexp(zb)
                lp, lq = z - lse[s : s + chunk, None], zb - lse_b[s : s + chunk, None]
                kl[s : s + chunk] = (np.exp(lp) * (lp - lq)).sum(-1)
        return logp, lse, kl, lse_b

    def token_logp(self, inputs, targets, pad=None, keep=None, drop_rng=None, segments=None):
        """(B, L) log-probabilities of `targets`; pass `keep={}` to allow `backward(keep, ...)`."""
        hn = self.hidden(inputs, pad, keep, drop_rng, segments)
        logp, lse, _, _ = self._logp_chunks(hn, targets)
        if keep is not None:
            keep.update(lse=lse, targets=targets.reshape(-1))
        return logp.reshape(inputs.shape)

    def token_logp_kl(self, inputs, targets, base_params, pad=None, keep=None, drop_rng=None):
        """(logp, kl), each (B, L): `token_logp` and KL(p || p_base) over the vocabulary at each
        position, p_base under the trainable arrays `base_params` (no dropout there); pass
        `keep={}` to allow `backward(keep, glogp, gkl)`."""
        own, self.params = self.params, base_params
        try:
            base = self.hidden(inputs, pad)
        finally:
            self.params = own
        hn = self.hidden(inputs, pad, keep, drop_rng)
        logp, lse, kl, lse_b = self._logp_chunks(hn, targets, base)
        if keep is not None:
            keep.update(lse=lse, targets=targets.reshape(-1), base=base, lse_base=lse_b, kl=kl)
        return logp.reshape(inputs.shape), kl.reshape(inputs.shape)

    def backward(self, keep: dict, glogp: np.ndarray, gkl=None, chunk: int = 512) -> dict[str, np.ndarray]:
        """Gradients of sum(glogp * logp) (+ sum(gkl * kl) after `token_logp_kl`) for every
        trainable parameter, from the forward's record."""
        W, t, lse, hn = self._head_weight(), keep["targets"], keep["lse"], keep["hn"]
        g = glogp.reshape(-1).astype(self.dtype)
        gk = None if gkl is None else gkl.reshape(-1).astype(self.dtype)
        dhn = np.empty_like(hn)
        for s in range(0, len(t), chunk):  # dlogits = g * (onehot - softmax)
            z = hn[s : s + chunk] @ W.T
            p = np.exp(z - lse[s : s + chunk, None])
            dz = -p * g[s : s + chunk, None]
            if gk is not None:  # d/dz KL(softmax z || q) = p * (log p - log q - KL)
                lq = keep["base"][s : s + chunk] @ W.T - keep["lse_base"][s : s + chunk, None]
                lp = z - lse[s : s + chunk, None]
                dz += p * (lp - lq - keep["kl"][s : s + chunk, None]) * gk[s : s + chunk, None]
            dz[np.arange(len(z)), t[s : s + chunk]] += g[s : s + chunk]
            dhn[s : s + chunk] = dz @ W
        return self.backward_hidden(keep, dhn)

    def backward_hidden(self, keep: dict, dhn: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of every trainable parameter from d(loss)/d(final normed hidden states) (B*L, d),
        from the forward's record: the part of `backward` below the vocabulary head."""
        B, L = keep["shape"]
        dx, _ = rms_bwd(dhn, self.w["model.norm.weight"], keep["final"])
        grads: dict[str, np.ndarray] = {}
        cs, mask = self._rope_tables(0, L), self._mask(L, L, 0, keep["pad"], keep.get("segments"))
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


def _logsumexp(z):
    m = z.max(-1)
    return m + np.log(np.exp(z - m[:, None]).sum(-1))


def _acc(grads, name, g):
    grads[name] = grads[name] + g if name in grads else g


def _acc_if(grads, params, name, g):
    if name in params:
        _acc(grads, name, g)


__all__ = ["LINEARS", "Model", "ModelArgs", "make_sampler", "read_safetensors"]
