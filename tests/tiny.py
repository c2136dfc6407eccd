"""Tiny random models and tokenizers for fast tests (no network, no bundled weights).

`make_tokenizer(dir)` writes a byte-level BPE tokenizer (256 byte tokens + ChatML specials,
no merges) with a ChatML chat template; `make_model(dir)` adds a random Llama config and
safetensors weights, so the folder loads with mlx-lm and with `mlxpt.models.load`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(path: str | Path, chat_template: str | None = CHATML) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return path


TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 272,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def make_model(path: str | Path, seed: int = 0, **overrides) -> Path:
    """A random Llama folder (config.json, model.safetensors, tokenizer) in float32."""
    from safetensors.numpy import save_file

    path = make_tokenizer(path)
    cfg = {**TINY_CONFIG, **overrides}
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H

    def w(*shape):
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(H * hd, D)
        t[p + "self_attn.k_proj.weight"] = w(KV * hd, D)
        t[p + "self_attn.v_proj.weight"] = w(KV * hd, D)
        t[p + "self_attn.o_proj.weight"] = w(D, H * hd)
        t[p + "mlp.gate_proj.weight"] = w(F, D)
        t[p + "mlp.up_proj.weight"] = w(F, D)
        t[p + "mlp.down_proj.weight"] = w(D, F)
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(V, D)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


class StopAfter:
    """A stop flag that turns on at its n-th read (the loop reads it after each micro-batch and
    after each step), as a Ctrl-C would at that moment."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.n


def run_config(cfg_cls, tiny_dir, data_dir, tmp_path, **kw):
    """A fast run config on the tiny model: 6 steps, high learning rate, no periodic eval/saves."""
    from mlxpt.config import apply_flat

    base = {
        "model": str(tiny_dir),
        "data": str(data_dir),
        "runs_dir": str(tmp_path / "runs"),
        "steps": 6,
        "batch_size": 4,
        "max_seq_len": 256,
        "eval_every": 0,
        "eval_batches": 2,
        "save_every": 100,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "num_layers": -1,
        "regression_data": "none",  # the forgetting monitor has its own tests (test_forgetting.py)
    }
    cfg = cfg_cls()
    apply_flat(cfg, {**base, **kw}, source="test")
    return cfg


def pref_rows(n: int = 32) -> list[dict]:
    """The first n bundled preference rows without their system prompts (short for a byte tokenizer)."""
    lines = (Path(__file__).parents[1] / "assets/pref/train.jsonl").read_text().splitlines()[:n]
    return [{k: v for k, v in json.loads(x).items() if k != "system"} for x in lines]


def write_pref_dir(d: Path, rows: list[dict], n_train: int = 24) -> Path:
    """train.jsonl (rows[:n_train]) and valid.jsonl (the rest) in folder d."""
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return d


def write_prompt_dir(d: Path, **splits: tuple[int, int]) -> Path:
    """GRPO prompt files from the bundled generator: `train=(rows, seed)`, `test=(rows, seed)`, ..."""
    from mlxpt.data import synth

    for name, (n, seed) in splits.items():
        rows = synth.make_split(n, seed)
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": synth.question_of(r), "answer": r["answer"]}) + "\n" for r in rows)
        )
    return d


def assert_resume_stops_where_the_straight_run_does(run, straight_cfg, cfg, reads: int, load_state) -> None:
    """A run stopped (after `reads` stop checks, keeping step 1) and resumed meets the reward
    guard's E549 at the step, and with the counts, of the straight run: the counts are checkpointed."""
    import pytest

    from mlxpt.errors import MlxptError

    with pytest.raises(MlxptError) as straight:
        run(straight_cfg)
    part, outcome = run(cfg, stop=StopAfter(reads))
    assert outcome == "interrupted" and load_state(part)[1]["loop"]["step"] == 1
    with pytest.raises(MlxptError) as resumed:
        run(cfg, resume_dir=part)
    assert straight.value.code == resumed.value.code == "E549"
    assert resumed.value.saved_step == straight.value.saved_step == 2
    assert resumed.value.what == straight.value.what  # "failed on k of n calls"
