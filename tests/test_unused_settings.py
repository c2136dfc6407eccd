"""Settings of a shared section that a method ignores (`Sections.UNUSED`, today `packing` outside
sft) are hidden from its help and form and refused on its command line; the New-run preview and
`data check` read each method's own data kind (prm: stepwise rows, rft: prompts)."""

from __future__ import annotations

import json

import pytest

from mlxpt.cli import main
from mlxpt.config import ASSETS, DPOConfig, GRPOConfig, build_config
from mlxpt.data.check import data_kind


@pytest.mark.parametrize("method", ["dpo", "simpo", "rm", "grpo", "prm", "rft", "distill"])
def test_packing_is_refused_and_hidden_where_rows_are_not_packed(capsys, method):
    assert main(["train", method, "--packing"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E504" in err[0] and "'packing' is a setting of sft" in err[0]
    from app.form import form_fields

    assert "packing" not in {f.name for f in form_fields(method)}
    with pytest.raises(SystemExit):
        main(["train", method, "--help"])
    assert "--packing" not in capsys.readouterr().out


def test_sft_still_packs_and_shows_it(capsys):
    assert build_config("sft", {"packing": False}).data.packing is False
    from app.form import form_fields

    assert "packing" in {f.name for f in form_fields("sft")}


@pytest.mark.parametrize("cls", [DPOConfig, GRPOConfig])
def test_an_older_config_json_with_packing_still_loads(cls):
    saved = json.loads(json.dumps(cls().to_dict()))
    saved["data"]["packing"] = True  # what runs written before UNUSED carry
    assert cls.from_dict(saved).to_dict()["data"]["packing"] is True  # the field is kept, unused


def test_data_kinds_of_every_method():
    assert [data_kind(m) for m in ("sft", "dpo", "rm", "grpo", "rft", "prm")] == [
        "sft", "pref", "pref", "prompts", "prompts", "stepwise",
    ]  # fmt: skip


def test_the_preview_reads_stepwise_rows_for_prm():
    from app.preview import check_data

    cfg = build_config("prm", {"data": str(ASSETS / "prm")})
    good = check_data("stepwise", cfg)
    assert not good.errors and good.lengths and "steps" in good.summary
    assert any(trained for _, trained in good.example)  # the step ends are marked
    bad = check_data("stepwise", build_config("prm", {"data": str(ASSETS / "sft")}))
    assert bad.errors and bad.errors[0].startswith("E1")  # SFT rows are not stepwise rows: file:line errors


def test_the_preview_shows_the_packing_efficiency_at_the_forms_batch_and_length():
    """The New run form's data check says what `--packing` saves (issue 20), as `data check` does."""
    from app.preview import check_data, packing_line
    from mlxpt.data.batching import packing_efficiency

    cfg = build_config("sft", {"data": str(ASSETS / "sft")})
    p = check_data(data_kind("sft"), cfg)
    assert not p.errors and p.lengths
    eff = packing_efficiency(
        [min(n, cfg.data.max_seq_len) for n in p.lengths], cfg.data.batch_size, cfg.data.max_seq_len
    )
    assert f"{eff['packed_efficiency']:.0%} packed into bins of {cfg.data.max_seq_len}" in p.summary
    assert eff["packed_efficiency"] > eff["padded_efficiency"]  # bundled rows differ in length: packing saves
    off = build_config("sft", {"data": str(ASSETS / "sft"), "packing": False}).data
    assert packing_line([10, 200, 30], off).endswith("as padded rows (packing off)")
