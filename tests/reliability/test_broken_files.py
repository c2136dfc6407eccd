"""Loading broken things is one line naming the file and the likely cause, never a traceback,
and corruption is not reported as an attack (issue 26, contract "loaded files are verified")."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_decode import make_adapter_run
from tiny import make_model

from mlxpt.cli import main

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("broken") / "base")


def _copy(base, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(base, out)
    return out


def _truncate(path, keep=200):
    path.write_bytes(path.read_bytes()[:keep])


def _break_model(case, base, tmp_path):
    model = _copy(base, tmp_path)
    if case == "truncated weights":
        _truncate(model / "model.safetensors", 4096)
    elif case == "no tokenizer":
        for p in model.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                p.unlink()
    elif case == "tokenizer_config not JSON":
        (model / "tokenizer_config.json").write_text("{not json")
    elif case == "a run folder":
        run = make_adapter_run(tmp_path / "run", base)
        (run / "status.json").write_text('{"status": "finished"}')
        return run
    elif case == "an adapter folder":
        run = make_adapter_run(tmp_path / "run", base)
        (run / "config.json").unlink()
        return run
    return model


MODEL_CASES = {
    "truncated weights": "E228",
    "no tokenizer": "E226",
    "tokenizer_config not JSON": "E226",
    "a run folder": "E227",
    "an adapter folder": "E227",
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_broken_model_folder_is_one_line(case, base, tmp_path, capsys, scoreboard):
    model = _break_model(case, base, tmp_path)
    code = main(["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    ok = code == 1 and len(err) == 1 and err[0].startswith(f"error {MODEL_CASES[case]}")
    scoreboard.record("broken_files", tried=1, one_line=int(ok))
    assert ok, (code, err)


def _break_adapter(case, base, tmp_path):
    run = make_adapter_run(tmp_path / "run", base)
    if case == "config is a list":
        (run / "adapter_config.json").write_text("[1, 2]")
    elif case == "truncated adapter":
        _truncate(run / "adapters.safetensors", 300)
    elif case == "NaN adapter":
        from safetensors.numpy import load_file, save_file

        w = load_file(str(run / "adapters.safetensors"))
        key = next(iter(w))
        w[key] = np.full_like(w[key], np.nan)
        save_file(w, str(run / "adapters.safetensors"), metadata={"format": "mlx"})
    return run


ADAPTER_CASES = {"config is a list": "E222", "truncated adapter": "E224", "NaN adapter": "E225"}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_a_broken_adapter_is_one_line_and_not_a_security_refusal(case, base, tmp_path, capsys, scoreboard):
    run = _break_adapter(case, base, tmp_path)
    code = main(["generate", "--adapter", str(run), "--prompt", "hi", "--max-tokens", "2"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    ok = code == 1 and len(err) == 1 and err[0].startswith(f"error {ADAPTER_CASES[case]}") and not captured.out
    scoreboard.record("broken_files", tried=1, one_line=int(ok))
    assert ok, (code, err, captured.out)


def test_a_pickle_posing_as_an_adapter_is_still_a_security_refusal(base, tmp_path, capsys):
    run = make_adapter_run(tmp_path / "run", base)
    (run / "adapters.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    assert main(["generate", "--adapter", str(run), "--prompt", "hi", "--max-tokens", "2"]) == 5
    assert "E704" in capsys.readouterr().err


def test_the_run_config_names_its_model(base, tmp_path):
    run = make_adapter_run(tmp_path / "run", base)
    assert json.loads((run / "config.json").read_text())["model"]["model"] == str(base)


@pytest.mark.parametrize("var", ["MLXPT_HOME", "HOME"])
def test_a_cache_home_that_is_a_file_is_one_line(var, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    monkeypatch.delenv("MLXPT_HOME", raising=False)
    monkeypatch.setenv(var, str(afile))
    code = main(["generate", "--prompt", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error E229"), err
