"""GGUF -> MLX conversion, checked against GGUF files written here the way llama.cpp writes them.

A tiny random Llama (tests/tiny.py, hidden 128 so that 32-element quantisation blocks fit) is
exported with `gguf.GGUFWriter`: llama.cpp's Q/K row permutation, its tensor names, its
hyper-parameter and tokenizer metadata (vocab padded with [PAD{i}] tokens as convert_hf_to_gguf.py
does). Measured on the 2-core CPU: F32 round trip max |Δlogit| = 0.0; quantised weights dequantise
bit-exactly to `gguf.quants.dequantize`; kept-quantised vs dequantised-reference logits differ by
<= 3e-6 (matmul summation order only; |logit| ~3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import CHATML, make_model

from mlxpt import _blas

_blas.activate()

import gguf  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mlxpt.errors import ModelError  # noqa: E402
from mlxpt.models.gguf import convert_gguf  # noqa: E402
from mlxpt.models.loader import load, load_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
LOGIT_TOL = 1e-5  # F32 GGUF vs the HF folder (measured 0.0)
QUANT_LOGIT_TOL = 1e-4  # kept-quantised vs float model with the dequantised GGUF weights (measured <= 3e-6)
IDS = [[1, 60, 72, 101, 108, 108, 111, 2, 100, 200, 263, 5]]
TEXTS = [
    "Hello there, the cat sat on the mat.",
    "<|im_start|>user\nWhat is 1234 + 56?<|im_end|>\n<|im_start|>assistant\n",
    "naïve café – 東京 😀 <|endoftext|>",
    "  two  spaces\n\ttab\n\n",
]
MERGES = [("h", "e"), ("t", "he"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]

_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_NAMES = {v: k for k, v in _GGUF_NAMES.items()}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in fixed:
        return fixed[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_NAMES[module]}.{suffix}"


def hf_name(name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if name in fixed:
        return fixed[name]
    if name == "output.weight":
        return "lm_head.weight"
    _, i, part, suffix = name.split(".", 3)
    return f"model.layers.{i}.{_HF_NAMES[part]}.{suffix}"


def add_merges(folder: Path) -> None:
    """Give the tiny byte-level tokenizer a few BPE merges (new ids after the 259 existing ones)."""
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text())
    vocab = tj["model"]["vocab"]
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tj["model"]["merges"] = [list(m) for m in MERGES]
    path.write_text(json.dumps(tj))


def write_gguf(
    folder: Path,
    out: Path,
    qtype=Q.F32,
    embed_qtype=None,
    arch: str = "llama",
    pre: str = "gpt2",
    tok_model: str = "gpt2",
) -> Path:
    """Export an HF Llama folder as llama.cpp would: 2-D weights in `qtype`, norms in F32."""
    cfg = json.loads((folder / "config.json").read_text())
    tj = json.loads((folder / "tokenizer.json").read_text())
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny test llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(D)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(D // H)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(int(qtype))

    vocab = tj["model"]["vocab"]
    for a in tj["added_tokens"]:
        vocab[a["content"]] = a["id"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    specials = {a["content"] for a in tj["added_tokens"] if a["special"]}
    types = [int(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL) for t in tokens]
    for i in range(len(tokens), cfg["vocab_size"]):  # convert_hf_to_gguf.py pads the vocab like this
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    if merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    for name, t in load_file(str(folder / "model.safetensors")).items():
        if ".q_proj." in name:
            t = permute(t, H)
        elif ".k_proj." in name:
            t = permute(t, KV)
        q = embed_qtype if (embed_qtype is not None and name == "model.embed_tokens.weight") else qtype
        if t.ndim == 2 and q != Q.F32:
            w.add_tensor(gguf_name(name), quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def dequantised_reference(gguf_path: Path, src: Path, out: Path) -> tuple[Path, dict]:
    """An HF float32 folder holding exactly the GGUF's dequantised values (NumPy, un-permuted)."""
    cfg = json.loads((src / "config.json").read_text())
    tensors = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        a = dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        a = a.reshape([int(n) for n in reversed(t.shape.tolist())])
        if ".attn_q." in t.name:
            a = unpermute(a, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            a = unpermute(a, cfg["num_key_value_heads"])
        tensors[hf_name(t.name)] = np.ascontiguousarray(a)
    shutil.copytree(src, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "mlx"})
    return out, tensors


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The original HF folder: random tiny Llama, hidden 128, a BPE tokenizer with merges."""
    folder = make_model(tmp_path_factory.mktemp("gguf") / "src", hidden_size=128, intermediate_size=256)
    add_merges(folder)
    return folder


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXPT_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_round_trip_is_exact(src, tmp_path, tied):
    if not tied:
        src = make_model(tmp_path / "untied", seed=3, hidden_size=128, intermediate_size=256, tie_word_embeddings=False)
    path = write_gguf(src, tmp_path / "tiny-f32.gguf")
    out = convert_gguf(path, tmp_path / "conv")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["tie_word_embeddings"] is tied
    assert cfg["vocab_size"] == 272 and cfg["head_dim"] == 32 and cfg["num_key_value_heads"] == 2
    want, _ = mlx_lm.load(str(src))
    got, _ = mlx_lm.load(str(out))
    diff = np.abs(logits(got) - logits(want)).max()
    assert diff <= LOGIT_TOL, diff
    # without the un-permutation the model would be different: prove the check can fail
    w = dict(tree_flatten(got.parameters()))["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(np.array(w), permute(np.array(w), 4))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "qtype,embed_qtype,bits",
    [(Q.Q4_1, None, 4), (Q.Q8_0, None, 8), (Q.Q4_0, None, 4), (Q.Q4_1, Q.Q8_0, 4)],
    ids=["Q4_1", "Q8_0", "Q4_0", "Q4_1+Q8_0-embed"],
)
def test_quantised_gguf_is_kept_without_float_round_trip(src, tmp_path, qtype, embed_qtype, bits):
    path = write_gguf(src, tmp_path / "tiny-q.gguf", qtype, embed_qtype)
    out = convert_gguf(path, tmp_path / "conv")
    cfg = json.loads((out / "config.json").read_text())
    want_q = {"group_size": 32, "bits": bits, "mode": "affine"}
    if embed_qtype is not None:  # mixed types (as in SmolLM2's Q4_1 file): the odd one is listed per layer
        want_q["model.embed_tokens"] = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert cfg["quantization"] == want_q
    ref_dir, ref = dequantised_reference(path, src, tmp_path / "ref")

    model, _ = mlx_lm.load(str(out))
    params = dict(tree_flatten(model.parameters()))
    layers = dict(model.named_modules())
    n_quant = 0
    for name, want in ref.items():
        mod = name.rsplit(".", 1)[0]
        if want.ndim == 2:
            layer = layers[mod]
            assert isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)), name
            assert params[mod + ".scales"].dtype == mx.float32  # activations stay float32
            deq = mx.dequantize(
                params[name], params[mod + ".scales"], params[mod + ".biases"], layer.group_size, layer.bits
            )
            np.testing.assert_array_equal(np.array(deq), want, err_msg=name)  # bit-exact
            n_quant += 1
        else:
            np.testing.assert_array_equal(np.array(params[name]), want, err_msg=name)
    assert n_quant == 1 + 2 * 7

    ref_model, _ = mlx_lm.load(str(ref_dir))
    want_logits = logits(ref_model)
    diff = np.abs(logits(model) - want_logits).max()
    assert diff <= QUANT_LOGIT_TOL, diff

    # through mlxpt's loader: a .gguf path is converted into MLXPT_HOME once, then reused
    kept, _ = load(str(path), quantize=str(bits))  # same bits as stored: the GGUF blocks are kept
    assert [(m.bits, m.group_size) for m in (kept.model.embed_tokens, kept.model.layers[1].mlp.down_proj)] == [
        (8 if embed_qtype else bits, 32),
        (bits, 32),
    ]
    assert np.array_equal(logits(kept), logits(model))
    as_float, _ = load(str(path), quantize="auto")  # CPU: dequantised to float32
    assert type(as_float.model.layers[0].mlp.up_proj) is nn.Linear
    assert as_float.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    assert np.abs(logits(as_float) - want_logits).max() <= LOGIT_TOL
    converted = list((tmp_path / "home" / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()


def test_tokenizer_round_trip_and_chat_template(src, tmp_path):
    out = convert_gguf(write_gguf(src, tmp_path / "tiny.gguf"), tmp_path / "conv")
    orig, conv = load_tokenizer(str(src)), load_tokenizer(str(out))
    for text in TEXTS:
        ids = orig.encode(text)
        assert conv.encode(text) == ids, text
        assert conv.decode(ids) == orig.decode(ids) == text
    assert orig.encode("the cat") == [260, 266]  # the merges are used ("the", "Ġcat")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert conv.encode(special) == orig.encode(special) == [orig.convert_tokens_to_ids(special)]
    assert conv.eos_token == "<|im_end|>" and conv.eos_token_id == 2
    assert conv.bos_token == "<|im_start|>" and conv.pad_token == "<|endoftext|>"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHATML
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    for gen in (True, False):
        a = orig.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        b = conv.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert a == b and "<|im_start|>system\n" in a
        assert conv.apply_chat_template(msgs, add_generation_prompt=gen) == orig.apply_chat_template(
            msgs, add_generation_prompt=gen
        )


def test_smollm_pre_tokenizer_splits_digits(src, tmp_path):
    out = convert_gguf(write_gguf(src, tmp_path / "tiny.gguf", pre="smollm"), tmp_path / "conv")
    tok = json.loads((out / "tokenizer.json").read_text())
    kinds = [p["type"] for p in tok["pre_tokenizer"]["pretokenizers"]]
    assert kinds == ["Digits", "ByteLevel"]
    conv = load_tokenizer(str(out))
    assert conv.decode(conv.encode("abc 2024!")) == "abc 2024!"


# Merges that only some pre-tokenizers let BPE reach, and a token ("hi") that no merge builds.
PRE_MERGES = [("(", "h"), ("1", "2"), ("12", "3"), ("'", "t")]
# What llama.cpp's split (llama-vocab.cpp) + BPE give with these merges, worked out by hand:
# Llama 3 attaches one punctuation mark to a word, groups digits by three and takes a word that
# is a token whole (ignore_merges); Qwen2 splits single digits; llama.cpp's `default` isolates
# punctuation first and then cuts numbers into threes.
PRE_CASES = {
    "gpt2": {"(hi": ["(", "h", "i"], "hi": ["h", "i"], "4123": ["4", "123"], "don't": ["d", "o", "n", "'t"]},
    "llama-bpe": {"(hi": ["(h", "i"], "hi": ["hi"], "4123": ["4", "12", "3"], "don't": ["d", "o", "n", "'t"]},
    "qwen2": {"(hi": ["(h", "i"], "hi": ["h", "i"], "4123": ["4", "1", "2", "3"], "don't": ["d", "o", "n", "'t"]},
    "default": {"(hi": ["(", "h", "i"], "hi": ["h", "i"], "4123": ["4", "12", "3"], "don't": ["d", "o", "n", "'", "t"]},
    "smollm": {"(hi": ["(", "h", "i"], "hi": ["h", "i"], "4123": ["4", "1", "2", "3"], "don't": ["d", "o", "n", "'t"]},
}
# llama.cpp's own regexes for those names (its adapted Llama 3 / Qwen2 forms), to split with `regex`
_GPT2_CPP = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS_CPP = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA_CPP_REGEXES = {
    "gpt2": [_GPT2_CPP],
    "smollm": [r"\p{N}", _GPT2_CPP],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_CPP, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama-bpe": [
        _CONTRACTIONS_CPP + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "qwen2": [
        _CONTRACTIONS_CPP + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
}


@pytest.fixture(scope="module")
def pre_src(src, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pre") / "src"
    shutil.copytree(src, folder)
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text())
    vocab = tj["model"]["vocab"]
    for a, b in PRE_MERGES:
        vocab[a + b] = len(vocab)
        tj["model"]["merges"].append([a, b])
    vocab["hi"] = len(vocab)
    assert len(vocab) <= json.loads((folder / "config.json").read_text())["vocab_size"]
    path.write_text(json.dumps(tj))
    return folder


def _llama_cpp_split(text: str, regexes: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every piece into its matches and the text between."""
    import regex

    pieces = [text]
    for expr in regexes:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(expr, piece):
                out += [piece[at : m.start()]] if m.start() > at else []
                out += [m.group()] if m.group() else []
                at = m.end()
            out += [piece[at:]] if at < len(piece) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", list(PRE_CASES))
def test_pre_tokenizer_follows_the_gguf_name(pre_src, tmp_path, pre):
    out = convert_gguf(write_gguf(pre_src, tmp_path / "tiny.gguf", pre=pre), tmp_path / "conv")
    tok = load_tokenizer(str(out))
    for text, want in PRE_CASES[pre].items():
        assert tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False)) == want, text
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = tok.backend_tokenizer.pre_tokenizer
    for text in [*TEXTS, "(hi) DON'T we'll 3.14159 $100+200=300 ^_^ a|b ~x `c`", "x\r\n\r\n  y\t\t z ١٢٣٤ ½"]:
        want = [p for w in _llama_cpp_split(text, LLAMA_CPP_REGEXES[pre]) for p, _ in byte_level.pre_tokenize_str(w)]
        assert [p for p, _ in split.pre_tokenize_str(text)] == want, text
        assert tok.decode(tok.encode(text)) == text


def test_unknown_pre_tokenizer_is_refused(src, tmp_path):
    # another pre-tokenizer's regex would give other tokens than llama.cpp without a word
    path = write_gguf(src, tmp_path / "tekken.gguf", pre="tekken")
    for convert in (lambda: convert_gguf(path, tmp_path / "conv"), lambda: load_tokenizer(str(path))):
        with pytest.raises(ModelError) as e:
            convert()
        _assert_one_line(e.value, "E204")
        assert "'tekken'" in str(e.value)
    assert not (tmp_path / "conv").exists() and not list(tmp_path.glob("home/models/*"))


def _assert_one_line(err: ModelError, code: str) -> None:
    assert err.code == code and err.exit_code == 1
    assert "\n" not in str(err) and str(err).startswith(code + ": ")


def test_non_llama_architecture_is_refused(src, tmp_path):
    path = write_gguf(src, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ModelError) as e:
        convert_gguf(path, tmp_path / "conv")
    _assert_one_line(e.value, "E206")
    assert "qwen2" in str(e.value)
    with pytest.raises(ModelError) as e:  # same through the loader
        load(str(path))
    _assert_one_line(e.value, "E206")
    assert not (tmp_path / "conv").exists()


@pytest.mark.parametrize("content", [b"hello, not a gguf\n", b"GGUF\x03\x00\x00\x00garbage", b"", "truncated"])
def test_garbage_or_truncated_file_is_refused(src, tmp_path, content):
    if content == "truncated":
        content = write_gguf(src, tmp_path / "full.gguf", Q.Q4_1).read_bytes()[:30000]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError) as e:
        convert_gguf(path, tmp_path / "conv")
    _assert_one_line(e.value, "E205")
    with pytest.raises(ModelError) as e:
        load(str(path))
    _assert_one_line(e.value, "E205")
    assert not (tmp_path / "conv").exists()
    assert not list(tmp_path.glob("home/models/*"))


def test_unsupported_tokenizer_or_missing_metadata_leaves_nothing(src, tmp_path):
    # a SentencePiece ("llama") vocabulary is not rebuilt: refused, and no half-written folder remains
    path = write_gguf(src, tmp_path / "spm.gguf", tok_model="llama")
    with pytest.raises(ModelError) as e:
        convert_gguf(path, tmp_path / "conv")
    _assert_one_line(e.value, "E204")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm.gguf"]

    w = gguf.GGUFWriter(str(tmp_path / "nohp.gguf"), "llama")  # no hyper-parameters at all
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError) as e:
        convert_gguf(tmp_path / "nohp.gguf", tmp_path / "conv")
    _assert_one_line(e.value, "E217")
