"""Write a Llama-family model folder as a GGUF file that llama.cpp loads (f16 or q8_0), and an
Ollama Modelfile for it.

The tensors get llama.cpp's names and its RoPE row permutation of the Q and K projections (the
inverse of what `mlxpt.models.gguf` undoes on reading); norms stay float32. q8_0 is llama.cpp's
block format (32 weights: one float16 scale and 32 int8), made by `gguf.quants`; a matrix whose
rows are not a multiple of 32 is kept in f16, as llama.cpp's converter does. The GPT-2 BPE
tokenizer (tokens, merges, token types, special ids, pre-tokenizer name) and the chat template go
into the metadata. mlx-lm's own `gguf.py` writes a SentencePiece vocabulary and cannot write
BPE merges or quantised blocks, so only its naming and permutation ideas are kept.

The Modelfile carries FROM, the ChatML template in Ollama's Go-template syntax, the default system
prompt the Jinja template injects, and the stop tokens. Only ChatML templates
(`<|im_start|>role\n...<|im_end|>`, SmolLM2's and Qwen's) are translated; any other is refused
rather than guessed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mlxpt.errors import ConfigError, ModelError

# pre-tokenizer layouts that llama.cpp names (the names `mlxpt.models.gguf` reads back)
_DIGITS = {"type": "Digits", "individual_digits": True}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "E642", "the gguf package is not installed", "--export gguf", "pip install 'gguf>=0.10'"
        ) from None
    return gguf


def check_exportable(config: dict, where: str) -> None:
    """Refuse, before any weight is read, a model that llama.cpp's `llama` architecture can't hold."""
    kind = config.get("model_type")
    if kind != "llama":
        raise ModelError("E645", f"only Llama-family models export to GGUF (this is {kind!r})", where, "drop --export")
    extra = [k for k in ("rope_scaling", "attention_bias", "mlp_bias") if config.get(k)]
    if extra:
        raise ModelError("E645", f"GGUF export does not support {extra[0]}", where, "drop --export")


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None if it has none."""
    if pre is None:
        return None
    byte_level = {"type": "ByteLevel", "use_regex": True}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (it refuses "gpt2" as an unknown pre-tokenizer)
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2:
        if all(parts[0].get(k) == v for k, v in _DIGITS.items()) and all(
            parts[1].get(k, True) == v for k, v in byte_level.items()
        ):
            return "smollm"
    return None


def chat_template_of(folder: Path) -> str | None:
    """The chat template saved with a tokenizer (tokenizer_config.json or chat_template.jinja)."""
    cfg = _read_json(folder / "tokenizer_config.json", {})
    template = cfg.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) and template else None


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise ModelError("E646", f"cannot read {path.name}: {e}", str(path), "fix the tokenizer files") from None


def tokenizer_metadata(folder: Path, vocab_size: int) -> dict:
    """The GGUF tokenizer fields of a byte-level BPE tokenizer folder."""
    gguf = require_gguf()
    tj = _read_json(folder / "tokenizer.json", None)
    where = str(folder / "tokenizer.json")
    if not isinstance(tj, dict) or (tj.get("model") or {}).get("type") != "BPE":
        raise ModelError("E646", "GGUF export needs a byte-level BPE tokenizer.json", where, "drop --export")
    pre = _pre_name(tj.get("pre_tokenizer"))
    if pre is None:
        raise ModelError(
            "E646", "the tokenizer's pre-tokenizer has no llama.cpp name (only GPT-2 and SmolLM layouts)", where,
            "drop --export",
        )  # fmt: skip
    vocab = dict(tj["model"]["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    vocab.update({c: a["id"] for c, a in added.items()})
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or len(tokens) > vocab_size:
        raise ModelError(
            "E646", f"token ids are not 0..{len(tokens) - 1} within the {vocab_size} embeddings", where,
            "drop --export",
        )  # fmt: skip
    T = gguf.TokenType
    types = [
        int(T.NORMAL if t not in added else T.CONTROL if added[t].get("special") else T.USER_DEFINED) for t in tokens
    ]
    for i in range(len(tokens), vocab_size):  # convert_hf_to_gguf.py pads the vocabulary like this
        tokens.append(f"[PAD{i}]")
        types.append(int(T.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    cfg = _read_json(folder / "tokenizer_config.json", {})
    ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        name = _token_name(cfg.get(f"{key}_token"))
        if name is not None and name in vocab:
            ids[key] = vocab[name]
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": ids,
        "add_bos": bool(cfg.get("add_bos_token", False)),
        "chat_template": chat_template_of(folder),
    }


def _float_weights(folder: Path, config: dict) -> dict:
    """The folder's weights as float32 NumPy arrays (MLX-quantised layers dequantised)."""
    import mlx.core as mx
    import numpy as np

    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    quant = config.get("quantization") or {}
    for key in [k for k in weights if k.endswith(".scales")]:
        p = key[: -len(".scales")]
        q = quant.get(p, quant) if isinstance(quant.get(p), dict) else quant
        w = mx.dequantize(
            weights[p + ".weight"], weights.pop(key), weights.pop(p + ".biases", None),
            q.get("group_size", 64), q.get("bits", 4), mode=q.get("mode", "affine"),
        )  # fmt: skip
        weights[p + ".weight"] = w
    return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}


def write_gguf(
    folder: str | os.PathLike, path: str | os.PathLike, gguf_type: str = "f16", name: str | None = None
) -> Path:
    """Write the Llama folder `folder` (float or MLX-quantised weights) as a GGUF file at `path`;
    general.name is the model's own name, else `name`, else the folder's."""
    import numpy as np

    from mlxpt.models.gguf import gguf_name, permute

    gguf = require_gguf()
    folder, path = Path(folder), Path(path)
    config = _read_json(folder / "config.json", {})
    check_exportable(config, str(folder))
    weights = _float_weights(folder, config)
    n_vocab = int(weights["model.embed_tokens.weight"].shape[0])
    tok = tokenizer_metadata(folder, n_vocab)
    H = int(config["num_attention_heads"])
    KV = int(config.get("num_key_value_heads") or H)
    D = int(config["hidden_size"])
    qtype = gguf.GGMLQuantizationType.Q8_0 if gguf_type == "q8_0" else gguf.GGMLQuantizationType.F16
    ftype = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16

    w = gguf.GGUFWriter(str(path), "llama")
    source = config.get("mlxpt_source") or {}
    w.add_name(str(source.get("name") or name or folder.name))
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(D)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(int(config.get("head_dim") or D // H))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    adders["pad"] = w.add_pad_token_id
    for key, i in tok["ids"].items():
        adders[key](i)
    w.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    for name, t in weights.items():
        if name.endswith("self_attn.q_proj.weight"):
            t = permute(t, H)
        elif name.endswith("self_attn.k_proj.weight"):
            t = permute(t, KV)
        gname = gguf_name(name)
        if t.ndim < 2:
            w.add_tensor(gname, np.ascontiguousarray(t, np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb+") as f:  # the folder is renamed into place next: its files must be on disk
        os.fsync(f.fileno())
    return path


# max |Δlogit| / max(1, max |logit|) of the GGUF read back vs the fused model. Measured on the tiny
# test model: f16 7.6e-4, q8_0 2.3e-2; on SmolLM2-135M see docs/export.md. A wrong Q/K permutation
# or a shifted vocabulary is off by the order of the logits themselves.
GGUF_TOL = {"f16": 5e-3, "q8_0": 0.1}
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Say 12345 in words: naïve café 😀"]


# --- Ollama ---------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.S)


def check_chatml(template: str | None, where: str) -> None:
    """Refuse a template this module cannot translate, before any work."""
    if not template or "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise ConfigError(
            "E682", "--ollama translates only ChatML chat templates (<|im_start|> ... <|im_end|>)", where,
            "drop --ollama and write the Modelfile TEMPLATE yourself",
        )  # fmt: skip


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ConfigError("E682", 'the system prompt contains """', "--ollama", "write the Modelfile yourself")
    return f'"""{text}"""'


def modelfile(gguf_name: str, template: str, stops: list[str]) -> str:
    """The Modelfile text for the GGUF file `gguf_name` (a path relative to the Modelfile)."""
    check_chatml(template, "--ollama")
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(CHATML_TEMPLATE)}"]
    m = _DEFAULT_SYSTEM.search(template)
    if m and "{{" not in m.group(1):  # the template's own default system prompt, as Ollama's SYSTEM
        lines.append(f"SYSTEM {_quoted(m.group(1).replace(chr(92) + 'n', chr(10)))}")
    for stop in dict.fromkeys(["<|im_start|>", "<|im_end|>", *stops]):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
