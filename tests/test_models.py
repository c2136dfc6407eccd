"""mlxpt.models.loader: parity with mlx-lm, quantisation modes, and the security contract.

Tolerances (measured on the 2-core CPU, tiny Llama hidden 128, |logit| <= ~3.6):
- quantize="none" vs mlx_lm.load: bit-identical logits (0.0); 20 greedy tokens identical.
- quantize="8" (group 64): max |Δlogit| vs float 0.064-0.072 -> asserted <= 0.15;
  quantize="4" (group 64): relative RMS error 0.32-0.40 (random Gaussian weights lose ~9% per
  weight at 4 bits) -> asserted <= 0.6; both are also asserted bit-identical to
  `nn.quantize(mlx_lm model, 64, bits)`, the exact reference.
- quantize="auto" on CPU, quantised folder: float32 dequantised model vs the quantised model
  <= 1e-5 (only the matmul summation order differs).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import make_model

from mlxpt import _blas

_blas.activate()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxpt.errors import EXIT_SECURITY, ModelError, SecurityError  # noqa: E402
from mlxpt.models import loader  # noqa: E402
from mlxpt.models.loader import check_folder, load, load_tokenizer  # noqa: E402

IDS = [1, 60, 72, 101, 108, 108, 111, 2, 100, 200, 250, 5]
EXACT_TOL = 1e-6
Q8_MAX_ABS = 0.15
Q4_REL_RMS = 0.6
DEQUANT_TOL = 1e-5


def logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def greedy(model, prompt, n=20) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    return ids[len(prompt) :]


def quantized_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def make_quantised(src: Path, dst: Path, bits: int) -> Path:
    """An MLX-quantised copy of `src` (as mlx_lm.convert -q writes it)."""
    model, _ = mlx_lm.load(str(src))
    nn.quantize(model, group_size=64, bits=bits)
    shutil.copytree(src, dst)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())), {"format": "mlx"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": bits}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=128, intermediate_size=256)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _one_line(err, code: str, exit_code: int = 1) -> str:
    s = str(err)
    assert err.code == code and err.exit_code == exit_code, s
    assert "\n" not in s and s.startswith(f"{code}: ") and " - " in s  # code, what, hint
    return s


# ---------------------------------------------------------------- parity with mlx-lm


def test_float_load_matches_mlx_lm(tiny):
    ours, tok = load(str(tiny), quantize="none")
    ref, ref_tok = mlx_lm.load(str(tiny))
    assert not quantized_layers(ours)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(ours.parameters()))
    a, b = logits(ours), logits(ref)
    assert np.abs(a - b).max() <= EXACT_TOL  # measured: bit-identical
    assert greedy(ours, IDS) == greedy(ref, IDS)
    text = "<|im_start|>user\nhi 123<|im_end|>"
    assert tok.encode(text) == ref_tok.encode(text)
    assert tok.eos_token_id == ref_tok.eos_token_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    auto, _ = load(str(tiny))  # a float folder stays float under "auto"
    assert not quantized_layers(auto) and np.array_equal(logits(auto), a)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_float_model(tiny, bits):
    model, _ = load(str(tiny), quantize=str(bits))
    layers = quantized_layers(model)
    assert len(layers) == 1 + 2 * 7  # embedding (tied head) + 7 projections per layer
    assert all(m.bits == bits and m.group_size == 64 for m in layers)
    got = logits(model)
    ref, _ = mlx_lm.load(str(tiny))
    want = logits(ref)
    nn.quantize(ref, group_size=64, bits=bits)
    assert np.array_equal(got, logits(ref))  # exactly mlx's own quantisation
    if bits == 8:
        assert np.abs(got - want).max() <= Q8_MAX_ABS
    else:
        assert np.sqrt(((got - want) ** 2).mean() / (want**2).mean()) <= Q4_REL_RMS


def test_auto_on_cpu_dequantises_a_quantised_folder(tiny, tmp_path, monkeypatch):
    q4 = make_quantised(tiny, tmp_path / "q4", 4)
    ref, _ = mlx_lm.load(str(q4))
    assert quantized_layers(ref)
    want = logits(ref)
    assert loader.is_cpu()
    model, _ = load(str(q4))  # auto
    assert not quantized_layers(model)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert np.abs(logits(model) - want).max() <= DEQUANT_TOL
    kept, _ = load(str(q4), quantize="4")  # same bits as stored: kept as is
    assert len(quantized_layers(kept)) == 15 and np.array_equal(logits(kept), want)
    eight, _ = load(str(q4), quantize="8")  # other bits: dequantised, then re-quantised
    assert {m.bits for m in quantized_layers(eight)} == {8}
    assert np.abs(logits(eight) - want).max() <= Q8_MAX_ABS
    none, _ = load(str(q4), quantize="none")
    assert not quantized_layers(none) and np.array_equal(logits(none), logits(model))
    monkeypatch.setattr(loader, "is_cpu", lambda: False)  # on Metal, auto keeps the stored weights
    metal, _ = load(str(q4))
    assert len(quantized_layers(metal)) == 15 and np.array_equal(logits(metal), want)


# ---------------------------------------------------------------- security


def _sentinel_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').write('code ran')\n"


def _evil_pickle(sentinel: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (exec, (_sentinel_code(sentinel),))

    return pickle.dumps(Payload())


def test_payloads_are_real(tmp_path):
    """The payloads below do run code when loaded the unsafe way (so their absence means something)."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    pickle.loads(_evil_pickle(s1))  # noqa: S301 - deliberately, on our own payload
    assert s1.read_text() == "code ran"
    mod = tmp_path / "modeling_evil.py"
    mod.write_text(_sentinel_code(s2))
    subprocess.run([sys.executable, str(mod)], check=True)
    assert s2.exists()


@pytest.mark.parametrize("keys", ["auto_map+model_file", "model_file", "auto_map"])
def test_remote_code_is_refused_and_never_run(tiny, tmp_path, keys):
    d = shutil.copytree(tiny, tmp_path / "evil")
    sentinel = tmp_path / "SENTINEL"
    (d / "modeling_evil.py").write_text(
        _sentinel_code(sentinel) + "from mlx_lm.models.llama import Model, ModelArgs  # noqa\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    if "auto_map" in keys:
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    if "model_file" in keys:
        cfg["model_file"] = "modeling_evil.py"
    (d / "config.json").write_text(json.dumps(cfg))
    for call in (lambda: load(str(d)), lambda: load_tokenizer(str(d)), lambda: check_folder(d)):
        with pytest.raises(SecurityError) as e:
            call()
        assert e.value.exit_code == EXIT_SECURITY == 5
        assert "--trust-remote-code" in _one_line(e.value, "E701", 5)
    assert not sentinel.exists()
    # explicitly allowed: the folder check passes (the code itself is not run by the check)
    assert check_folder(d, trust_remote_code=True)["model_type"] == "llama"
    assert not sentinel.exists()


def test_remote_tokenizer_code_is_refused(tiny, tmp_path):
    d = shutil.copytree(tiny, tmp_path / "evil-tok")
    sentinel = tmp_path / "SENTINEL"
    (d / "tokenization_evil.py").write_text(
        _sentinel_code(sentinel)
        + "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    tc["tokenizer_class"] = "EvilTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    for call in (lambda: load_tokenizer(str(d)), lambda: load(str(d))):
        with pytest.raises(SecurityError) as e:
            call()
        _one_line(e.value, "E701", 5)
    assert not sentinel.exists()
    assert check_folder(d, trust_remote_code=True)


def test_pickle_only_weights_are_refused_and_never_unpickled(tiny, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, d / f)
    sentinel = tmp_path / "SENTINEL"
    (d / "pytorch_model.bin").write_bytes(_evil_pickle(sentinel))
    for call in (lambda: load(str(d)), lambda: load_tokenizer(str(d)), lambda: load(str(d), trust_remote_code=True)):
        with pytest.raises(SecurityError) as e:
            call()
        assert "pytorch_model.bin" in _one_line(e.value, "E702", 5)
    assert not sentinel.exists()
    # beside safetensors weights a pickle is simply ignored (never read)
    shutil.copy(tiny / "model.safetensors", d / "model.safetensors")
    model, _ = load(str(d))
    assert logits(model).shape == (1, len(IDS), 272)
    assert not sentinel.exists()


def test_broken_folders_give_one_line_model_errors(tiny, tmp_path):
    cases = []
    cases.append((str(tmp_path / "does-not-exist"), "E212"))
    cases.append((str(tmp_path / "missing.gguf"), "E210"))
    (tmp_path / "file.txt").write_text("x")
    cases.append((str(tmp_path / "file.txt"), "E211"))
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "E213"))
    for name, text in (("badjson", "{not json"), ("notobject", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        cases.append((str(tmp_path / name), "E214"))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(tiny / "config.json", noweights)
    cases.append((str(noweights), "E215"))
    badgen = shutil.copytree(tiny, tmp_path / "badgen")  # mlx-lm's load_config would crash on it
    (badgen / "generation_config.json").write_text('[{"eos_token_id": 2}]')
    cases.append((str(badgen), "E214"))
    arch = shutil.copytree(tiny, tmp_path / "arch")
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))
    cases.append((str(arch), "E216"))
    for ref, code in cases:
        with pytest.raises(ModelError) as e:
            load(ref)
        _one_line(e.value, code)


def test_generation_config_stop_ids_stop_generation(tmp_path):
    # Phi-3 and Llama 3.1 list extra stop ids only in generation_config.json; mlx-lm stops on them
    from mlxpt.decode.generate import iter_generate

    folder = make_model(tmp_path / "m", tie_word_embeddings=False)
    model, tok = load(str(folder))
    prompt = list(tok.encode("What is 3+3?"))
    free = greedy(model, prompt, n=8)  # the unstopped greedy continuation
    k = next(i for i in range(2, 8) if free[i] not in free[:i])
    assert not set(free[:k]) & set(tok.eos_token_ids)  # nothing stops before position k
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, free[k]]}))

    model, tok = load(str(folder))
    assert tok.eos_token_ids == {2, free[k]} and load_tokenizer(str(folder)).eos_token_ids == {2, free[k]}
    chunks = list(iter_generate(model, tok, prompt, max_tokens=8))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].generation_tokens == k
    ref_model, ref_tok = mlx_lm.load(str(folder))
    want = mlx_lm.generate(ref_model, ref_tok, prompt, max_tokens=8)
    assert "".join(c.text for c in chunks) == want == tok.decode(free[:k])


def test_hub_id_offline_fails_fast_with_a_hint(tmp_path):
    code = (
        "from mlxpt.errors import ModelError\n"
        "from mlxpt.models.loader import load\n"
        "try:\n    load('some-owner/some-model')\n"
        "except ModelError as e:\n    print(e.code, e.exit_code, str(e))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "MLXPT_HOME": str(tmp_path / "home"),
    }
    t0 = time.monotonic()
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("E209 1 E209: cannot download 'some-owner/some-model'"), line
    assert "local folder" in line and "\n" not in line
    assert elapsed < 20, elapsed


def test_an_empty_mlxpt_home_means_the_default_not_the_working_folder(tmp_path, monkeypatch):
    """`MLXPT_HOME=` once put the 115 MB converted model and the BLAS shim under the working folder."""
    from mlxpt import _blas
    from mlxpt.models.loader import home

    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    monkeypatch.setenv("MLXPT_HOME", "")
    monkeypatch.chdir(tmp_path)
    assert home() == tmp_path / "me" / ".cache" / "mlxpt"
    assert _blas._cache_dir() == tmp_path / "me" / ".cache" / "mlxpt" / "blas"
