"""`mlxpt train METHOD --help` lists that method's settings only, grouped by section, each with
its default and its choices; another method's flag still gets the one-line error naming its
method; `--from` is the short name of `--from-run`."""

from __future__ import annotations

import argparse
import re

import pytest

from mlxpt.cli import main
from mlxpt.commands import train
from mlxpt.commands.train import flags_from_args
from mlxpt.config import all_fields, build_config, config_class


def help_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(["train", *argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?:^\s+|, )(--[a-z-]+)", text, re.M))


def test_sft_help_has_no_preference_or_grpo_flags(capsys):
    text = help_of(capsys, "sft")
    assert "--kl-to-base" in text and "--beta" not in text and "--num-generations" not in text
    assert "--schedule {cosine,linear,constant}" in text and "(default: cosine)" in text
    assert "--steps N" in text and "optimiser steps (default: 200)" in text
    assert "(default: bundled assets/sft)" in text and "/assets/" not in text  # no machine path


def test_dpo_help_has_beta_with_its_default_and_sections_as_groups(capsys):
    text = help_of(capsys, "dpo")
    assert re.search(r"--beta X\s+strength of the implicit KL penalty.*\(default: 0\.1\)", text, re.S)
    assert "--kl-to-base" not in text and "--num-generations" not in text
    assert "--loss-type {sigmoid,ipo,hinge,simpo,orpo}" in text
    headings = re.findall(r"^(\w+):$", text, re.M)
    assert headings[-5:] == ["model", "data", "adapter", "train", "pref"]


def test_a_preset_shows_in_the_defaults(capsys):
    text = help_of(capsys, "simpo")
    assert re.search(r"--beta X.*?\(default: 2\.0\)", text, re.S) and "(default: simpo)" in text


@pytest.mark.parametrize("method", ["sft", "dpo", "simpo", "orpo", "rm", "grpo"])
def test_every_setting_of_the_method_and_nothing_else(capsys, method):
    cfg = build_config(method)
    want = {"--" + n.replace("_", "-") for n in all_fields(cfg)}
    # a yes/no setting also has its --no- form (packing is on by default)
    want |= {"--no-" + n.replace("_", "-") for n, (_, f) in all_fields(cfg).items() if str(f.type).startswith("bool")}
    got = flags(help_of(capsys, method)) - {"--help", "--config", "--resume", "--events", "--from", "--ranks"}
    assert got == want
    assert config_class(method) is type(cfg)


def test_help_without_a_method_is_sfts_and_says_how_to_see_another(capsys):
    text = help_of(capsys)
    assert flags(text) == flags(help_of(capsys, "sft"))
    assert "No METHOD given" in text and "mlxpt train METHOD --help" in text


def test_another_methods_flag_is_the_one_line_error_naming_its_method(capsys):
    assert main(["train", "sft", "--beta", "0.1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error E504: 'beta' is a setting of dpo/simpo/orpo")


def test_from_is_the_short_name_of_from_run(capsys):
    if "from_run" not in all_fields(build_config("sft")):
        pytest.skip("from_run is not a setting yet")
    text = help_of(capsys, "dpo")
    assert "--from RUN, --from-run RUN" in text
    parser = argparse.ArgumentParser(prog="mlxpt")
    train.register(parser.add_subparsers(dest="command"))
    assert flags_from_args(parser.parse_args(["train", "dpo", "--from", "runs/x"])) == {"from_run": "runs/x"}
