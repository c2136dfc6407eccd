"""`mlxpt.config.build_config`, the one path from settings to a config (CLI and TUI): precedence
flag > YAML > default for every method, the simpo/orpo presets, the resume rules, one-line errors,
and the TUI form and the command line giving equal configs for the same settings. No model."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from app import form
from mlxpt.commands import train
from mlxpt.config import (
    METHODS,
    RESUME_MUTABLE,
    DPOConfig,
    GRPOConfig,
    RMConfig,
    SFTConfig,
    build_config,
    config_class,
    resolve_method,
)
from mlxpt.config.distill import DistillConfig
from mlxpt.config.prm import PRMConfig
from mlxpt.config.rft import RFTConfig
from mlxpt.errors import ConfigError

CLASSES = {
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "simpo": DPOConfig,
    "orpo": DPOConfig,
    "rm": RMConfig,
    "grpo": GRPOConfig,
    "rft": RFTConfig,
    "distill": DistillConfig,
    "prm": PRMConfig,
}


def error_of(*args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        build_config(*args, **kw)
    return e.value


def test_every_method_has_its_config_class():
    assert set(METHODS) == set(CLASSES)
    for method, cls in CLASSES.items():
        assert config_class(method) is cls
        assert type(build_config(method, {})) is cls
    assert type(build_config(None, {})) is SFTConfig  # no method: sft


@pytest.mark.parametrize("method", METHODS)
def test_flag_beats_yaml_beats_default(method, tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train:\n  steps: 7\n  learning_rate: 0.001\nrank: 4\n")
    default = build_config(method, {})
    cfg = build_config(method, {"steps": "3", "keep": 2}, yaml_path=str(yaml))
    assert cfg.train.steps == 3  # flag over YAML
    assert cfg.train.learning_rate == 0.001 and cfg.adapter.rank == 4  # YAML over default
    assert cfg.train.keep == 2  # flag over default (typed values are fine too)
    assert cfg.data.max_seq_len == default.data.max_seq_len  # default where nothing is set
    assert build_config(method, {"steps": None}).train.steps == default.train.steps  # None: not set


def test_method_defaults_differ_where_they_should():
    assert build_config("sft", {}).data.data.endswith("sft")
    assert build_config("dpo", {}).data.data.endswith("pref") and build_config("rm", {}).data.data.endswith("pref")
    grpo = build_config("grpo", {})
    assert grpo.data.data.endswith("grpo") and grpo.data.batch_size == 2 and grpo.train.steps == 100


def test_simpo_and_orpo_presets_and_what_overrides_them(tmp_path):
    dpo, simpo, orpo = (build_config(m, {}) for m in ("dpo", "simpo", "orpo"))
    assert (dpo.pref.loss_type, dpo.pref.beta) == ("sigmoid", 0.1)
    assert (simpo.pref.loss_type, simpo.pref.beta) == ("simpo", 2.0)
    assert (orpo.pref.loss_type, orpo.pref.beta) == ("orpo", 0.1)
    yaml = tmp_path / "run.yaml"
    yaml.write_text("pref:\n  beta: 1.5\n")
    assert build_config("simpo", {}, yaml_path=str(yaml)).pref.beta == 1.5  # YAML over the preset
    assert build_config("simpo", {"beta": "2.5"}, yaml_path=str(yaml)).pref.beta == 2.5  # flag over both


def test_method_specific_sections():
    assert build_config("rm", {"center_rewards_coefficient": "0.01"}).rm.center_rewards_coefficient == 0.01
    g = build_config("grpo", {"num_generations": "4", "scale_rewards": "batch", "skip_zero_std_groups": True})
    assert (g.grpo.num_generations, g.grpo.scale_rewards, g.grpo.skip_zero_std_groups) == (4, "batch", True)
    e = error_of("sft", {"beta": "0.2"})  # a dpo setting is unknown to sft
    assert e.code == "E504" and "'beta'" in e.line()


@pytest.mark.parametrize(
    "method,flags,code,fragment",
    [
        ("sft", {"steps": "0"}, "E505", "steps=0"),
        ("dpo", {"steps": "ten"}, "E502", "steps='ten'"),
        ("simpo", {"beta": "0"}, "E505", "beta=0.0"),
        ("orpo", {"optimizer": "lion"}, "E503", "optimizer='lion'"),
        ("rm", {"stepz": "3"}, "E504", "'stepz'"),
        ("grpo", {"num_generations": "1"}, "E505", "num_generations=1"),
        ("grpo", {"top_p": "nan"}, "E505", "top_p=nan"),
        ("ppo", {}, "E503", "method='ppo'"),
    ],
)
def test_bad_values_are_one_line_errors_with_a_code(method, flags, code, fragment):
    e = error_of(method, flags)
    line = e.line()
    assert e.code == code and line.startswith(f"{code}: ") and fragment in line and "\n" not in line


def test_bad_yaml_names_the_file(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("steps: 2.5\n")
    e = error_of("sft", {}, yaml_path=str(yaml))
    assert e.code == "E502" and str(yaml) in e.line()
    assert error_of("sft", {}, yaml_path=str(tmp_path / "none.yaml")).code == "E506"


def saved_run(method: str = "dpo", **flags) -> dict:
    """What a run folder's config.json holds: the sections, the method and run-only keys."""
    return {"method": method, **build_config(method, flags).to_dict(), "data_report": {"rows": 3}}


def test_resume_starts_from_the_saved_config_and_changes_only_the_mutable_settings(tmp_path):
    saved = saved_run("simpo", rank=4, steps=10)
    cfg = build_config(None, {"steps": "20"}, resume="runs/x", resume_config=saved)
    assert type(cfg) is DPOConfig and cfg.pref.loss_type == "simpo" and cfg.adapter.rank == 4
    assert cfg.train.steps == 20  # steps may change
    assert build_config("simpo", {}, resume="runs/x", resume_config=saved).train.steps == 10
    yaml = tmp_path / "run.yaml"
    yaml.write_text("steps: 99\n")  # a YAML file is not read when resuming (as `mlxpt train --resume`)
    assert build_config(None, {}, yaml_path=str(yaml), resume="runs/x", resume_config=saved).train.steps == 10
    e = error_of(None, {"batch_size": "2", "rank": "8", "steps": "20"}, resume="runs/x", resume_config=saved)
    assert e.code == "E510" and "cannot change batch_size, rank when resuming (runs/x)" in e.line()
    assert "\n" not in e.line() and "steps" in e.hint and set(RESUME_MUTABLE) >= {"steps", "keep"}
    e = error_of("grpo", {}, resume="runs/x", resume_config=saved)
    assert e.code == "E510" and e.line().startswith("E510: this is a simpo run, not grpo (runs/x)")
    assert resolve_method(None, "runs/x", saved) == "simpo" and resolve_method(None) == "sft"
    assert resolve_method(None, "runs/x", {}) == "sft"  # an old run without a method key was sft
    with pytest.raises(TypeError):
        build_config("sft", {}, resume="runs/x")  # the caller reads the saved config


def cli_config(argv: list[str]):
    """What `mlxpt train ...` builds from an argv: the real parser, then the argparse boundary."""
    parser = argparse.ArgumentParser(prog="mlxpt")
    train.register(parser.add_subparsers(dest="command"))
    return train.config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    "method,values",
    [
        ("sft", {"rank": "16", "steps": "7", "trust_remote_code": True, "mask": "prompt"}),
        ("simpo", {"beta": "2.5", "learning_rate": "5e-6", "valid": ""}),
        ("orpo", {"orpo_lambda": "0.2", "plain_scoring": True}),
        ("rm", {"center_rewards_coefficient": "0.01", "batch_size": "2"}),
        ("grpo", {"num_generations": "4", "epsilon_high": "0.28", "rewards": "accuracy"}),
    ],
)
def test_tui_form_and_cli_give_equal_configs(method, values):
    from_form, err = form.validate(method, values)
    assert err is None
    argv = form.to_argv(method, values)
    method_cli, from_cli = cli_config(argv)
    assert method_cli == method and type(from_cli) is type(from_form)
    assert dataclasses.asdict(from_cli) == dataclasses.asdict(from_form) and from_cli == from_form
    assert from_cli == build_config(method, {k: v for k, v in values.items() if v != ""})


def test_tui_form_and_cli_reject_the_same_value_with_the_same_line(capsys):
    _, err = form.validate("dpo", {"steps": "0"})
    with pytest.raises(ConfigError) as e:
        cli_config(["train", "dpo", "--steps", "0"])
    assert err == e.value.line() and err.startswith("E505")
