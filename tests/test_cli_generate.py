"""`mlxpt generate` and `mlxpt chat` end to end on a tiny random model."""

from __future__ import annotations

import io

import pytest
from test_decode import make_adapter_run
from tiny import make_model

import mlxpt.decode.generate as gen
from mlxpt.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cli") / "base")


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return make_adapter_run(tmp_path_factory.mktemp("cli-run") / "run", base)


def _generate(capsys, *extra):
    code = main(["generate", "--prompt", "hello", "--max-tokens", "12", *extra])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_generate_streams_text_and_stats(base, capsys):
    from mlxpt.decode import chat_prompt, generate_text
    from mlxpt.models.loader import load

    code, out, err = _generate(capsys, "--model", str(base))
    assert code == 0
    model, tok = load(str(base))
    want = generate_text(model, tok, chat_prompt(tok, [{"role": "user", "content": "hello"}]), max_tokens=12)
    assert out == want + "\n"
    assert "tok/s" in err and "generation: 12 tokens" in err


def test_generate_with_adapter_differs_and_defaults_to_runs_model(base, run, capsys):
    plain = _generate(capsys, "--model", str(base), "--raw")
    adapted = _generate(capsys, "--model", str(base), "--adapter", str(run), "--raw")
    from_run = _generate(capsys, "--adapter", str(run), "--raw")  # model read from the run config
    assert plain[0] == adapted[0] == from_run[0] == 0
    assert adapted[1] != plain[1] and adapted[1] == from_run[1]


def test_a_checkpoint_folder_loads_with_its_runs_config(run, tmp_path, capsys):
    import shutil

    ckpt = run / "checkpoints" / "step-00000007"
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "adapters.safetensors", ckpt / "adapters.safetensors")  # no config: the run's is used
    assert (
        _generate(capsys, "--adapter", str(ckpt), "--raw")[:2] == _generate(capsys, "--adapter", str(run), "--raw")[:2]
    )
    lone = tmp_path / "step-1"  # not under a run's checkpoints/: nothing to read the config from
    lone.mkdir()
    shutil.copy(run / "adapters.safetensors", lone / "adapters.safetensors")
    _one_line_error(capsys, ["generate", "--prompt", "hi", "--adapter", str(lone)], 1, "E221")


def test_seeded_sampling_cli_is_reproducible(base, capsys):
    flags = ("--model", str(base), "--temperature", "1.0", "--top-p", "0.9", "--seed", "5")
    assert _generate(capsys, *flags)[1] == _generate(capsys, *flags)[1]


def _one_line_error(capsys, argv, code, err_code):
    assert main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and err_code in lines[0], lines
    return lines[0]


def test_bad_inputs_are_one_line_errors(base, tmp_path, capsys):
    gen_args = ["generate", "--prompt", "hi"]
    _one_line_error(capsys, [*gen_args, "--model", str(base), "--adapter", str(tmp_path / "nope")], 1, "E220")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapters.npz").write_bytes(b"\x80\x04K\x01.")
    _one_line_error(capsys, [*gen_args, "--model", str(base), "--adapter", str(pickled)], 5, "E703")
    # validated before the (missing) model is looked up
    _one_line_error(capsys, [*gen_args, "--model", str(tmp_path / "none"), "--temperature", "-1"], 1, "E601")
    _one_line_error(capsys, [*gen_args, "--model", str(tmp_path / "none"), "--max-tokens", "0"], 1, "E604")
    _one_line_error(capsys, ["generate", "--prompt-file", str(tmp_path / "missing.txt")], 1, "E606")
    _one_line_error(capsys, [*gen_args, "--model", str(tmp_path / "none")], 1, "E212")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(base)])  # neither --prompt nor --prompt-file
    assert e.value.code == 2


def _chat(monkeypatch, capsys, base, script, patch_generate=None):
    calls = []
    real = gen.chat_prompt

    def recording(tok, messages, system=None):
        calls.append(([m["role"] for m in messages], system))
        return real(tok, messages, system)

    monkeypatch.setattr(gen, "chat_prompt", recording)
    if patch_generate:
        monkeypatch.setattr(gen, "iter_generate", patch_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code = main(["chat", "--model", str(base), "--max-tokens", "4"])
    return code, calls, capsys.readouterr()


def test_chat_keeps_history_and_handles_commands(base, monkeypatch, capsys):
    script = "hello\nmore\n/reset\nagain\n/system Be brief.\nhi\n/bogus\n/exit\nnever read\n"
    code, calls, cap = _chat(monkeypatch, capsys, base, script)
    assert code == 0
    assert calls == [
        (["user"], None),  # the start: --system (none here) checked against the template
        (["user"], None),
        (["user", "assistant", "user"], None),
        (["user"], None),  # after /reset
        (["user"], "Be brief."),  # /system checked against the template
        (["user"], "Be brief."),  # /system resets too
    ]
    assert "> " not in cap.out  # no prompt marker when stdin is not a terminal
    assert "history cleared" in cap.err and "unknown command /bogus" in cap.err


def test_chat_exits_cleanly_at_eof_and_survives_ctrl_c_in_an_answer(base, monkeypatch, capsys):
    real = gen.iter_generate
    state = {"n": 0}

    def interrupted_once(*a, **kw):
        state["n"] += 1
        for i, chunk in enumerate(real(*a, **kw)):
            if state["n"] == 1 and i == 1:
                raise KeyboardInterrupt
            yield chunk

    code, calls, cap = _chat(monkeypatch, capsys, base, "first\nsecond\n", interrupted_once)
    assert (
        code == 0 and len(calls) == 3
    )  # the start's check, 2 turns: EOF ends the session; the stopped answer kept it alive
    assert "[stopped]" in cap.err


def test_a_numbered_checkpoint_file_or_a_peft_folder_is_refused_not_swapped(run, tmp_path, capsys):
    """mlx-lm writes 0000002_adapters.safetensors beside the final adapters.safetensors: given as
    --adapter, the final one was once loaded in its place. A PEFT folder gets a message that says
    what it is."""
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(folder / "adapters.safetensors", folder / "0000002_adapters.safetensors")
    err = _one_line_error(capsys, ["generate", "--prompt", "hi", "--adapter", str(folder / "0000002_adapters.safetensors")], 1, "E221")  # fmt: skip
    assert "0000002_adapters.safetensors is not the folder's adapters.safetensors" in err
    assert (
        _generate(capsys, "--adapter", str(folder / "adapters.safetensors"), "--raw")[:2]
        == _generate(capsys, "--adapter", str(run), "--raw")[:2]
    )  # the folder's own file still names the folder
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_model.safetensors").write_bytes(b"")
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    err = _one_line_error(capsys, ["generate", "--prompt", "hi", "--adapter", str(peft)], 1, "E221")
    assert "PEFT" in err


def test_chat_keeps_going_when_the_template_refuses_a_system_prompt(tmp_path, monkeypatch, capsys):
    """A template without a system role (Gemma's) once ended the session at the next line after
    /system; and a model without a chat template dropped --system and the history without a word."""
    from tiny import CHATML

    model = make_model(tmp_path / "gemma")
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (model / "chat_template.jinja").write_text(refuse + CHATML)
    code, calls, cap = _chat(monkeypatch, capsys, model, "hello\n/system be nice\nhi again\n/exit\n")
    assert code == 0 and "System role not supported" in cap.err and "the system prompt is unchanged" in cap.err
    assert calls[-1] == (["user", "assistant", "user"], None)  # answered, with the history, no system
    plain = make_model(tmp_path / "plain")
    (plain / "chat_template.jinja").unlink()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(plain), "--max-tokens", "2"]) == 0
    assert "no chat template: each message is answered on its own" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(model), "--system", "be nice", "--max-tokens", "2"]) == 1
    assert capsys.readouterr().err.strip().startswith("error E603")


def test_an_mlx_lm_adapter_folder_loads_the_base_its_config_names(base, run, tmp_path, capsys):
    """mlx-lm's adapter_config.json names its base (`model`); without --model the default model
    was once loaded under it (E223 at best, a wrong base at worst)."""
    import json
    import shutil

    folder = tmp_path / "mlx-lm-adapter"
    folder.mkdir()
    shutil.copy(run / "adapters.safetensors", folder / "adapters.safetensors")
    config = json.loads((run / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "model": str(base)}))
    got = _generate(capsys, "--adapter", str(folder), "--raw")
    assert got[0] == 0 and got[1] == _generate(capsys, "--model", str(base), "--adapter", str(run), "--raw")[1]
