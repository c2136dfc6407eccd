"""Convert a Llama-family GGUF file into an MLX / Hugging Face folder, exactly.

Q4_0/Q4_1/Q8_0 tensors come out of `mx.load` already in MLX's affine layout (packed uint32
weights, per-group scales and biases: value = scale * q + bias), so they are written as an
MLX-quantised model without a float round trip. llama.cpp permutes the rows of the Q and K
projections for its RoPE kernel; the permutation is undone here, on the packed rows. Scales and
biases are stored as float32 (lossless from float16) so activations run in float32. The BPE
tokenizer (vocab, merges, special tokens, pre-tokenizer) and the chat template are rebuilt from
the GGUF metadata into `tokenizer.json` / `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from mlxpt.errors import ModelError

_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_OF = {v: k for k, v in _NAMES.items()}
_GGUF_BLOCK = 32  # the block (group) size of every type mx.load keeps quantised
# Bumped when the converted folder changes, so that caches made by an older converter are redone.
FORMAT_VERSION = 3  # 3: the pre-tokenizer follows tokenizer.ggml.pre (Llama 3, Qwen2, default)
# The regexes llama.cpp splits text with before BPE, by `tokenizer.ggml.pre` name (llama-vocab.cpp;
# Llama 3 and Qwen2 as in their tokenizer.json, which llama.cpp's comments quote). Each regex in
# a list splits every piece further, keeping both the matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]  # also a file without the key
# name -> (regexes, ignore_merges: a word that is itself a token skips the merges, as llama.cpp does)
_PRE = {
    "default": (_DEFAULT, False),
    "gpt2": ([_GPT2], False),  # what mlxpt's GGUF export writes (llama.cpp calls it gpt-2)
    "gpt-2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),
    "llama3": ([_LLAMA3], True),
    "llama-v3": ([_LLAMA3], True),
    "llama-bpe": ([_LLAMA3], True),
    "qwen2": ([_QWEN2], False),
}


def _scalar(meta, key, default=None):
    if key not in meta:
        return default
    v = meta[key]
    try:
        return v.item()
    except AttributeError:
        return v


def _hf_name(name: str) -> str:
    if name.startswith("token_embd."):
        return "model.embed_tokens." + name.split(".", 1)[1]
    if name.startswith("output_norm."):
        return "model.norm." + name.split(".", 1)[1]
    if name.startswith("output."):
        return "lm_head." + name.split(".", 1)[1]
    if name.startswith("blk."):
        _, i, part, suffix = name.split(".", 3)
        if part in _NAMES:
            return f"model.layers.{i}.{_NAMES[part]}.{suffix}"
    raise ModelError("E203", f"unknown GGUF tensor {name!r}", hint="only Llama-family GGUF files are supported")


def gguf_name(hf: str) -> str:
    """The llama.cpp tensor name of a Hugging Face Llama weight (the inverse of `_hf_name`)."""
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, suffix = hf.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{suffix}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _GGUF_OF:
        return f"blk.{parts[2]}.{_GGUF_OF[parts[3]]}.{suffix}"
    raise ModelError("E645", f"tensor {hf!r} has no GGUF name", hint="only plain Llama-family models are exported")


def permute(w, n_head: int):
    """llama.cpp's `permute` on axis 0 (convert_hf_to_gguf.py): each head's two RoPE halves are
    interleaved in pairs. `_unpermute` is its inverse."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_head: int):
    """Inverse of llama.cpp's `permute` on axis 0 (works on packed quantised rows too).

    llama.cpp stores each head's rows interleaved (pairs); HF keeps the two halves apart."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer(regexes: list[str]):
    """llama.cpp's split by `regexes`, then GPT-2's byte-to-character mapping. The GPT-2 and SmolLM
    splits are written as their own tokenizer.json layouts (ByteLevel's built-in GPT-2 regex)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if regexes == [_GPT2]:
        return byte_level
    if regexes == [r"\p{N}", _GPT2]:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _tokenizer_files(meta, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models

    model = _scalar(meta, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelError(
            "E204",
            f"GGUF tokenizer model {model!r} is not supported",
            hint="use a BPE (gpt2-style) model or an HF folder",
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]  # absent when empty
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")
    if pre not in _PRE:  # another regex would give other tokens than llama.cpp, silently
        raise ModelError("E204", f"GGUF pre-tokenizer {pre!r} is not supported", hint=f"supported: {', '.join(_PRE)}")
    regexes, ignore_merges = _PRE[pre]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocab
        raise ModelError(
            "E204", f"cannot rebuild the GGUF tokenizer: {e}", hint="the file's vocabulary is inconsistent"
        ) from None
    tok.pre_tokenizer = _pre_tokenizer(regexes)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (3, 4)]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))

    def name(key):
        i = _scalar(meta, key)
        return tokens[int(i)] if i is not None else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
    }
    template = _scalar(meta, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out_dir`.

    The folder appears atomically (built under a temporary name, then renamed)."""
    from mlxpt import _blas

    _blas.activate()
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        weights, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:  # mlx raises ValueError/RuntimeError with its own text
        raise ModelError(
            "E205", f"cannot read GGUF file: {e}", str(gguf_path), "check the file is a complete GGUF"
        ) from None
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ModelError(
            "E206",
            f"GGUF architecture {arch!r} is not supported",
            str(gguf_path),
            "convert it with mlx_lm.convert from the HF folder",
        )
    a = f"{arch}."
    missing = [
        k
        for k in ("attention.head_count", "embedding_length", "feed_forward_length", "block_count")
        if a + k not in meta
    ]
    if missing or "token_embd.weight" not in weights:
        what = a + missing[0] if missing else "tensor token_embd.weight"
        raise ModelError("E217", f"incomplete GGUF: no {what}", str(gguf_path), "re-export the file with llama.cpp")
    n_head = int(_scalar(meta, a + "attention.head_count"))
    n_kv = int(_scalar(meta, a + "attention.head_count_kv", n_head))
    hidden = int(_scalar(meta, a + "embedding_length"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, a + "feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, a + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_scalar(meta, a + "rope.dimension_count", hidden // n_head)),
        "rms_norm_eps": float(f"{_scalar(meta, a + 'attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "rope_theta": float(_scalar(meta, a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, a + "context_length", 2048)),
        "vocab_size": int(weights["token_embd.weight"].shape[0]),  # may exceed the token list
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "mlxpt_source": {"gguf": gguf_path.name, "name": _scalar(meta, "general.name")},
    }
    out = {}
    quantized = set()
    for name, w in weights.items():
        hf = _hf_name(name)
        if ".attn_q." in name:
            w = _unpermute(w, n_head)
        elif ".attn_k." in name:
            w = _unpermute(w, n_kv)
        if hf.endswith((".scales", ".biases")):
            w = w.astype(mx.float32)
            quantized.add(hf.rsplit(".", 1)[0])
        out[hf] = w
    if quantized:
        # Q4_0/Q4_1/Q8_0 all use blocks of 32; bits = packed uint32 columns * 32 / (groups * 32).
        # Files mix types (SmolLM2's Q4_1 file has a Q8_0 token_embd): the most common type is the
        # default and the others are listed per layer, as mlx-lm writes mixed quantisation.
        per_layer = {
            p: (_GGUF_BLOCK, out[p + ".weight"].shape[-1] // out[p + ".scales"].shape[-1]) for p in sorted(quantized)
        }
        group_size, bits = Counter(per_layer.values()).most_common(1)[0][0]
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        for p, (g, b) in per_layer.items():
            if (g, b) != (group_size, bits):
                config["quantization"][p] = {"group_size": g, "bits": b, "mode": "affine"}
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _tokenizer_files(meta, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
