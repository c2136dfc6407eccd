"""Which adapter settings each `--fine-tune-type` reads (config.adapter_settings): the table is
complete, it matches what `apply_adapters` really does on a tiny model (a setting a type ignores
changes nothing of its adapter, one it reads changes something), and `mlxpt train` warns in one
line about a setting the type ignores while still accepting it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlxpt.config import AdapterConfig, adapter_settings, build_config, ignored_adapter_settings
from mlxpt.config.sections import TYPE_SETTINGS

TYPES = AdapterConfig.__dataclass_fields__["fine_tune_type"].metadata["choices"]
EVERY_TYPE = ("fine_tune_type", "num_layers", "from_run")
OTHER = {"rank": 4, "alpha": 3.0, "dropout": 0.25, "targets": "q_proj", "prefix_length": 3}
OTHER |= {"prefix_projection": 8, "adapter_size": 5}


def test_every_type_and_every_setting_is_placed():
    assert set(TYPE_SETTINGS) == set(TYPES)  # a new type in the choices needs its line in the table
    names = [f.name for f in dataclasses.fields(AdapterConfig)]
    assert set(names) == set(EVERY_TYPE) | set(OTHER)
    expected = {
        "lora": ("fine_tune_type", "rank", "alpha", "dropout", "num_layers", "targets", "from_run"),
        "full": ("fine_tune_type", "num_layers", "from_run"),
        "prefix": ("fine_tune_type", "num_layers", "prefix_length", "prefix_projection", "from_run"),
        "adapter": ("fine_tune_type", "num_layers", "adapter_size", "from_run"),
    }
    expected["dora"] = expected["lora"]
    for kind in TYPES:
        used, ignored = adapter_settings(kind), ignored_adapter_settings(kind)
        assert used == expected[kind], kind
        assert set(used) | set(ignored) == set(names) and not set(used) & set(ignored)
    assert adapter_settings("prefixes") == tuple(names) and ignored_adapter_settings("prefixes") == ()


def _applied(tiny_dir: Path, **settings) -> tuple[dict, dict]:
    """(adapter config, trainable array shapes) of the tiny model with these adapter settings."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from mlxpt.models.adapters import apply_adapters

    model = load_model(Path(tiny_dir))[0]
    config = apply_adapters(model, AdapterConfig(num_layers=1, **settings), seed=0)
    return config, {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("kind", TYPES)
def test_the_table_matches_what_each_type_trains(tiny_dir, kind):
    base = _applied(tiny_dir, fine_tune_type=kind)
    for name, value in OTHER.items():
        changed = _applied(tiny_dir, fine_tune_type=kind, **{name: value}) != base
        assert changed == (name in adapter_settings(kind)), (kind, name, value)


def test_train_warns_about_settings_the_type_ignores(tmp_path, capsys):
    from mlxpt.cli import main
    from mlxpt.commands.train import ignored_settings_line

    assert ignored_settings_line(build_config("sft", {"rank": "16", "fine_tune_type": "dora"})) is None
    assert ignored_settings_line(build_config("dpo", {"fine_tune_type": "prefix", "prefix_length": "4"})) is None
    line = ignored_settings_line(build_config("grpo", {"fine_tune_type": "full", "rank": "16", "targets": "q_proj"}))
    assert line == "rank=16, targets=q_proj ignored by fine_tune_type full (it reads num_layers); drop them"
    with_from = build_config("sft", {"fine_tune_type": "prefix", "rank": "16", "from_run": "runs/x"})
    assert ignored_settings_line(with_from) is None  # the type is the --from adapter's own
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": 5}\n')
    argv = ["train", "--fine-tune-type", "prefix", "--rank", "16", "--data", str(bad), "--runs-dir", str(tmp_path)]
    assert main([*argv, "--model", str(tmp_path / "no-such-model")]) == 1  # accepted: the data is what fails
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "warning: rank=16 ignored by fine_tune_type prefix (it reads num_layers, prefix_length, "
        "prefix_projection); drop it"
    )
    assert err[1:] and all(line.startswith("error E1") for line in err[1:]), err
    assert not list(tmp_path.glob("2*"))  # nothing written
