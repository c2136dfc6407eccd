"""Security payloads, each with a side effect that would prove it ran (a sentinel file): a pickle
posing as an adapter, .npz/.bin adapters, chat-template injections, a YAML object tag, path
traversal in run names and checkpoint manifests, remote-code model folders. All must be refused
with exit 5 or a one-line error, and no sentinel may appear. Plus a static check of the source."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from mlxpt.runs import latest_checkpoint, list_checkpoints, sha256_file, verify_checkpoint
from reliability.harness import ROOT, error_lines, train_args

pytestmark = pytest.mark.reliability


def sentinel_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').write('code ran')"


def evil_pickle(sentinel: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (exec, (sentinel_code(sentinel),))

    return pickle.dumps(Payload())


def refused(child, code: int, fragment: str = "", per_row: bool = False) -> bool:
    """Exit `code`, one `error` line containing `fragment` (one per data row with `per_row`: data
    errors list every bad row), and no traceback."""
    errors = error_lines(child.stderr())
    one = len(errors) == 1 or (per_row and len(errors) > 1)
    clean = "Traceback" not in child.stderr()
    return child.code == code and one and all(fragment in e for e in errors) and clean


@pytest.fixture
def sentinel(tmp_path) -> Path:
    return tmp_path / "SENTINEL"


@pytest.fixture(scope="module")
def trained_run(zygote, tiny_model, small_data, tmp_path_factory) -> Path:
    child = zygote.run(train_args(tiny_model, small_data, tmp_path_factory.mktemp("sec"), 2))
    assert child.code == 0, child.stderr()
    return Path(child.start()["run_dir"])


def generate(zygote, model, adapter):
    return zygote.run(["generate", "--model", model, "--adapter", adapter, "--prompt", "hi", "--max-tokens", "2"])


def test_pickle_posing_as_adapters_safetensors(zygote, tiny_model, trained_run, tmp_path, sentinel, scoreboard):
    evil = tmp_path / "evil-adapter"
    evil.mkdir()
    shutil.copy(trained_run / "adapter_config.json", evil)
    (evil / "adapters.safetensors").write_bytes(evil_pickle(sentinel))
    child = generate(zygote, tiny_model, evil)
    ok = child.code in (1, 5) and len(error_lines(child.stderr())) == 1 and "Traceback" not in child.stderr()
    scoreboard.record("security", payloads=1, refused=int(ok and not sentinel.exists()))
    assert not sentinel.exists()
    assert ok, (child.code, child.stderr()[-1500:])


@pytest.mark.parametrize("name", ["adapters.npz", "adapters.bin", "adapter_model.bin", "adapters.pt"])
def test_pickle_family_adapter_files_exit_5(name, zygote, tiny_model, tmp_path, sentinel, scoreboard):
    evil = tmp_path / "evil-adapter"
    evil.mkdir()
    (evil / name).write_bytes(evil_pickle(sentinel))
    child = generate(zygote, tiny_model, evil)
    ok = refused(child, 5, "E703") and not sentinel.exists()
    scoreboard.record("security", payloads=1, refused=int(ok))
    assert ok, (child.code, child.stderr()[-1500:])


def test_pickle_inside_a_checkpoint_with_a_valid_manifest(zygote, trained_run, tmp_path, sentinel, scoreboard):
    """Even with a manifest recomputed to match, a checkpoint file is parsed as safetensors only."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    ck = list_checkpoints(run)[-1]
    f = ck / "optimizer.safetensors"
    f.write_bytes(evil_pickle(sentinel))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"][f.name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    child = zygote.run(["train", "--resume", run, "--steps", "3"])
    ok = refused(child, 1, "E302") and not sentinel.exists()
    scoreboard.record("security", payloads=1, refused=int(ok))
    assert ok, (child.code, child.stderr()[-1500:])


TEMPLATES = {
    "mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os.system('touch SENTINEL') }}",
    "joiner-globals": "{{ joiner.__init__.__globals__['os'].popen('touch SENTINEL').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].system('touch SENTINEL') }}",
    "namespace-init": "{{ namespace.__init__.__globals__.__builtins__.open('SENTINEL', 'w') }}",
    "warnings-builtins": (
        "{% for c in ().__class__.__base__.__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['__import__']('os').system('touch SENTINEL') }}{% endif %}{% endfor %}"
    ),
    "context-reference": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch SENTINEL') }}",
    "format-string": "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_injection_is_contained(name, zygote, tiny_model, small_data, tmp_path, sentinel, scoreboard):
    evil = shutil.copytree(tiny_model, tmp_path / "evil-template")
    cfg_path = evil / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATES[name].replace("SENTINEL", str(sentinel))
    cfg_path.write_text(json.dumps(cfg))
    (evil / "chat_template.jinja").unlink(missing_ok=True)
    child = zygote.run(train_args(evil, small_data, tmp_path / "runs", 2), env={"PWD": str(tmp_path)})
    ok = (
        refused(child, 1, "E204: chat template failed to render", per_row=True)
        and not sentinel.exists()
        and not (tmp_path / "runs").exists()
    )
    scoreboard.record("security", payloads=1, refused=int(ok))
    assert not sentinel.exists()
    assert ok, (child.code, child.stderr()[-1500:])


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "/tmp/abs", "x\n", ".hidden"])
def test_run_name_cannot_escape_the_runs_dir(name, zygote, tiny_model, small_data, tmp_path, scoreboard):
    runs = tmp_path / "inside" / "runs"
    child = zygote.run(train_args(tiny_model, small_data, runs, 1, name=name))
    outside = [p for p in tmp_path.rglob("*") if runs not in p.parents and p != runs and "inside" not in p.parts]
    ok = refused(child, 1, "E303") and not outside and not (runs.exists() and any(runs.iterdir()))
    scoreboard.record("security", payloads=1, refused=int(ok))
    assert ok, (child.code, child.stderr()[-800:], outside)


def test_manifest_cannot_point_outside_its_checkpoint(trained_run, tmp_path, scoreboard):
    """A manifest naming ../ paths, or a file that is a symlink to elsewhere, never verifies, so
    resume falls back to the previous checkpoint instead of reading outside the folder."""
    run = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    older, newest = list_checkpoints(run)[-2:]
    secret = tmp_path / "secret.json"
    secret.write_text((newest / "state.json").read_text())
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["../../../secret.json"] = {"sha256": sha256_file(secret), "size": secret.stat().st_size}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    traversal_refused = not verify_checkpoint(newest) and latest_checkpoint(run) == older
    del manifest["files"]["../../../secret.json"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    (newest / "state.json").unlink()
    (newest / "state.json").symlink_to(secret)
    symlink_refused = not verify_checkpoint(newest) and latest_checkpoint(run) == older
    scoreboard.record("security", payloads=2, refused=int(traversal_refused) + int(symlink_refused))
    assert traversal_refused and symlink_refused


def test_yaml_object_tags_are_not_constructed(zygote, tmp_path, sentinel, scoreboard):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"steps: !!python/object/apply:os.system ['touch {sentinel}']\n")
    child = zygote.run(["train", "--config", cfg])
    ok = refused(child, 1, "E507") and not sentinel.exists()
    scoreboard.record("security", payloads=1, refused=int(ok))
    assert ok, (child.code, child.stderr())


@pytest.mark.parametrize("where", ["config.auto_map", "config.model_file", "tokenizer_config.auto_map"])
def test_remote_code_model_folder_exit_5(where, zygote, tiny_model, small_data, tmp_path, sentinel, scoreboard):
    evil = shutil.copytree(tiny_model, tmp_path / "evil-model")
    (evil / "modeling_evil.py").write_text(sentinel_code(sentinel) + "\n")
    fname, key = where.split(".")
    cfg = json.loads((evil / f"{fname}.json").read_text())
    cfg[key] = "modeling_evil.py" if key == "model_file" else {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (evil / f"{fname}.json").write_text(json.dumps(cfg))
    child = zygote.run(train_args(evil, small_data, tmp_path / "runs", 1))
    ok = refused(child, 5, "E701") and not sentinel.exists() and not (tmp_path / "runs").exists()
    scoreboard.record("security", payloads=1, refused=int(ok))
    assert ok, (child.code, child.stderr()[-800:])


# calls that deserialise code or evaluate strings; `mx.eval(` and `model.eval()` are fine
BANNED = {
    "pickle": r"\b(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b",
    "torch.load": r"\btorch\.load\s*\(",
    "allow_pickle": r"allow_pickle\s*=\s*True",
    "eval": r"(?<![\w.])eval\s*\(",
    "exec": r"(?<![\w.])exec\s*\(",
    "yaml.load": r"\byaml\.(load|unsafe_load|full_load)\s*\(",
    "shell=True": r"shell\s*=\s*True",
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
}


def test_static_no_pickle_eval_or_exec_in_the_source(scoreboard):
    hits = []
    files = sorted((ROOT / "mlxpt").rglob("*.py")) + sorted((ROOT / "app").rglob("*.py"))
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            hits += [f"{f.relative_to(ROOT)}:{n}: {name}" for name, rx in BANNED.items() if re.search(rx, code)]
    scoreboard.record("static", files=len(files), patterns=len(BANNED), hits=len(hits))
    assert not hits, hits
