"""`mlxpt fuse`: the fused model reloads from disk with the logits of base+adapter."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_decode import make_adapter_run
from tiny import make_model

import mlxpt.fuse as fuse_mod
from mlxpt.cli import main
from mlxpt.fuse import DTYPE_TOL, FLOAT_TOL, fuse, logits_of, probe_tokens
from mlxpt.models.loader import load


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fuse") / "base")


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_base(request, base, tmp_path_factory):
    """The tiny base stored in a 16-bit float, as `mlx_lm convert --dtype` writes it."""
    dtype = request.param
    out = tmp_path_factory.mktemp("fuse") / dtype
    shutil.copytree(base, out)
    weights = mx.load(str(base / "model.safetensors"))
    cast = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), cast, metadata={"format": "mlx"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}))
    return out, dtype


def _reference(base, run, quantize="none"):
    model, tok = load(str(base), adapter=str(run), quantize=quantize)
    probe = probe_tokens(tok)
    return logits_of(model, probe), probe


def test_fuse_round_trip_cli(base, tmp_path, capsys):
    run = make_adapter_run(tmp_path / "run", base)
    out = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("fused: max |Δlogit| = ") and "14 adapter layers" in line
    want, probe = _reference(base, run)
    scale = max(1.0, float(np.abs(want).max()))
    fused, _ = load(str(out), quantize="none")
    assert np.abs(logits_of(fused, probe) - want).max() <= FLOAT_TOL * scale
    plain, _ = load(str(base), quantize="none")
    assert np.abs(logits_of(plain, probe) - want).max() > 100 * FLOAT_TOL * scale  # the adapter mattered
    import mlx_lm

    m2, tok2 = mlx_lm.load(str(out))
    assert np.abs(np.array(m2(mx.array(probe)[None])[0]) - want).max() <= FLOAT_TOL * scale
    assert tok2.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("kind", ["dora", "lora"])
@pytest.mark.parametrize("bits", ["8", "4"])
def test_fuse_quantized_base(base, tmp_path, kind, bits):
    run = make_adapter_run(tmp_path / "run", base, fine_tune_type=kind, quantize=bits)
    kept = fuse(run, tmp_path / "q")
    assert kept.quantized and kept.max_abs_diff <= kept.tolerance
    exact = fuse(run, tmp_path / "f", dequantize=True)
    assert not exact.quantized and exact.max_abs_diff <= exact.tolerance
    assert exact.tolerance < 1e-3 < kept.max_abs_diff  # re-quantising costs accuracy; dequantize keeps it


def test_fuse_refuses_non_empty_out_unless_forced(base, tmp_path, capsys):
    run = make_adapter_run(tmp_path / "run", base)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["fuse", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E611" in err[0] and "--force" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only a folder mlxpt wrote as a fused model, never the person's own files
    assert main(["fuse", str(run), "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E618" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    fused = tmp_path / "fused"
    assert main(["fuse", str(run), "--out", str(fused)]) == 0
    assert main(["fuse", str(run), "--out", str(fused), "--force"]) == 0
    assert (fused / "config.json").is_file()


def test_fuse_needs_a_model_without_run_config(base, tmp_path, capsys):
    run = make_adapter_run(tmp_path / "run", base)
    (run / "config.json").unlink()
    assert main(["fuse", str(run), "--out", str(tmp_path / "o")]) == 1
    assert "E612" in capsys.readouterr().err
    assert main(["fuse", str(run), "--out", str(tmp_path / "o"), "--model", str(base)]) == 0


def test_fuse_mismatch_exits_4_and_leaves_nothing(base, tmp_path, capsys, monkeypatch):
    run = make_adapter_run(tmp_path / "run", base)
    real = fuse_mod.fuse_layers

    def broken(model, dequantize=False):  # a fuse bug: one weight slightly off
        n = real(model, dequantize)
        q = model.layers[0].self_attn.q_proj
        q.weight = q.weight * 1.01
        return n

    monkeypatch.setattr(fuse_mod, "fuse_layers", broken)
    out = tmp_path / "out"
    assert main(["fuse", str(run), "--out", str(out)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E614" in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _double_adapter_scale(monkeypatch):
    """A fuse bug: every adapter merged with twice its scale."""
    real = fuse_mod.fuse_layers

    def broken(model, dequantize=False):
        for _, m in model.named_modules():
            if hasattr(m, "fuse"):
                m.scale = 2 * m.scale
        return real(model, dequantize)

    monkeypatch.setattr(fuse_mod, "fuse_layers", broken)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_half_precision_base(half_base, tmp_path, kind):
    # W + ΔW rounded to bfloat16/float16 is what mlx-lm writes too; it was refused by the float32 tolerance
    base, dtype = half_base
    run = make_adapter_run(tmp_path / "run", base, fine_tune_type=kind)
    report = fuse(run, tmp_path / "fused")
    want, probe = _reference(base, run)
    scale = max(1.0, float(np.abs(want).max()))
    assert not report.quantized and report.tolerance == pytest.approx(DTYPE_TOL[dtype] * scale)
    assert FLOAT_TOL * scale < report.max_abs_diff <= report.tolerance
    fused, _ = load(str(report.out), quantize="none")
    assert fused.model.embed_tokens.weight.dtype == getattr(mx, dtype)  # stored in its dtype
    if kind == "lora":  # a DoRA layer fuses to float32, as in mlx_lm.fuse
        assert fused.model.layers[0].self_attn.q_proj.weight.dtype == getattr(mx, dtype)


def test_wrong_fuse_of_half_precision_base_is_caught(half_base, tmp_path, capsys, monkeypatch):
    base, _ = half_base
    run = make_adapter_run(tmp_path / "run", base)
    _double_adapter_scale(monkeypatch)
    out = tmp_path / "out"
    assert main(["fuse", str(run), "--out", str(out)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E614" in err[0]
    assert "--dequantize" not in err[0]  # the base is not quantised: that flag would change nothing
    assert not out.exists()
