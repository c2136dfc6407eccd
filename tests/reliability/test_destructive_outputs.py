"""The destructive-output property (issue 26): for every command that writes, every input path
(the run, a file inside it, the runs root, the base model and a file in it, the data file and its
folder, a symlink to each) given as its output is refused, and nothing changes anywhere (every
file of the inputs is hashed before and after). test_outputs.py keeps the first fuse cases; this
module is the full product of writers x inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from test_decode import make_adapter_run
from tiny import make_model

from mlxpt.cli import main

pytestmark = pytest.mark.reliability

TARGETS = {  # name: path relative to the world folder (see `pristine`)
    "run": "runs/run",
    "file in the run": "runs/run/adapters.safetensors",
    "run config": "runs/run/config.json",
    "new path inside the run": "runs/run/out",
    "runs root": "runs",
    "model": "base",
    "model weights": "base/model.safetensors",
    "new path inside the model": "base/out",
    "data file": "data/{data}",
    "data folder": "data",
    "symlink to the run": "link-run",
    "symlink to the runs root": "link-runs",
    "symlink to the model": "link-base",
    "symlink to the data file": "link-data",
    "symlink to a file in the run": "link-adapter",
}

# argv with {out}; {data} is the command's data file (its input), None where it reads no data
WRITERS = {
    "fuse --force": (["fuse", "runs/run", "--out", "{out}", "--force"], None),
    "fuse": (["fuse", "runs/run", "--out", "{out}"], None),
    "fuse --export gguf --ollama --force": (
        ["fuse", "runs/run", "--out", "{out}", "--export", "gguf", "--gguf-type", "q8_0", "--ollama", "--force"],
        None,
    ),
    "fuse --upload-repo --dry-run --force": (
        ["fuse", "runs/run", "--out", "{out}", "--upload-repo", "me/model", "--dry-run", "--force"],
        None,
    ),
    "eval --out": (
        [
            "eval",
            "--model",
            "base",
            "--adapter",
            "runs/run",
            "--data",
            "data/eval.jsonl",
            "--limit",
            "1",
            "--max-tokens",
            "2",
            "--out",
            "{out}",
            "--plot",
            "plots/chart.png",
        ],
        "eval.jsonl",
    ),  # fmt: skip
    "eval --plot": (
        [
            "eval",
            "--model",
            "base",
            "--adapter",
            "runs/run",
            "--data",
            "data/eval.jsonl",
            "--limit",
            "1",
            "--max-tokens",
            "2",
            "--out",
            "results/out.json",
            "--plot",
            "{out}",
        ],
        "eval.jsonl",
    ),  # fmt: skip
    "data self-answers": (
        [
            "data",
            "self-answers",
            "--prompts",
            "data/prompts.jsonl",
            "--adapter",
            "runs/run",
            "--max-tokens",
            "2",
            "--out",
            "{out}",
        ],
        "prompts.jsonl",
    ),  # fmt: skip
    "data convert": (["data", "convert", "data/eval.jsonl", "--out", "{out}"], "eval.jsonl"),
}

XFAIL: dict = {}  # (writer, target): reason, for a known gap (none today)


def _cases():
    for w, (_, data) in WRITERS.items():
        for t in TARGETS:
            if data is None and "data" in t:
                continue  # fuse reads no data
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[w, t])] if (w, t) in XFAIL else []
            yield pytest.param(w, t, marks=marks, id=f"{w}->{t}")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A world of inputs: base model, a finished adapter run, eval data and prompts."""
    world = tmp_path_factory.mktemp("destructive") / "world"
    base = make_model(world / "base")
    run = make_adapter_run(world / "runs" / "run", base)
    (run / "status.json").write_text('{"status": "finished"}')
    (run / "metrics.jsonl").write_text('{"event": "step", "step": 1, "loss": 1.0}\n')
    (run / "checkpoints").mkdir()
    data = world / "data"
    data.mkdir()
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(3)]
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return world


def tree_hash(folder) -> dict[str, str]:
    """{relative path: sha256 of the bytes, or '-> target' for a link} of everything under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = f"-> {p.readlink()}"
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


@pytest.mark.parametrize("writer,target", list(_cases()))
def test_no_writer_destroys_an_input(writer, target, pristine, tmp_path, capsys, monkeypatch, scoreboard):
    world = tmp_path / "world"
    shutil.copytree(pristine, world, symlinks=True)
    argv, data = WRITERS[writer]
    config = world / "runs/run/config.json"  # the copy's base model is the copied one
    config.write_text(json.dumps({"model": {"model": str(world / "base"), "quantize": "none"}}))
    (world / "link-run").symlink_to("runs/run", target_is_directory=True)
    (world / "link-runs").symlink_to("runs", target_is_directory=True)
    (world / "link-base").symlink_to("base", target_is_directory=True)
    (world / "link-data").symlink_to(f"data/{data or 'eval.jsonl'}")
    (world / "link-adapter").symlink_to("runs/run/adapters.safetensors")
    (world / "results").mkdir()
    (world / "plots").mkdir()
    monkeypatch.chdir(world)
    out = TARGETS[target].format(data=data)
    before = tree_hash(world)
    code = main([a.format(out=out) for a in argv])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("warning")]
    after = tree_hash(world)
    refused = code != 0 and len(err) == 1 and err[0].startswith("error E6")
    scoreboard.record("destructive", tried=1, refused=int(refused), intact=int(after == before))
    assert refused, (code, err)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:6]
