"""The real bundled default model (SmolLM2-135M-Instruct Q4_1 GGUF), converted into a session MLXPT_HOME.

Measured on the 2-core CPU (~40 s for the file, other jobs running): the kept-quantised model
(`quantize="4"`: Q4_1 linears, Q8_0 embedding, group 32) gives bit-identical logits to
`mlx_lm.load(<converted folder>)`; the float32 dequantised model (`quantize="none"`, also what
"auto" gives on CPU) differs from it by max |Δlogit| = 0.0 (asserted <= FLOAT_TOL, |logit| ~38).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxpt import _blas

_blas.activate()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402

from mlxpt.models import loader  # noqa: E402
from mlxpt.models.loader import DEFAULT_ALIAS, load, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

FLOAT_TOL = 1e-3  # float32 dequantised vs kept-quantised logits (same weights; summation order only)
QUESTION = "What is the capital of France? Answer in one sentence."
PROBE = "The capital of France is"


@pytest.fixture(scope="module")
def home(session_mlxpt_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLXPT_HOME", str(session_mlxpt_home))
        yield session_mlxpt_home


@pytest.fixture(scope="module")
def folder(home):
    path = loader.resolve(DEFAULT_ALIAS)
    assert path.parent == home / "models" and (path / "model.safetensors").is_file()
    assert loader.resolve(DEFAULT_ALIAS) == path  # converted once, then reused
    return path


@pytest.fixture(scope="module")
def float_model(folder):
    return load(DEFAULT_ALIAS, quantize="none")


def _logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def test_conversion_is_exact(folder, float_model):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["tie_word_embeddings"]
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    q4, tok = load(DEFAULT_ALIAS, quantize="4")
    linears = [m for _, m in q4.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(linears) == 30 * 7 and all((m.bits, m.group_size) == (4, 32) for m in linears)
    assert isinstance(q4.model.embed_tokens, nn.QuantizedEmbedding) and q4.model.embed_tokens.bits == 8
    ids = tok.encode(PROBE)
    want = _logits(q4, ids)
    ref, _ = mlx_lm.load(str(folder))
    assert np.array_equal(_logits(ref, ids), want)  # the GGUF blocks, untouched
    model, _ = float_model
    assert not [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert model.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
    assert np.abs(_logits(model, ids) - want).max() <= FLOAT_TOL
    assert tok.decode([int(want[0, -1].argmax())]) == " Paris"


def test_france(float_model):
    model, tok = float_model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    answer = mlx_lm.generate(model, tok, prompt=prompt, max_tokens=30)  # greedy (temperature 0)
    assert "Paris" in answer, answer


def test_tokenizer(home):
    tok = load_tokenizer(DEFAULT_ALIAS)
    for text in ("12345 + 678 = 13023", "Ünïcödé ✓ 東京 😀 – naïve café", "line one\n\n  indented\ttab"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("2024")) == 4  # llama.cpp's "smollm" pre-tokenizer splits digits
    assert tok.encode("<|im_end|>") == [2] and tok.eos_token_id == 2
    assert tok.encode("<|im_start|>") == [1]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
