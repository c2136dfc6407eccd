"""`mlxpt fuse --export gguf / --ollama / --upload-repo`: the GGUF reads back (through mlxpt's own
GGUF loader) with the fused model's logits and tokenizer, the Modelfile and model card say what
the run was, and every bad input is one line, exit 1, with nothing written.

Tolerances are GGUF_TOL (max |Δlogit| / max(1, max |logit|)): f16 5e-3, q8_0 0.1. Measured on the
tiny model of tests/tiny.py: f16 7.6e-4, q8_0 2.3e-2; a missing Q/K permutation is ~1.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from test_decode import make_adapter_run
from test_gguf import TEXTS, add_merges, unpermute
from tiny import CHATML, make_model

import mlxpt.models.gguf as gguf_mod
from mlxpt.cli import main
from mlxpt.fuse import ExportConfig, logits_of, probe_tokens
from mlxpt.models.gguf import _hf_name, convert_gguf, gguf_name, permute
from mlxpt.models.gguf_write import GGUF_TOL, PROMPTS, modelfile, write_gguf
from mlxpt.models.loader import load, load_tokenizer

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("export") / "base")


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """A finished adapter run with a config, metrics and status, as `mlxpt train` leaves it."""
    run = make_adapter_run(tmp_path_factory.mktemp("export-run") / "run", base)
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(
        method="sft",
        adapter={"fine_tune_type": "lora", "rank": 4, "num_layers": -1},
        data={"data": "/somewhere/my-data"},
        train={"steps": 2, "learning_rate": 1e-4},
        data_report={"train": {"kept": 7}},
    )
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text(
        '{"event": "step", "step": 2, "loss": 1.25}\n{"event": "eval", "step": 2, "val_loss": 1.5}\n'
    )
    (run / "status.json").write_text('{"status": "finished", "step": 2, "best_val_loss": 1.5}')
    return run


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch, request):
    if request.node.get_closest_marker("slow") is None:  # the slow test reuses the converted default
        monkeypatch.setenv("MLXPT_HOME", str(tmp_path / "home"))


def _one_error(capsys, code: str) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("warning")]
    assert len(err) == 1 and code in err[0], err
    return err[0]


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_export_reads_back_like_the_fused_model(run, tmp_path, capsys, gguf_type):
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(out), "--export", "gguf", "--gguf-type", gguf_type]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith(f"gguf: {out / f'fused-{gguf_type}.gguf'}") and "read back max |Δlogit|" in line
    path = out / f"fused-{gguf_type}.gguf"

    # what llama.cpp reads: architecture, hyper-parameters, BPE tokenizer, chat template, tensor types
    r = gguf.GGUFReader(str(path))
    f = {k: r.fields[k].contents() for k in r.fields}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["general.name"] == "fused"  # the --out name, not the temporary folder's (once .tmp-fuse-...)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's names
    assert len(f["tokenizer.ggml.tokens"]) == 272 and f["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # the ChatML specials are CONTROL
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.chat_template"] == CHATML
    want_type = Q.Q8_0 if gguf_type == "q8_0" else Q.F16
    types = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in types  # tied embeddings stay tied
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == want_type
    assert types["blk.0.attn_norm.weight"] == Q.F32

    # read back by mlxpt's own loader (the .gguf path is converted once into MLXPT_HOME)
    fused, tok = load(str(out), quantize="none")
    back, back_tok = load(str(path), quantize="none")
    back.set_dtype(fused.model.embed_tokens.weight.dtype)
    for ids in [probe_tokens(tok)] + [tok.encode(p) for p in PROMPTS]:
        assert back_tok.encode(tok.decode(ids)) == ids
        want = logits_of(fused, ids)
        diff = np.abs(logits_of(back, ids) - want).max()
        assert diff <= GGUF_TOL[gguf_type] * max(1.0, np.abs(want).max()), diff
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_quantised_fused_model_is_dequantised_for_the_gguf(base, tmp_path):
    from mlxpt.fuse import fuse

    run = make_adapter_run(tmp_path / "run", base, quantize="4")
    r = fuse(run, tmp_path / "q", export=ExportConfig(export="gguf"))
    assert r.quantized and r.gguf.is_file() and r.gguf_diff <= r.gguf_tol
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(r.gguf)).tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16


def test_q8_0_is_half_the_size_and_looser():
    assert GGUF_TOL["f16"] < GGUF_TOL["q8_0"] <= 0.1


def test_sizes_and_blocks(base, tmp_path):
    f16 = write_gguf(base, tmp_path / "a.gguf", "f16").stat().st_size
    q8 = write_gguf(base, tmp_path / "b.gguf", "q8_0").stat().st_size
    assert q8 < 0.6 * f16  # 34 bytes per 32 weights vs 64
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}["blk.0.ffn_up.weight"]
    assert t.n_bytes == 128 * 64 // 32 * 34


def test_permutation_and_names_invert_the_reader():
    w = np.arange(8 * 64 * 3).reshape(8 * 64, 3)
    for heads in (1, 2, 4, 8):
        assert np.array_equal(unpermute(permute(w, heads), heads), w)
        assert not np.array_equal(permute(w, heads), w)
    for hf in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.7.mlp.up_proj.weight"):
        assert _hf_name(gguf_name(hf)) == hf
    assert gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"


def test_wrong_permutation_is_caught_and_nothing_is_written(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gguf_mod, "permute", lambda w, n: w)  # the bug the read-back exists for
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(out), "--export", "gguf"]) == 4
    _one_error(capsys, "E647")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_bpe_merges_and_smollm_pre_tokenizer_survive(tmp_path):
    src = make_model(tmp_path / "src", hidden_size=128, intermediate_size=256)
    add_merges(src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    (src / "tokenizer.json").write_text(json.dumps(tj))
    path = write_gguf(src, tmp_path / "m.gguf")
    f = gguf.GGUFReader(str(path)).fields
    assert f["tokenizer.ggml.pre"].contents() == "smollm" and f["tokenizer.ggml.merges"].contents()[0] == "h e"
    orig, back = load_tokenizer(str(src)), load_tokenizer(str(convert_gguf(path, tmp_path / "conv")))
    for text in TEXTS + ["year 2024"]:
        assert back.encode(text) == orig.encode(text), text
    assert orig.encode("the cat") == back.encode("the cat") == [260, 266]


def test_ollama_modelfile(run, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(out), "--export", "gguf", "--ollama"]) == 0
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./fused-f16.gguf" and (out / "fused-f16.gguf").is_file()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert "{{ .Content }}<|im_end|>" in text and text.count('"""') == 4
    assert 'SYSTEM """You are a helpful assistant."""' in lines
    assert lines[-2:] == ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    assert "Modelfile" in capsys.readouterr().out
    # a template written with escaped newlines gives the same system prompt
    escaped = CHATML.replace("system\n", "system\\n")
    assert modelfile("x.gguf", escaped, ["</s>"]).splitlines()[-1] == 'PARAMETER stop "</s>"'


def test_upload_dry_run_writes_the_card_and_pushes_nothing(run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("network"))
    out = tmp_path / "fused"
    argv = ["fuse", str(run), "--out", str(out), "--upload-repo", "me/tiny-sft", "--dry-run"]
    assert main(argv) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("hub: would upload ") and "me/tiny-sft" in said and ".mlxpt-output" not in said
    assert "README.md" in said and "model.safetensors" in said
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\nlicense: other\n")
    assert "# tiny-sft" in card and "- base model: base" in card and str(run.parent) not in card
    assert "method: sft; adapter: lora; steps: 2" in card and "my-data (7 training rows)" in card
    assert "final training loss: 1.25" in card and "best validation loss: 1.5" in card
    assert "fuse: reloaded fused model" in card


def test_upload_without_network_is_one_line_and_keeps_the_folder(run, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(out), "--upload-repo", "me/tiny-sft"]) == 3
    err = _one_error(capsys, "E681")
    assert "cannot upload to the Hub" in err and str(out) in err
    assert (out / "README.md").is_file()


def _bad_model(tmp_path, base, what):
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    if what == "qwen2":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    else:
        tc = json.loads((bad / "tokenizer_config.json").read_text())
        tc["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
        (bad / "tokenizer_config.json").write_text(json.dumps(tc))
        (bad / "chat_template.jinja").unlink(missing_ok=True)
    return bad


@pytest.mark.parametrize(
    "extra,code",
    [
        (["--export", "gguf", "--gguf-type", "q4_k"], "E644"),
        (["--export", "onnx"], "E643"),
        (["--ollama"], "E649"),
        (["--gguf-type", "f16"], "E649"),
        (["--dry-run"], "E649"),
        (["--upload-repo", "no-owner"], "E680"),
        (["--upload-repo", "../../etc/x"], "E680"),
        (["--export", "gguf", "--model", "{qwen2}"], "E645"),
        (["--export", "gguf", "--ollama", "--model", "{not-chatml}"], "E682"),
        (["--export", "gguf", "--out", "{run}/gguf"], "E617"),
        (["--export", "gguf", "--out", "{base}/gguf"], "E617"),
    ],
)
def test_bad_export_inputs_are_one_line_and_write_nothing(run, base, tmp_path, capsys, extra, code):
    world = tmp_path / "world"
    world.mkdir()
    models = {"qwen2": _bad_model(world, base, "qwen2")} if "{qwen2}" in extra else {}
    if "{not-chatml}" in extra:
        models["not-chatml"] = _bad_model(world, base, "template")
    subs = {"{run}": str(run), "{base}": str(base), **{f"{{{k}}}": str(v) for k, v in models.items()}}
    argv = list(extra)
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(world / "out")]
    before = sorted(p.name for p in world.rglob("*")), sorted(p.name for p in run.rglob("*"))
    assert main(["fuse", str(run), *argv]) == 1
    _one_error(capsys, code)
    assert (sorted(p.name for p in world.rglob("*")), sorted(p.name for p in run.rglob("*"))) == before
    assert not (base / "gguf").exists()


def test_export_config_defaults():
    assert ExportConfig(export="gguf").check().gguf_type == "f16"
    assert ExportConfig().check().gguf_type is None


@pytest.mark.slow
def test_default_model_gguf_round_trip(tmp_path, capsys):
    """SmolLM2-135M (Q4_1 in the wheel, fused in float32 on CPU) exported as f16 and read back."""
    run = make_adapter_run(tmp_path / "run", "smollm2-135m", quantize="auto")
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(out), "--export", "gguf", "--ollama"]) == 0
    said = capsys.readouterr().out
    assert "read back max |Δlogit|" in said
    ours = gguf.GGUFReader(str(out / "fused-f16.gguf")).fields
    assert len(ours["tokenizer.ggml.tokens"].contents()) == 49152
    assert "SmolLM" in (out / "Modelfile").read_text()
    # every metadata field we write equals the one llama.cpp's converter wrote into the bundled file
    # (tokens, merges, token types, special ids, pre-tokenizer, chat template, hyper-parameters)
    from mlxpt.models.loader import _bundled_gguf

    theirs = gguf.GGUFReader(str(_bundled_gguf("smollm2-135m"))).fields
    shared = [k for k in ours if k in theirs and not k.startswith("GGUF.") and k != "general.file_type"]
    assert len(shared) >= 20 and "tokenizer.ggml.merges" in shared and "tokenizer.chat_template" in shared
    for k in shared:
        assert ours[k].contents() == theirs[k].contents(), k


def test_missing_gguf_package_is_one_line(run, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    assert main(["fuse", str(run), "--out", str(tmp_path / "o"), "--export", "gguf"]) == 1
    assert "pip install" in _one_error(capsys, "E642")
    assert not (tmp_path / "o").exists()
