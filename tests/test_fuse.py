"""`mlxpt fuse`: the fused model reloads from disk with the logits of base+adapter."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_decode import make_adapter_run
from tiny import make_model

import mlxpt.fuse as fuse_mod
from mlxpt.cli import main
from mlxpt.fuse import FLOAT_TOL, fuse, logits_of, probe_tokens
from mlxpt.models.loader import load


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fuse") / "base")


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
