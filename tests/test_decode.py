"""Sampling and streaming generation on a tiny random Llama (fast)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny import make_model, make_tokenizer

from mlxpt.decode import chat_prompt, generate_text, iter_generate, make_sampler
from mlxpt.errors import ConfigError, ModelError
from mlxpt.models.loader import load

MSG = [{"role": "user", "content": "hello there"}]


def make_adapter_run(folder, base, fine_tune_type="lora", quantize="none", seed=1):
    """A run folder with a LoRA/DoRA adapter whose lora_b is random (so it changes outputs)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlxpt.config import AdapterConfig
    from mlxpt.models.adapters import apply_adapters, save_adapter

    model, _ = load(str(base), quantize=quantize)
    cfg = apply_adapters(model, AdapterConfig(fine_tune_type=fine_tune_type, rank=4, num_layers=-1))
    mx.random.seed(seed)
    params = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) for k, v in params if "lora_b" in k]))
    folder.mkdir(parents=True)
    save_adapter(folder, model, cfg)
    (folder / "config.json").write_text(json.dumps({"model": {"model": str(base), "quantize": quantize}}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = make_model(tmp_path_factory.mktemp("tiny") / "base")
    model, tok = load(str(base))
    return base, model, tok


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 1.0},
        {"seed": -3},
    ],
)
def test_bad_sampling_values_are_one_line_config_errors(kw):
    with pytest.raises(ConfigError) as e:
        make_sampler(**kw)
    assert e.value.code == "E601" and "\n" not in e.value.line() and "--" in e.value.line()


def test_seed_makes_sampling_reproducible():
    logprobs = mx.log(mx.ones((1, 50)) / 50)  # uniform: every draw is pure chance

    def draw(seed):
        sampler = make_sampler(temperature=1.0, seed=seed)
        return [sampler(logprobs).item() for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert len(set(draw(7))) > 5  # it does sample


def test_seeded_generation_is_reproducible(tiny):
    _, model, tok = tiny
    ids = chat_prompt(tok, MSG)
    a = [c.token for c in iter_generate(model, tok, ids, 12, make_sampler(temperature=1.5, seed=3))]
    b = [c.token for c in iter_generate(model, tok, ids, 12, make_sampler(temperature=1.5, seed=3))]
    assert a == b


def _manual_greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(mx.array(ids)[None])[0, -1]
        t = int(np.argmax(np.array(logits.astype(mx.float32))))
        out.append(t)
        ids.append(t)
    return out


def test_temperature_zero_is_argmax_step_by_step(tiny):
    _, model, tok = tiny
    ids = chat_prompt(tok, MSG)
    want = _manual_greedy(model, ids, 10)
    chunks = list(iter_generate(model, tok, ids, max_tokens=10))
    assert [c.token for c in chunks] == want
    assert chunks[-1].finish_reason == "length" and chunks[-1].generation_tokens == 10


def test_top_k_one_equals_greedy(tiny):
    _, model, tok = tiny
    ids = chat_prompt(tok, MSG)
    greedy = [c.token for c in iter_generate(model, tok, ids, 10)]
    topk = [c.token for c in iter_generate(model, tok, ids, 10, make_sampler(temperature=2.0, top_k=1, seed=0))]
    assert topk == greedy


class _EosAfter(nn.Module):
    """Wraps a model so that EOS wins once `n` tokens have been generated."""

    def __init__(self, inner, prompt_len, n, eos):
        super().__init__()
        self.inner, self.layers, self.limit, self.eos = inner, inner.layers, prompt_len + n, eos

    def __call__(self, x, cache=None, **kw):
        logits = self.inner(x, cache=cache)
        if cache[0].offset >= self.limit:
            logits = logits + 100.0 * (mx.arange(logits.shape[-1]) == self.eos)
        return logits


def test_generation_stops_at_eos(tiny):
    _, model, tok = tiny
    ids = chat_prompt(tok, MSG)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    chunks = list(iter_generate(_EosAfter(model, len(ids), 3, eos), tok, ids, max_tokens=50))
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.token is None
    assert 1 <= last.generation_tokens <= 4
    assert eos not in [c.token for c in chunks]
    assert "<|im_end|>" not in "".join(c.text for c in chunks)


def test_chat_prompt_uses_template_and_system(tiny):
    _, _, tok = tiny
    text = tok.decode(chat_prompt(tok, MSG, system="Be terse."))
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert text.endswith("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")


def test_chat_prompt_without_template_uses_last_user_text(tmp_path):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    make_tokenizer(tmp_path / "t", chat_template=None)
    tok = TokenizerWrapper(AutoTokenizer.from_pretrained(str(tmp_path / "t")))
    msgs = [*MSG, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    assert tok.decode(chat_prompt(tok, msgs)) == "again"
    with pytest.raises(ModelError) as e:  # a system prompt has no place: once dropped without a word
        chat_prompt(tok, msgs, system="Be brief.")
    assert e.value.code == "E603" and "no chat template" in e.value.what


def test_generate_text_joins_chunks_and_rejects_bad_max_tokens(tiny):
    _, model, tok = tiny
    ids = chat_prompt(tok, MSG)
    assert generate_text(model, tok, ids, max_tokens=5) == "".join(c.text for c in iter_generate(model, tok, ids, 5))
    with pytest.raises(ConfigError):
        generate_text(model, tok, ids, max_tokens=0)
