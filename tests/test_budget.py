"""Compute-optimal scaling (`--strategy auto --budget`, decode/budget.py), the calibration table
(`mlxpt eval --calibrate`) and the accuracy-vs-generated-tokens curves (fast: fakes and a tiny model)."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
from test_tts_fakes import FakeLM, byte_tokenizer, scripted
from tiny import make_model

from mlxpt.cli import main
from mlxpt.decode.budget import (
    Bucket,
    CalibrationTable,
    Cell,
    agreement,
    build_table,
    builtin_choice,
    check_not_test_set,
    choose,
    expected_tokens,
    identity,
    load_table,
    plan,
)
from mlxpt.decode.strategies import STRATEGIES, run_strategy
from mlxpt.errors import ConfigError
from mlxpt.runs.atomic import sha256_file

ROW = {"messages": [{"role": "user", "content": "Q?"}], "answer": "8"}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _table(cells: dict[str, list[tuple[str, int, float, float]]], probe=2, probe_tokens=20.0, model="m"):
    """A table from bucket -> [(strategy, n, accuracy, tokens)]; an `all` bucket is added if missing."""
    buckets = {
        name: Bucket(10, probe_tokens, {f"{s}@{n}": Cell(s, n, a, t) for s, n, a, t in rows})
        for name, rows in cells.items()
    }
    buckets.setdefault("all", next(iter(buckets.values())))
    return CalibrationTable(probe, buckets, model)


def test_agreement_buckets_by_the_leading_answer():
    assert agreement(["7", "7"]) == ("2/2", 0.0)
    assert agreement(["7", "8"]) == ("1/2", 0.5)
    assert agreement([None, None]) == ("0/2", 1.0)
    assert agreement(["7", None, "7", "9"]) == ("2/4", 0.5)


HARD = [
    ("greedy", 1, 0.5, 10.0),
    ("self-consistency", 2, 0.55, 20.0),
    ("self-consistency", 4, 0.7, 40.0),
    ("self-consistency", 8, 0.8, 80.0),
    ("beam", 2, 0.7, 30.0),
]


def test_chooser_respects_the_budget_and_prefers_accuracy():
    table = _table({"1/2": HARD})
    for budget in range(1, 200, 7):
        c = choose(table, "1/2", 20, budget)
        assert c.tokens <= max(budget, 20), (budget, c)  # only the probe's own vote may exceed it
    # after a 20-token probe: greedy 30, sc@4 20 + (40 - 20) = 40, beam 50, sc@8 80
    assert choose(table, "1/2", 20, 45).key == "self-consistency@4"
    assert choose(table, "1/2", 20, 100).key == "self-consistency@8"
    assert choose(table, "1/2", 20, 31).key == "self-consistency@2"  # the probe's vote beats greedy, for free
    assert choose(_table({"1/2": [("greedy", 1, 0.6, 10.0), *HARD[1:]]}), "1/2", 20, 31).key == "greedy@1"
    low = choose(table, "1/2", 20, 25)  # nothing fits: the probe's vote, no more tokens
    assert low.key == "self-consistency@2" and low.tokens == 20 and low.accuracy == 0.55


def test_chooser_picks_the_cheaper_strategy_on_equal_accuracy():
    table = _table({"1/2": HARD})
    # sc@4 (40 tokens) and beam@2 (50) are both 70 %: the cheaper wins at any budget that fits both
    assert choose(table, "1/2", 20, 60).key == "self-consistency@4"
    swapped = _table({"1/2": [("beam", 2, 0.7, 10.0), ("self-consistency", 4, 0.7, 40.0)]})
    assert choose(swapped, "1/2", 20, 60).key == "beam@2"


def test_chooser_reads_only_the_bucket_and_skips_unknown_strategies():
    table = _table({"2/2": [("greedy", 1, 0.9, 10.0), ("beam", 4, 0.9, 50.0)], "1/2": HARD})
    assert choose(table, "2/2", 20, 1000).key == "greedy@1"  # easy prompts: no more compute
    assert choose(table, "1/2", 20, 1000).key == "self-consistency@8"
    assert choose(table, "1/2", 20, 1000, allowed=("greedy", "beam")).key == "beam@2"
    assert choose(table, "9/9", 20, 1000).key == choose(table, "all", 20, 1000).key  # unseen bucket: all


def test_chooser_shrinks_a_small_bucket_toward_the_overall_rates():
    """A 2-prompt bucket where the cheap cell happened to win both: the `all` row (60 prompts)
    says the vote is far better, and the shrunk estimate follows it; a large bucket keeps its own."""
    overall = Bucket(60, 20.0, {"greedy@1": Cell("greedy", 1, 0.2, 10.0),
                                "self-consistency@4": Cell("self-consistency", 4, 0.6, 40.0)})  # fmt: skip
    small = Bucket(2, 20.0, {"greedy@1": Cell("greedy", 1, 1.0, 10.0),
                             "self-consistency@4": Cell("self-consistency", 4, 0.5, 40.0)})  # fmt: skip
    table = CalibrationTable(2, {"1/2": small, "all": overall}, "m")
    c = choose(table, "1/2", 20, 100)
    # greedy (2 x 1.0 + 4 x 0.2) / 6 = 0.467 < the vote's (2 x 0.5 + 4 x 0.6) / 6 = 0.567
    assert c.key == "self-consistency@4" and c.accuracy == pytest.approx(3.4 / 6)
    big = CalibrationTable(2, {"1/2": Bucket(40, 20.0, small.cells), "all": overall}, "m")
    assert choose(big, "1/2", 20, 100).key == "greedy@1"  # 40 prompts: (40 + 0.8) / 44 = 0.93
    tied = Bucket(3, 20.0, {k: Cell(c.strategy, c.n, 1 / 3, c.tokens) for k, c in small.cells.items()})
    assert choose(CalibrationTable(2, {"1/2": tied, "all": overall}, "m"), "1/2", 20, 100).key == "self-consistency@4"
    assert choose(table, "all", 0, 100).accuracy == 0.6  # the all row is not shrunk


def _two_buckets(easy_share=60, hard_share=40):
    """Easy prompts (2/2 agree) are right from the probe's vote; hard ones need a step search
    that costs more than a per-prompt budget allows after the 20-token probe."""
    cells = {
        "2/2": [("self-consistency", 2, 0.9, 20.0), ("self-consistency", 4, 0.92, 40.0), ("step-beam", 1, 0.9, 60.0)],
        "1/2": [("self-consistency", 2, 0.3, 20.0), ("self-consistency", 4, 0.4, 40.0), ("step-beam", 1, 0.6, 60.0)],
    }
    table = _table(cells)
    table.buckets["2/2"].prompts, table.buckets["1/2"].prompts = easy_share, hard_share
    table.buckets["all"] = Bucket(easy_share + hard_share, 20.0, {})  # no shrinkage toward an `all` row
    table.buckets["all"].cells["greedy@1"] = Cell("greedy", 1, 0.5, 10.0)
    return table


def test_mean_budget_plan_spends_on_the_hard_prompts():
    table = _two_buckets()
    # per prompt, 50 tokens: step-beam (20 + 60) never fits, so hard prompts get sc@4 (40 %)
    assert choose(table, "1/2", 20, 50).key == "self-consistency@4"
    chosen = plan(table, 50)
    assert {b: c.key for b, c in chosen.items()} == {"2/2": "self-consistency@2", "1/2": "step-beam@1"}
    assert chosen["1/2"].tokens == 80 and chosen["1/2"].rule == "table-mean"
    assert 0.6 * 20 + 0.4 * 80 <= 50  # the mean of the plan fits where one hard prompt does not
    # a lower mean budget: the hard prompts drop to what fits on average
    assert plan(table, 35)["1/2"].key == "self-consistency@4" and plan(table, 35)["2/2"].key == "self-consistency@2"
    # more hard prompts: the same budget no longer pays for step-beam on each of them
    assert plan(_two_buckets(20, 80), 50)["1/2"].key == "self-consistency@4"
    assert plan(table, 19) == {}  # under the probe: no plan, auto chooses per prompt


def test_mean_budget_plan_is_the_best_of_every_combination():
    import itertools
    import random

    rng = random.Random(0)
    for trial in range(40):
        names = ["0/3", "1/3", "2/3", "3/3"][: rng.randint(1, 4)]
        cells = {
            b: [(rng.choice(["greedy", "best-of-n", "step-beam", "beam"]), n, round(rng.random(), 2),
                 float(rng.randint(1, 120))) for n in (1, 2, 3)]
            for b in names
        }  # fmt: skip
        table = _table(cells, probe=3, probe_tokens=15.0)
        table.buckets["all"] = Bucket(1, 15.0, {})
        for b in names:
            table.buckets[b].prompts = rng.randint(1, 30)
        total = sum(table.buckets[b].prompts for b in names)
        budget = rng.randint(10, 150)
        best = None
        options = {b: [*table.buckets[b].cells.values(), None] for b in names}  # None: the probe's vote
        for combo in itertools.product(*(options[b] for b in names)):
            cost = acc = 0.0
            for b, c in zip(names, combo, strict=True):
                w = table.buckets[b].prompts / total
                cost += w * (expected_tokens(c, 3, 15.0, 15.0) if c else 15.0)  # pooled cells read the probe
                acc += w * (c.accuracy if c else 0.0)
            if cost <= budget + 1e-9 and (best is None or acc > best + 1e-9):
                best = acc
        chosen = plan(table, budget)
        if best is None:
            assert chosen == {}, trial
            continue
        got_acc = sum(table.buckets[b].prompts / total * c.accuracy for b, c in chosen.items())
        got_cost = sum(table.buckets[b].prompts / total * c.tokens for b, c in chosen.items())
        assert got_acc == pytest.approx(best) and got_cost <= budget + 1e-9, trial


def test_builtin_rule_stops_on_agreement_else_votes_within_the_budget():
    c = builtin_choice("2/2", 30, 2, 1000)
    assert (c.key, c.tokens, c.rule) == ("self-consistency@2", 30, "built-in")
    c = builtin_choice("1/2", 30, 2, 100)  # 15 tokens a sample: 2 + 70 // 15 = 6 samples
    assert c.key == "self-consistency@6" and c.tokens <= 100 and math.isnan(c.accuracy)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A byte tokenizer and a model that answers 7 (p .5) or 8 (p .5, the gold answer)."""
    from mlxpt.decode.generate import chat_prompt

    tok = byte_tokenizer(tmp_path_factory.mktemp("tok"))
    ids = chat_prompt(tok, ROW["messages"])
    V = len(tok.get_vocab())
    lm = FakeLM(V, scripted(tok, len(ids), [("Answer: 7", 0.5), ("so 8", 0.5)], V))
    return lm, tok, ids


def _auto(fake, budget, calibration=None, seed=0, **kw):
    lm, tok, ids = fake
    from mlxpt.decode.sampling import SamplingConfig

    return run_strategy(
        lm, tok, ids, "auto", budget=budget, calibration=calibration, max_tokens=20,
        sampling=SamplingConfig(temperature=1.0, seed=seed), **kw,
    )  # fmt: skip


def test_auto_follows_the_table_reuses_the_probe_and_reports_its_spend(fake):
    table = _table({b: [("self-consistency", 4, 0.9, 4 * 12.0)] for b in ("0/2", "1/2", "2/2")}, probe_tokens=24.0)
    r = _auto(fake, 1000, table)
    assert r.strategy == "auto" and r.auto["chose"] == "self-consistency@4" and r.auto["rule"] == "table"
    assert r.auto["bucket"] in ("1/2", "2/2") and r.auto["difficulty"] in (0.0, 0.5)
    assert len(r.samples) == 4  # the 2 probe samples are the pool's first 2: only 2 more drawn
    lens = {"Answer: 7": 9, "so 8": 4}  # byte tokens (EOS not counted)
    assert r.generated_tokens == r.auto["spent"] == sum(lens[t] for t in r.samples)
    assert r.votes is not None and sum(r.votes.values()) == 4
    # another table, another choice: the choice is the table's, not the data's
    greedy_table = _table({b: [("greedy", 1, 0.95, 6.0)] for b in ("0/2", "1/2", "2/2")}, probe_tokens=24.0)
    g = _auto(fake, 1000, greedy_table)
    assert g.auto["chose"] == "greedy@1" and g.generated_tokens == g.auto["probe_tokens"] + lens[g.text]
    assert _auto(fake, 1000, greedy_table, row={"answer": "8"}).auto["chose"] == "greedy@1"


def test_auto_below_the_probe_cost_skips_the_probe(fake):
    table = _table({"all": [("greedy", 1, 0.5, 10.0), ("self-consistency", 4, 0.9, 48.0)]}, probe_tokens=24.0)
    r = _auto(fake, 12, table)
    assert r.auto["chose"] == "greedy@1" and r.auto["bucket"] is None and r.auto["probe_tokens"] == 0
    assert r.generated_tokens == r.auto["spent"] == len(r.text)  # one greedy decode, no probe


def test_below_the_probe_cost_auto_never_takes_a_cell_it_skips(fake):
    """The 'nothing fits' fallback under the probe's cost obeys the same filter as the choice: a
    `sample@1` cell (mlxpt writes one for --strategies sample) is never run, nor a strategy
    outside `allowed`."""
    cells = [("sample", 1, 0.5, 5.0), ("greedy", 1, 0.4, 10.0), ("self-consistency", 4, 0.9, 48.0)]
    table = _table({"all": cells}, probe_tokens=24.0)
    assert choose(table, "all", 0, 1).key == "greedy@1"
    assert choose(table, "all", 0, 1, allowed=("self-consistency",)).key == "self-consistency@4"
    r = _auto(fake, 1, table)
    assert r.auto["chose"] == "greedy@1" and r.auto["probe_tokens"] == 0
    only = _table({"all": [("sample", 1, 0.5, 5.0)]}, probe_tokens=24.0)
    c = choose(only, "all", 0, 1)  # no cell auto may run: the probe's vote
    assert c.key == "self-consistency@2" and c.tokens == 24.0


def test_auto_counts_the_probe_samples_it_drew(fake):
    """n_used is every sample drawn for the prompt, the probe's included, whatever auto chose;
    generate's `[auto: N samples ...]` line says the same, and its votes line counts the voters."""
    from mlxpt.commands.generate import describe

    def table_of(*cells):
        return _table({b: list(cells) for b in ("0/2", "1/2", "2/2")}, probe_tokens=24.0)

    one = _auto(fake, 1000, table_of(("self-consistency", 1, 0.9, 6.0)))  # reads 1 of the 2 probe samples
    assert one.auto["chose"] == "self-consistency@1" and len(one.samples) == 1 and one.n_used == 2
    lines = describe(one)
    assert "[auto: 2 samples," in lines[-1] and "of 1 samples gave an answer" in lines[0], lines
    g = _auto(fake, 1000, table_of(("greedy", 1, 0.95, 6.0)))  # 2 probe samples, then 1 greedy decode
    assert g.auto["chose"] == "greedy@1" and g.n_used == 3
    four = _auto(fake, 1000, table_of(("self-consistency", 4, 0.9, 48.0)))  # the probe is the pool's start
    assert four.auto["chose"] == "self-consistency@4" and four.n_used == 4
    skipped = _auto(fake, 12, _table({"all": [("greedy", 1, 0.5, 10.0)]}, probe_tokens=24.0))  # no probe
    assert skipped.auto["probe"] == 0 and skipped.n_used == 1


def test_auto_without_a_table_uses_the_builtin_rule(fake):
    seen = [_auto(fake, 60, seed=s).auto for s in range(6)]
    for info in seen:
        assert info["rule"] == "built-in"
        if info["bucket"] == "2/2":
            assert info["chose"] == "self-consistency@2" and info["spent"] == info["probe_tokens"]
        else:
            assert info["chose"] != "self-consistency@2" and info["expected_tokens"] <= 60
    assert {i["bucket"] for i in seen} >= {"1/2", "2/2"}  # both branches ran


def test_auto_in_mean_mode_runs_the_plan_of_its_bucket(fake):
    easy = [("self-consistency", 2, 0.9, 13.0), ("greedy", 1, 0.95, 30.0)]
    hard = [("self-consistency", 2, 0.2, 13.0), ("greedy", 1, 0.9, 30.0)]
    table = _table({"2/2": easy, "1/2": hard, "0/2": hard}, probe_tokens=13.0)
    table.buckets["0/2"].prompts = 1  # 10 easy, 10 hard, 1 unanswered: mean (130 + 430 + 43) / 21 < 30
    table.buckets["all"] = Bucket(21, 13.0, {})
    seen = [_auto(fake, 30, table, seed=s, budget_mode="mean").auto for s in range(6)]
    assert {i["bucket"] for i in seen} >= {"1/2", "2/2"}
    for info in seen:  # per prompt, 30 tokens fit no greedy after the probe; the mean plan gives it to 1/2
        assert info["budget_mode"] == "mean" and info["rule"] == "table-mean"
        assert info["chose"] == ("self-consistency@2" if info["bucket"] == "2/2" else "greedy@1")
    per_prompt = _auto(fake, 30, table, seed=0).auto
    assert per_prompt["chose"] == "self-consistency@2" and per_prompt["rule"] == "table"


def test_auto_is_registered_and_checks_its_settings(fake):
    assert "auto" in STRATEGIES
    lm, tok, ids = fake
    with pytest.raises(ConfigError, match="E651"):
        run_strategy(lm, tok, ids, "auto")
    with pytest.raises(ConfigError, match="E650"):
        run_strategy(lm, tok, ids, "auto", budget=0)
    with pytest.raises(ConfigError, match="E652"):
        run_strategy(lm, tok, ids, "auto", budget=10, calibration="/no/such/table.json")
    with pytest.raises(ConfigError, match="E658"):
        run_strategy(lm, tok, ids, "auto", budget=10, budget_mode="mean")


def _details(buckets_and_cells):
    """eval's per-prompt records: pool answers and tokens, and each cell's [answer, ok] and tokens."""
    recs = []
    for i, (pool_answers, cells) in enumerate(buckets_and_cells):
        recs.append(
            {
                "line": i + 1, "gold": "8",
                "pool": {"answers": pool_answers, "tokens": [10] * len(pool_answers)},
                "answers": {k: [None, ok] for k, (ok, _) in cells.items()},
                "tokens": {k: t for k, (_, t) in cells.items()},
            }
        )  # fmt: skip
    return recs


def test_build_table_buckets_prompts_and_averages_cells(tmp_path):
    recs = _details(
        [
            (["8", "8", "8", "8"], {"greedy@1": (True, 6), "self-consistency@4": (True, 40)}),
            (["7", "8", "8", "8"], {"greedy@1": (False, 8), "self-consistency@4": (True, 40)}),
            (["7", "7", "9", "7"], {"greedy@1": (False, 10), "self-consistency@4": (False, 40)}),
        ]
    )
    who = {"model": "m", "adapter": None, "adapter_sha256": None}
    t = build_table(recs, 2, who, {"path": "v.jsonl"}, {})
    assert set(t.buckets) == {"2/2", "1/2", "all"}
    assert t.buckets["2/2"].prompts == 2 and t.buckets["1/2"].prompts == 1 and t.buckets["all"].prompts == 3
    assert t.buckets["2/2"].cells["greedy@1"].accuracy == 0.5 and t.buckets["2/2"].cells["greedy@1"].tokens == 8.0
    assert t.buckets["2/2"].cells["self-consistency@2"].accuracy == 0.5  # the probe's own vote: 8, then 7
    assert t.buckets["all"].probe_tokens == 20.0
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(t.to_json()))
    back = load_table(path, model="m")
    assert back.buckets["1/2"].cells["self-consistency@4"].accuracy == 1.0
    with pytest.raises(ConfigError, match="E654"):
        build_table(_details([(["8"], {"greedy@1": (True, 6)})]), 2, who, {}, {})


def _pool_sets():
    """Two calibration sets' records (the second has a bucket the first lacks)."""
    a = _details(
        [
            (["8", "8", "8", "8"], {"greedy@1": (True, 6), "self-consistency@4": (True, 40)}),
            (["7", "8", "8", "8"], {"greedy@1": (False, 8), "self-consistency@4": (True, 44)}),
            (["7", "7", "9", "7"], {"greedy@1": (False, 10), "self-consistency@4": (False, 40)}),
        ]
    )
    b = _details(
        [
            (["8", "8", "7", "8"], {"greedy@1": (True, 5), "self-consistency@4": (True, 36)}),
            ([None, None, "8", "8"], {"greedy@1": (True, 12), "self-consistency@4": (True, 48)}),
        ]
    )
    b[1]["pool"]["tokens"] = [30, 2, 10, 10]
    return a, b


def _saved(path, table):
    path.write_text(json.dumps(table.to_json()))
    return path


def test_pooled_tables_equal_one_calibration_over_the_union(tmp_path):
    a, b = _pool_sets()
    who = {"model": "m", "adapter": None, "adapter_sha256": None}
    settings = {"temperature": 0.7, "max_tokens": 9}
    ta = build_table(a, 2, who, {"path": "a.jsonl", "sha256": "aa", "rows": 3}, settings)
    tb = build_table(b, 2, who, {"path": "b.jsonl", "sha256": "bb", "rows": 2}, settings)
    union = build_table(a + b, 2, who, {}, settings)
    pa, pb = _saved(tmp_path / "a.json", ta), _saved(tmp_path / "b.json", tb)
    pooled = load_table([str(pa), str(pb)], model="m")
    assert set(pooled.buckets) == set(union.buckets) == {"0/2", "1/2", "2/2", "all"}
    for name, want in union.buckets.items():
        got = pooled.buckets[name]
        assert got.prompts == want.prompts and got.probe_tokens == pytest.approx(want.probe_tokens)
        assert set(got.cells) == set(want.cells)
        for key, c in want.cells.items():
            assert got.cells[key].accuracy == pytest.approx(c.accuracy), (name, key)
            assert got.cells[key].tokens == pytest.approx(c.tokens), (name, key)
    assert pooled.data["rows"] == 5 and [p["sha256"] for p in pooled.data["parts"]] == ["aa", "bb"]
    assert choose(pooled, "1/2", 20, 100).key == choose(union, "1/2", 20, 100).key
    # a pooled table is refused on the data of any of its parts
    for part, text in (("a", "A"), ("b", "B")):
        (tmp_path / f"{part}.jsonl").write_text(text)
    pooled.data["parts"][1]["sha256"] = sha256_file(tmp_path / "b.jsonl")
    check_not_test_set(pooled, "pooled", [tmp_path / "a.jsonl"])
    with pytest.raises(ConfigError, match="E656"):
        check_not_test_set(pooled, "pooled", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    # pooling three: a pooled table's parts are checked as well
    tc = build_table(b[:1], 2, who, {"path": "c.jsonl", "sha256": "cc", "rows": 1}, settings)
    three = load_table([str(pa), str(pb), str(_saved(tmp_path / "c.json", tc))])
    assert three.buckets["all"].prompts == 6 and three.data["rows"] == 6


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda t: setattr(t, "probe", 4), "probe 4"),
        (lambda t: t.settings.update(temperature=1.0), "temperature 1.0"),
        (lambda t: setattr(t, "adapter_sha256", "other"), "another model or adapter"),
        (lambda t: setattr(t, "model", "other"), "another model or adapter"),
        (lambda t: t.buckets["all"].cells.pop("greedy@1"), "greedy@1"),
        (lambda t: t.data.update(sha256="aa"), "same calibration set (a.jsonl)"),
    ],
)
def test_tables_that_cannot_be_pooled_are_refused_with_one_line(tmp_path, edit, says):
    a, b = _pool_sets()
    who = {"model": "m", "adapter": "/r", "adapter_sha256": "s"}
    settings = {"temperature": 0.7}
    ta = build_table(a, 2, who, {"path": "a.jsonl", "sha256": "aa", "rows": 3}, dict(settings))
    tb = build_table(b, 2, who, {"path": "b.jsonl", "sha256": "bb", "rows": 2}, dict(settings))
    edit(tb)
    pa, pb = _saved(tmp_path / "a.json", ta), _saved(tmp_path / "b.json", tb)
    with pytest.raises(ConfigError) as e:
        load_table([str(pa), str(pb)])
    line = e.value.line()
    assert e.value.code == "E659" and says in line and str(pb) in line and "\n" not in line, line
    with pytest.raises(ConfigError, match="given twice"):
        load_table([str(pa), str(tmp_path / "." / "a.json")])


GOOD = {
    "kind": "mlxpt-calibration", "version": 1, "probe": 2, "model": "m", "adapter": None,
    "buckets": {"all": {"prompts": 3, "probe_tokens": 20.0,
                        "cells": {"greedy@1": {"strategy": "greedy", "n": 1, "accuracy": 0.5, "tokens": 9.0}}}},
}  # fmt: skip


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: "not json {",
        lambda t: [1, 2],
        lambda t: {**t, "kind": "other"},
        lambda t: {**t, "version": 9},
        lambda t: {**t, "probe": 0},
        lambda t: {**t, "buckets": {}},
        lambda t: {**t, "buckets": {"1/2": t["buckets"]["all"]}},
        lambda t: {**t, "buckets": {"all": {**t["buckets"]["all"], "cells": {}}}},
        lambda t: {
            **t,
            "buckets": {
                "all": {
                    **t["buckets"]["all"],
                    "cells": {"g": {"strategy": "greedy", "n": 0, "accuracy": 1, "tokens": 1}},
                }
            },
        },
        lambda t: {
            **t,
            "buckets": {
                "all": {
                    **t["buckets"]["all"],
                    "cells": {"g": {"strategy": "greedy", "n": 1, "accuracy": 1.5, "tokens": 1}},
                }
            },
        },
        lambda t: {**t, "buckets": {"all": {**t["buckets"]["all"], "probe_tokens": "x"}}},
    ],
)
def test_malformed_tables_are_refused_with_one_line(tmp_path, edit):
    path = tmp_path / "cal.json"
    obj = edit(json.loads(json.dumps(GOOD)))
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    with pytest.raises(ConfigError) as e:
        load_table(path)
    assert e.value.code == "E652" and "\n" not in e.value.line() and str(path) in e.value.line()


def _cell_edit(bucket, key, cell):
    def edit(t):
        t["buckets"][bucket]["cells"][key] = cell
        return t

    return edit


def _edit(f):
    def edit(t):
        f(t)
        return t

    return edit


CELL = {"strategy": "greedy", "n": 1, "accuracy": 0.5, "tokens": 9.0}


@pytest.mark.parametrize(
    "edit, field",
    [
        (_edit(lambda t: t["buckets"]["all"].update(prompts=-4)), "prompts=-4"),
        (_edit(lambda t: t["buckets"]["all"].update(prompts=True)), "prompts=True"),
        (_cell_edit("all", "greedy@1", {**CELL, "n": True}), "n=True"),
        (
            _cell_edit("all", "self-consistency@1000000000", {**CELL, "strategy": "self-consistency", "n": 10**9}),
            "n=1000000000",
        ),  # fmt: skip
        (_cell_edit("all", "auto@1", {**CELL, "strategy": "auto"}), "strategy='auto'"),
        (_cell_edit("all", "foo@1", {**CELL, "strategy": "foo"}), "strategy='foo'"),
        (_cell_edit("all", "greedy@1", {**CELL, "strategy": "beam", "n": 3}), "not its strategy@n (beam@3)"),
        (_edit(lambda t: t.update(data={"parts": [1]})), "data.parts[0]"),
        (_edit(lambda t: t.update(data={"parts": "x"})), "`data`"),
        (_edit(lambda t: t.update(data={"sha256": ["x"]})), "data.sha256"),
        (_edit(lambda t: t.update(data={"parts": [{"sha256": "a", "rows": -1}]})), "data.parts[0].rows"),
        (_edit(lambda t: t.update(model_sha256=5)), "model_sha256"),
        (_edit(lambda t: t["buckets"].update({"5/2": t["buckets"]["all"]})), "bucket '5/2'"),
        (lambda t: "[" * 200_000, "not JSON (RecursionError)"),  # nested too deep for the JSON reader
    ],
)
def test_hand_edited_tables_are_refused_naming_the_field(tmp_path, edit, field):
    """Values a hand edit can put in a table that would crash or hang auto later (a division by
    zero prompts, auto choosing auto, an unknown strategy, a billion samples): one E652 line."""
    path = tmp_path / "cal.json"
    obj = edit(json.loads(json.dumps(GOOD)))
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    for given in (path, [str(_saved(tmp_path / "good.json", load_table(_good(tmp_path)))), str(path)]):
        with pytest.raises(ConfigError) as e:
            load_table(given)
        line = e.value.line()
        assert e.value.code == "E652" and field in line and str(path) in line and "\n" not in line, line


def _good(tmp_path):
    path = tmp_path / "good-src.json"
    path.write_text(json.dumps({**GOOD, "data": {"path": "g.jsonl", "sha256": "g", "rows": 3}}))
    return path


def test_a_table_for_another_model_is_refused(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(GOOD))
    assert load_table(path, model="m").model == "m"
    with pytest.raises(ConfigError, match="E653") as e:
        load_table(path, model="other-model")
    assert "mlxpt eval --calibrate" in e.value.line()


# ---- through the CLI, on a tiny random model ---------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("budget") / "base")


@pytest.fixture(scope="module")
def calibrated(base, tmp_path_factory):
    """A calibration table of the tiny model on a 'validation' file, and a separate 'test' file."""
    d = tmp_path_factory.mktemp("cal")
    valid = _write(d / "valid.jsonl", [ROW, {"prompt": "1+1?", "answer": "2"}, {"prompt": "3?", "answer": "3"}])
    test = _write(d / "test.jsonl", [ROW, {"prompt": "2+2?", "answer": "4"}])
    cal = d / "cal.json"
    argv = ["eval", "--model", str(base), "--data", str(valid), "--strategies", "greedy,self-consistency",
            "--n", "1,2,4", "--max-tokens", "4", "--out", str(d / "valid-res.json"), "--calibrate", str(cal)]  # fmt: skip
    assert main(argv) == 0
    return d, valid, test, cal


def test_a_table_fits_its_model_by_fingerprint_not_by_the_text(base, tmp_path, monkeypatch):
    """A table records the model's resolved folder and fingerprint: the same model by another path
    or in a copy fits, another model (same shapes, other weights) at the same relative path does
    not; a table made with --adapter RUN --model M fits --adapter RUN alone, and the reverse."""
    from test_decode import make_adapter_run

    from mlxpt.commands.generate import model_ref

    recs = _details([(["8", "8"], {"greedy@1": (True, 6)})])
    monkeypatch.chdir(base.parent)
    table = build_table(recs, 2, identity("./base", None), {}, {})
    assert table.model == str(base.resolve()) and table.model_sha256
    path = _saved(tmp_path / "cal.json", table)
    for spelling in ("./base", "base/", str(base)):
        assert load_table(path, model=spelling).model_sha256 == table.model_sha256
    shutil.copytree(base, tmp_path / "copy")
    load_table(path, model=str(tmp_path / "copy"))
    make_model(tmp_path / "elsewhere" / "base", seed=3)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="E653") as e:
        load_table(path, model="./base")  # the same text, another model
    assert str(tmp_path / "elsewhere" / "base") in e.value.line()
    # pooling: the same model under two paths pools, another model does not
    a, b = _pool_sets()
    ta = build_table(a, 2, identity(str(base), None), {"path": "a", "sha256": "aa", "rows": 3}, {})
    tb = build_table(b, 2, identity(str(tmp_path / "copy"), None), {"path": "b", "sha256": "bb", "rows": 2}, {})
    pa, pb = _saved(tmp_path / "a.json", ta), _saved(tmp_path / "b.json", tb)
    assert load_table([str(pa), str(pb)]).model_sha256 == ta.model_sha256
    with pytest.raises(ConfigError, match="E653"):  # ./base here: the other model
        load_table([str(pa), str(pb)], model="./base")
    tc = build_table(b, 2, identity("./base", None), {"path": "b", "sha256": "bb", "rows": 2}, {})
    with pytest.raises(ConfigError, match="E659"):
        load_table([str(pa), str(_saved(tmp_path / "c.json", tc))])
    # an adapter run: with its base model given (relative here) or read from the run
    monkeypatch.chdir(base.parent)
    run = str(make_adapter_run(tmp_path / "run", base))
    for made_with in ("./base", None):
        t = build_table(recs, 2, identity(model_ref(made_with, run), run), {}, {})
        ta = _saved(tmp_path / "cal-run.json", t)
        for given in ("./base", None):
            load_table(ta, model=model_ref(given, run) or "", adapter=run)
        with pytest.raises(ConfigError, match="E653"):
            load_table(ta, model="./base")  # the base without the adapter


def test_an_older_table_without_a_fingerprint_keeps_the_text_rule(base, tmp_path, monkeypatch):
    """Tables written before the fingerprint match the --model text they were made with, as
    before; another spelling is refused with a hint that says why."""
    monkeypatch.chdir(base.parent)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**GOOD, "model": "./base"}))
    assert load_table(path, model="./base").model_sha256 is None
    with pytest.raises(ConfigError, match="E653") as e:
        load_table(path, model=str(base))
    assert "older table" in e.value.line() and "\n" not in e.value.line()


def test_eval_calibrate_writes_a_table_for_this_model(base, calibrated):
    d, valid, _, cal = calibrated
    t = load_table(cal, model=str(base))
    assert t.probe == 2 and t.data["rows"] == 3 and "all" in t.buckets
    assert {"greedy@1", "self-consistency@2", "self-consistency@4"} <= set(t.buckets["all"].cells)
    assert sum(b.prompts for k, b in t.buckets.items() if k != "all") == 3


def test_eval_auto_and_tokens_curve(base, calibrated, capsys):
    d, valid, test, cal = calibrated
    out = d / "auto.json"
    argv = ["eval", "--model", str(base), "--data", str(test), "--strategies", "greedy,self-consistency,auto",
            "--n", "1,2", "--budget", "4,40", "--calibration", str(cal), "--max-tokens", "4", "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    cap = capsys.readouterr()
    doc = json.loads(out.read_text())
    autos = [r for r in doc["results"] if r["strategy"] == "auto"]
    assert [r["budget"] for r in autos] == [4, 40] and all(sum(r["choices"].values()) == 2 for r in autos)
    choices = doc["auto_choices"]["base"]
    assert len(choices) == 4 and {c["cell"] for c in choices} == {"auto@4", "auto@40"}
    for c in choices:
        assert {"chose", "bucket", "difficulty", "spent", "budget", "correct"} <= set(c)
    curve = doc["curves"]["tokens"]
    assert set(curve) == {"greedy", "self-consistency", "auto"}
    for r in doc["results"]:
        assert r["mean_tokens"] == pytest.approx(r["generated_tokens"] / r["total"])
    assert "auto" not in doc["curves"]["samples"]
    assert "generated tokens per prompt" in cap.out and "tok/prompt" in cap.out and "auto@4:" in cap.out
    assert (d / "auto-tokens.png").read_bytes().startswith(b"\x89PNG")
    # the table was measured on valid.jsonl: evaluating valid.jsonl with it is refused
    argv[argv.index(str(test))] = str(valid)
    argv[argv.index(str(out))] = str(d / "leak.json")
    assert main(argv) == 1 and "E656" in capsys.readouterr().err and not (d / "leak.json").exists()


def test_generate_takes_a_table_by_any_path_of_its_model(base, calibrated, monkeypatch, capsys):
    _, _, _, cal = calibrated  # made with --model <absolute path>
    monkeypatch.chdir(base.parent)
    argv = ["generate", "--model", "./base", "--prompt", "hi", "--strategy", "auto", "--budget", "30",
            "--calibration", str(cal), "--max-tokens", "4"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert "auto (table):" in capsys.readouterr().err


def test_eval_samples_column_counts_the_probe(base, calibrated, capsys):
    """eval's `samples` (mean_samples) for auto is what was drawn: the probe's samples, plus what
    the chosen strategy drew beyond them."""
    d, _, test, cal = calibrated
    table = load_table(cal)  # greedy or the first probe sample is best: the probe's samples were drawn anyway
    for i, b in enumerate(table.buckets.values()):
        b.cells["greedy@1" if i % 2 else "self-consistency@1"].accuracy = 1.0
    edited = _saved(d / "cal-edited.json", table)
    out = d / "auto-samples.json"
    argv = ["eval", "--model", str(base), "--data", str(test), "--strategies", "auto", "--budget", "4,40,400",
            "--calibration", str(edited), "--max-tokens", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    doc = json.loads(out.read_text())
    drawn: dict[str, int] = {}
    for c in doc["auto_choices"]["base"]:
        s, n = c["chose"].rsplit("@", 1)
        pooled = s in ("self-consistency", "best-of-n") and c["probe"]
        got = max(c["probe"], int(n)) if pooled else c["probe"] + (1 if s == "greedy" else int(n))
        drawn[c["cell"]] = drawn.get(c["cell"], 0) + got
    assert any(c["probe"] for c in doc["auto_choices"]["base"])
    for r in doc["results"]:
        assert r["mean_samples"] * r["total"] == pytest.approx(drawn[f"auto@{r['budget']}"]), r


def test_eval_auto_with_a_mean_budget_prints_and_follows_its_plan(base, calibrated, capsys):
    d, _, test, cal = calibrated
    out = d / "auto-mean.json"
    argv = ["eval", "--model", str(base), "--data", str(test), "--strategies", "auto", "--budget", "40",
            "--budget-mode", "mean", "--calibration", str(cal), "--max-tokens", "4", "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "auto plan, mean budget 40:" in printed and "expected" in printed
    doc = json.loads(out.read_text())
    assert doc["config"]["budget_mode"] == "mean"
    table = load_table(cal)
    chosen = plan(table, 40)
    for c in doc["auto_choices"]["base"]:
        assert c["budget_mode"] == "mean"
        if c["bucket"] in chosen:
            assert c["rule"] == "table-mean" and c["chose"] == chosen[c["bucket"]].key
        else:  # a bucket the calibration prompts never reached: chosen for per prompt
            assert c["rule"] == "table"


def test_eval_and_chat_pool_several_tables(base, calibrated, tmp_path, monkeypatch, capsys):
    d, valid, test, cal = calibrated
    more = _write(tmp_path / "more.jsonl", [{"prompt": "5?", "answer": "5"}, {"prompt": "6+1?", "answer": "7"}])
    cal2 = tmp_path / "cal2.json"
    argv = ["eval", "--model", str(base), "--data", str(more), "--strategies", "greedy,self-consistency",
            "--n", "1,2,4", "--max-tokens", "4", "--out", str(tmp_path / "more-res.json"), "--calibrate", str(cal2)]  # fmt: skip
    assert main(argv) == 0
    pooled = load_table([str(cal), str(cal2)], model=str(base))
    assert pooled.buckets["all"].prompts == 5 and pooled.data["rows"] == 5
    out = tmp_path / "auto.json"
    argv = ["eval", "--model", str(base), "--data", str(test), "--strategies", "auto", "--budget", "40",
            "--budget-mode", "mean", "--calibration", str(cal), str(cal2), "--max-tokens", "4", "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["config"]["calibration"] == [str(cal), str(cal2)]
    chosen = plan(pooled, 40)
    for c in doc["auto_choices"]["base"]:
        if c["bucket"] in chosen:
            assert c["chose"] == chosen[c["bucket"]].key
    # evaluating either table's calibration set is refused, and an output may not be a table
    for data, o, code in ((more, tmp_path / "leak.json", "E656"), (test, cal2, "E")):
        bad = [*argv]
        bad[bad.index(str(test))], bad[bad.index(str(out))] = str(data), str(o)
        before = cal2.read_bytes()
        assert main(bad) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and code in err[0], err
        assert not (tmp_path / "leak.json").exists() and cal2.read_bytes() == before
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    argv = ["chat", "--model", str(base), "--strategy", "auto", "--budget", "30", "--calibration", str(cal),
            str(cal2), "--max-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "auto (table):" in capsys.readouterr().err
    assert main([*argv[:-2], str(cal), "--max-tokens", "4"]) == 1
    assert "E659" in capsys.readouterr().err


def test_tokens_series_and_chart():
    from mlxpt.commands.eval import series_of
    from mlxpt.decode.plot import TOKENS_AXIS, png_chart, terminal_chart, token_ticks

    res = [
        {"label": "base", "strategy": "greedy", "n": 1, "accuracy": 0.3, "generated_tokens": 300, "total": 10,
         "mean_samples": 1},
        {"label": "base", "strategy": "self-consistency", "n": 4, "accuracy": 0.5, "generated_tokens": 1200,
         "total": 10, "mean_samples": 4},
        {"label": "base", "strategy": "auto", "n": 100, "accuracy": 0.45, "generated_tokens": 800, "total": 10,
         "mean_samples": 2},
    ]  # fmt: skip
    s = series_of(res, "tokens")
    assert s == {"greedy": [(30.0, 0.3)], "self-consistency": [(120.0, 0.5)], "auto": [(80.0, 0.45)]}
    assert "auto" not in series_of(res)
    assert token_ticks(s) == [32.0, 64.0]
    text = terminal_chart(s, title="t", x_label=TOKENS_AXIS, ticks=token_ticks(s))
    assert TOKENS_AXIS in text and "32" in text and "64" in text
    assert png_chart(s, "t", TOKENS_AXIS, token_ticks(s)).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--strategies", "greedy,auto", "--budget", "0"], "E650"),
        (["--strategies", "greedy,auto", "--budget", "abc"], "E650"),
        (["--strategies", "greedy,auto", "--budget=-5,10"], "E650"),
        (["--strategies", "greedy,auto"], "E651"),
        (["--budget", "100"], "E651"),
        (["--strategies", "auto", "--budget", "100", "--calibration", "/no/such.json"], "E652"),
        (["--strategies", "auto", "--budget", "100", "--calibration", "BAD"], "E652"),
        (["--strategies", "auto", "--budget", "100", "--temperature", "0"], "E655"),
        (["--strategies", "auto", "--budget", "100", "--budget-mode", "mean"], "E658"),
        (["--strategies", "auto", "--budget", "100", "--budget-mode", "total"], "E658"),
        (["--strategies", "greedy", "--budget-mode", "mean"], "E658"),
        (["--probe", "0", "--calibrate", "CAL"], "E655"),
        (["--strategies", "greedy", "--calibrate", "CAL"], "E654"),
        (["--n", "1", "--calibrate", "CAL"], "E654"),
        (["--calibrate", "CAL", "--compare", "RUN"], "E657"),
        (["--strategies", "self-consistency,auto", "--budget", "9", "--calibrate", "CAL"], "E657"),
        (["--calibrate", "OUT"], "E657"),
        (["--strategies", "auto", "--budget", "100", "--calibration", "BAD", "--compare", "RUN"], "E657"),
    ],
)
def test_eval_bad_budget_flags_fail_before_loading(tmp_path, capsys, extra, code):
    data = _write(tmp_path / "t.jsonl", [ROW])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = tmp_path / "res.json"
    subst = {"BAD": str(bad), "CAL": str(tmp_path / "cal.json"), "OUT": str(out), "RUN": str(tmp_path)}
    extra = [subst.get(x, x) for x in extra]
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(out), *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and code in err[0], err
    assert not out.exists() and not (tmp_path / "cal.json").exists() and not (tmp_path / "res.png").exists()


def test_eval_refuses_a_table_of_another_model(base, calibrated, tmp_path, capsys):
    _, _, test, cal = calibrated
    other = make_model(tmp_path / "other", seed=3)
    out = tmp_path / "res.json"
    argv = ["eval", "--model", str(other), "--data", str(test), "--strategies", "auto", "--budget", "10",
            "--calibration", str(cal), "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E653" in err[0] and not out.exists()


def test_chat_auto_needs_a_budget_and_reports_its_choice(base, calibrated, monkeypatch, capsys):
    assert main(["chat", "--model", str(base), "--strategy", "auto"]) == 1
    assert "E651" in capsys.readouterr().err
    for bad in ("x", "0", "10,20"):
        assert main(["chat", "--model", str(base), "--strategy", "auto", "--budget", bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "E650" in err[0], err
    assert main(["chat", "--model", str(base), "--strategy", "auto", "--budget", "9", "--calibration", "/no"]) == 1
    assert "E652" in capsys.readouterr().err
    _, _, _, cal = calibrated
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    argv = ["chat", "--model", str(base), "--strategy", "auto", "--budget", "30", "--calibration", str(cal),
            "--max-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "auto (table):" in err and "budget tokens" in err


def test_the_cell_strategies_are_every_strategy_but_auto():
    from mlxpt.decode.budget import CELL_STRATEGIES
    from mlxpt.decode.options import STRATEGY_NAMES

    assert set(CELL_STRATEGIES) == set(STRATEGY_NAMES) - {"auto"}
