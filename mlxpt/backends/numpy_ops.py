"""Small NumPy ops with their backward (RMSNorm, RoPE, softmax), MLX's random generator replayed bit
for bit (Threefry-2x32, for the initial LoRA A), and mlx-lm's sampler chain."""

from __future__ import annotations

import math

import numpy as np


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
