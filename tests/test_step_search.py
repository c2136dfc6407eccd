"""Step-level search (`step-beam`, `tree`) on fake models with scripted step distributions and a
byte tokenizer (exact, fast), plus the CLI on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_tts_fakes import FakeLM, byte_tokenizer
from tiny import run_config

from mlxpt.cli import main
from mlxpt.decode.options import DecodeConfig, SearchConfig, check_decode
from mlxpt.decode.sampling import SamplingConfig
from mlxpt.decode.step_search import aggregate
from mlxpt.decode.strategies import STRATEGIES, run_strategy
from mlxpt.errors import ConfigError

LINES = {"g": "g 2 + 2 = 4\n", "b": "b 2 + 2 = 5\n", "h": "h 3 + 3 = 6\n", "A": "Answer: 4\n"}
GOOD, BAD, ANSWER = LINES["g"], LINES["b"], LINES["A"]
PROMPT = "Q: what is two plus two? Show each step on its own line."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def V(tok):
    return len(tok.get_vocab())


def half_good(done: list[str]) -> dict[str, float]:
    """Two reasoning steps, each `g` (right) or `b` (wrong) with equal odds, then the answer."""
    return {"A": 1.0} if len(done) >= 2 else {"g": 0.5, "b": 0.5}


class StepLM(FakeLM):
    """A fake model that writes whole scripted lines: `choices(done_lines)` gives the odds of each
    line's first character, the rest of the line is spelled out near-deterministically, and the
    turn ends after the answer line. It checks that every history it sees starts with the prompt
    (so a wrong KV cache fails loudly) and records each forward pass's (rows, length)."""

    def __init__(self, tok, V, choices=half_good):
        self.prompt = list(tok.encode(PROMPT))
        self.shapes: list[tuple[int, int]] = []
        ids = {ch: tok.encode(ch)[0] for line in LINES.values() for ch in line}
        eos = tok.eos_token_id

        def fn(history):
            h = list(history)
            while h and h[0] == 0:  # the left padding of a batch of different-length paths
                h.pop(0)
            if len(h) < len(self.prompt):  # inside the prompt's prefill
                return np.zeros(V, np.float32)
            assert h[: len(self.prompt)] == self.prompt, "the KV cache lost the prompt"
            text = tok.decode(h[len(self.prompt) :])
            *done, cur = text.split("\n")
            logits = np.full(V, -30.0, np.float32)
            if ANSWER.strip() in done:
                logits[eos] = 30.0
            elif cur == "":
                for ch, p in choices(done).items():
                    logits[ids[ch]] = math.log(p)
            else:
                logits[ids[LINES[cur[0]][len(cur)]]] = 30.0
            return logits

        super().__init__(V, fn)

    def __call__(self, x, cache=None, **kw):
        self.shapes.append(tuple(x.shape))
        return super().__call__(x, cache=cache, **kw)


class FakePRM:
    """score_many by each step's first character (the PRM API of decode/prm.py)."""

    VALUES = {"g": 0.9, "h": 0.6, "b": 0.1, "A": 1.0}

    def __init__(self):
        self.calls: list[list[list[str]]] = []

    def score_many(self, prompt, step_lists):
        self.calls.append(step_lists)
        return [[self.VALUES[s[0]] for s in steps] for steps in step_lists]


def search(lm, strategy="step-beam", scorer="verifier", seed=0, max_tokens=64, on_samples=None, **search_kw):
    cfg = DecodeConfig(
        strategy, 2, max_tokens, SamplingConfig(temperature=1.0, seed=seed), scorer, search=SearchConfig(**search_kw)
    )
    return run_strategy(lm, lm_tok[0], lm.prompt, cfg, prompt=PROMPT, on_samples=on_samples)


lm_tok: list = []  # the module's tokenizer, for `search`


@pytest.fixture(autouse=True)
def _tok(tok):
    lm_tok[:] = [tok]


def steps_of(text: str) -> list[str]:
    return [line + "\n" for line in text.split("\n")[:-1]]


def test_strategies_are_registered():
    assert {"step-beam", "tree"} <= set(STRATEGIES)


def test_step_beam_with_the_verifier_finds_the_right_steps(tok, V):
    lm = StepLM(tok, V)
    r = search(lm, beam_width=2, expand=3)
    assert r.text == GOOD + GOOD + ANSWER and r.answer == "4"
    assert r.search["step_scores"] == [1.0, 1.0, 1.0] and r.stopped_by == "solution"
    # the log-prob scorer cannot tell a wrong step from a right one here: it keeps both kinds
    r = search(StepLM(tok, V), scorer="logprob", beam_width=2, expand=3, seed=1)
    assert any(BAD in s for s in r.samples)


def test_children_never_reprefill_their_parents(tok, V):
    lm = StepLM(tok, V)
    drawn: list = []
    r = search(lm, beam_width=2, expand=3, on_samples=drawn.append)
    P = len(lm.prompt)
    # prompt once, then every kept (expanded) step once: 2 beams x 2 reasoning steps of 12 tokens
    assert r.prefilled_tokens == P + 2 * 2 * len(GOOD)
    prefills = [length for rows, length in lm.shapes if length > 1]
    assert prefills[0] == P - 1  # the prompt (its last token goes with the first logits)
    assert all(length == len(GOOD) for length in prefills[1:])  # a step alone, never parent + step
    assert sum(prefills) + 1 == r.prefilled_tokens
    # every generated token of the search is counted, the pruned and unkept steps included
    assert r.generated_tokens == sum(len(c.tokens) for group in drawn for c in group)
    assert r.generated_tokens == 6 * 12 + 6 * 12 + 6 * len(ANSWER)  # 2 beams x 3 expansions per step


def test_dvts_keeps_the_best_of_each_subtree(tok, V):
    def three_way(done):
        return {"A": 1.0} if len(done) >= 2 else {"g": 1 / 3, "h": 1 / 3, "b": 1 / 3}

    for seed in range(40):  # a seed whose first draw puts both right steps in one subtree
        drawn: list = []
        r = search(StepLM(tok, V, three_way), scorer=FakePRM(), seed=seed, beam_width=2, expand=2, dvts=True,
                   on_samples=drawn.append)  # fmt: skip
        first = [c.text[0] for c in drawn[0]]  # the root's 4 first steps: subtrees [0, 1] and [2, 3]
        if sorted(first[:2]) == ["g", "h"] and first[2:] == ["b", "b"]:
            break
    else:
        pytest.skip("no seed gave the split")
    assert [s[0] for s in r.samples] == ["g", "b"]  # one solution per subtree, even the worse one
    plain = search(StepLM(tok, V, three_way), scorer=FakePRM(), seed=seed, beam_width=2, expand=2)
    assert all(s[0] != "b" for s in plain.samples)  # plain beam keeps the two best overall
    assert len(set(plain.samples)) == 2


@pytest.mark.parametrize("strategy", ["step-beam", "tree"])
def test_identical_partial_solutions_take_one_beam_slot(tok, V, strategy):
    def always_good(done):  # every sample of a step is the same line: no diversity to keep
        return {"A": 1.0} if len(done) >= 2 else {"g": 1.0}

    drawn: list = []
    r = search(StepLM(tok, V, always_good), strategy, beam_width=2, expand=3, on_samples=drawn.append)
    assert r.samples == [GOOD + GOOD + ANSWER]  # one solution, not two copies of it
    assert r.prefilled_tokens == len(StepLM(tok, V).prompt) + 2 * len(GOOD)  # one beam kept per step
    root = 6 if strategy == "step-beam" else 3  # step-beam's root draws width x expand
    assert [len(group) for group in drawn] == [root, 3, 3]  # then one beam is expanded per step


def test_step_aggregates():
    assert aggregate([0.5, 0.2, 0.9], "min") == 0.2
    assert aggregate([0.5, 0.2, 0.9], "last") == 0.9
    assert math.isclose(aggregate([0.5, 0.2, 0.9], "product"), 0.09)
    assert aggregate([], "min") == 1.0


def test_prm_scores_every_prefix_and_the_aggregate_decides(tok, V):
    prm = FakePRM()
    r = search(StepLM(tok, V), scorer=prm, beam_width=2, expand=3, aggregate="min")
    assert r.text == GOOD + GOOD + ANSWER
    assert r.search["step_scores"] == [0.9, 0.9, 1.0] and r.scores[0] == 0.9
    assert all(not s.endswith("\n") for call in prm.calls for steps in call for s in steps)  # delimiter cut
    last = search(StepLM(tok, V), scorer=FakePRM(), beam_width=2, expand=3, aggregate="last")
    assert last.scores[0] == 1.0  # last: the answer step's score alone
    prod = search(StepLM(tok, V), scorer=FakePRM(), beam_width=2, expand=3, aggregate="product")
    assert math.isclose(prod.scores[0], 0.81)


def test_prm_plus_verifier_drops_a_slip_the_prm_is_fooled_by(tok, V):
    """A PRM that likes the step with wrong arithmetic (`b`: 2 + 2 = 5) leads a plain PRM search
    into it; `prm+verifier` multiplies each step's PRM score by the verifier's check, so that step
    scores 0 and the search keeps the right one."""
    from mlxpt.decode.scorers import Scorer

    class Fooled(FakePRM):
        VALUES = {"g": 0.6, "h": 0.6, "b": 0.9, "A": 1.0}

    plain = search(StepLM(tok, V), scorer=Fooled(), beam_width=1, expand=4, seed=3)
    assert BAD in plain.text and plain.search["step_scores"][0] == 0.9
    both = Scorer("prm+verifier:fake", lambda p, c, r: [0.0] * len(c))
    both.prm, both.verify_steps = Fooled(), True
    r = search(StepLM(tok, V), scorer=both, beam_width=1, expand=4, seed=3)
    assert r.text == GOOD + GOOD + ANSWER and r.search["step_scores"] == [0.6, 0.6, 1.0]


def test_step_checks_per_step_and_the_final_answer():
    from mlxpt.decode.scorers import prm_run, step_checks

    assert step_checks(["2 + 2 = 4", "2 + 2 = 5, 3 * 3 = 9", "Answer: 4"], True) == [1.0, 0.5, 1.0]
    assert step_checks(["two and two", "so four"], True) == [1.0, 0.0]  # finished, no answer
    assert step_checks(["two and two", "so four"], False) == [1.0, 1.0]  # may still give one
    assert prm_run("prm+verifier:runs/x") == "runs/x" and prm_run("prm:runs/y") == "runs/y"
    assert prm_run("rm:runs/x") is None and prm_run(None) is None and prm_run("prm:") is None


def test_best_of_n_with_prm_plus_verifier_takes_the_lowest_product(tmp_path, monkeypatch):
    import mlxpt.decode.scorers as scorers

    monkeypatch.setattr(scorers, "load_prm", lambda run, tokenizer=None: FakePRM())
    both = scorers.make_scorer(f"prm+verifier:{tmp_path}")
    plain = scorers.make_scorer(f"prm:{tmp_path}")
    texts = ["g 2 + 2 = 4\nAnswer: 4", "b 2 + 2 = 5\nAnswer: 5", "g two and two\nh so four"]
    assert plain(PROMPT, texts) == [0.9, 0.1, 0.6]
    assert both(PROMPT, texts) == [0.9, 0.0, 0.0]  # a slip, and no final answer, score 0
    with pytest.raises(ConfigError, match="E628"):
        check_decode(DecodeConfig("best-of-n", scorer=f"prm+verifier:{tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="E622"):
        check_decode(DecodeConfig("best-of-n", scorer="prm+verify:x"))


def test_a_prm_giving_the_wrong_shape_is_a_clear_error(tok, V):
    class Short(FakePRM):
        def score_many(self, prompt, step_lists):
            return [s[:-1] for s in super().score_many(prompt, step_lists)]

    with pytest.raises(ConfigError, match="E629"):
        search(StepLM(tok, V), scorer=Short(), beam_width=1, expand=2)


def test_tree_bfs_prunes_wrong_steps(tok, V):
    r = search(StepLM(tok, V), "tree", beam_width=2, expand=3, prune_threshold=0.5)
    assert r.search["pruned"] > 0 and r.text == GOOD + GOOD + ANSWER
    assert all(BAD not in s for s in r.samples)
    always_wrong = search(StepLM(tok, V, lambda done: {"b": 1.0}), "tree", expand=2, prune_threshold=0.5)
    assert always_wrong.stopped_by == "exhausted" and always_wrong.search["solutions"] == 0
    assert always_wrong.search["pruned"] == 2


def test_tree_dfs_backtracks_from_dead_ends(tok, V):
    def dead_end_after_g(done):  # g looks best first, but only wrong steps follow it
        if not done:
            return {"g": 0.5, "h": 0.5}
        if done == ["g 2 + 2 = 4"]:
            return {"b": 1.0}
        return {"A": 1.0} if len(done) >= 2 else {"g": 1.0}

    for seed in range(10):
        r = search(StepLM(tok, V, dead_end_after_g), "tree", FakePRM(), seed, tree_search="dfs", expand=4,
                   prune_threshold=0.5)  # fmt: skip
        if r.search["backtracks"]:
            break
    assert r.search["backtracks"] >= 1 and r.stopped_by == "solution"
    assert r.text == LINES["h"] + GOOD + ANSWER and r.answer == "4"


@pytest.mark.parametrize(
    "limit, value, check",
    [
        ("max_nodes", 4, lambda r: r.search["nodes"] == 4),
        ("max_search_tokens", 30, lambda r: r.generated_tokens <= 30),
        ("max_seconds", 1e-9, lambda r: r.generated_tokens == 0),
    ],
)
@pytest.mark.parametrize("strategy", ["step-beam", "tree"])
def test_hard_limits_stop_the_search_and_are_reported(tok, V, strategy, limit, value, check):
    r = search(StepLM(tok, V), strategy, beam_width=2, expand=3, **{limit: value})
    assert r.stopped_by == limit.replace("_", "-") and check(r)


def test_max_steps_ends_solutions(tok, V):
    r = search(StepLM(tok, V), max_steps=1, beam_width=1, expand=2)
    assert len(steps_of(r.text)) == 1 and r.stopped_by == "max-steps" and r.finish_reasons[0] == "max-steps"


@pytest.mark.parametrize(
    "kw, code",
    [
        ({"expand": 0}, "E631"),
        ({"beam_width": 0}, "E631"),
        ({"delimiter": ""}, "E632"),
        ({"aggregate": "mean"}, "E633"),
        ({"max_steps": 0}, "E634"),
        ({"tree_search": "astar"}, "E635"),
        ({"prune_threshold": math.nan}, "E636"),
        ({"max_nodes": 0}, "E637"),
        ({"max_search_tokens": -1}, "E637"),
        ({"max_seconds": 0}, "E637"),
        ({"dvts": True}, "E627"),  # with tree
    ],
)
def test_bad_search_settings_are_refused_before_any_model(kw, code):
    with pytest.raises(ConfigError, match=code):
        check_decode(DecodeConfig("tree", 2, 64, search=SearchConfig(**kw)))


def test_bad_scorer_specs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="E628"):
        check_decode(DecodeConfig("step-beam", scorer=f"prm:{tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="E627"):  # every expansion the same
        check_decode(DecodeConfig("step-beam", sampling=SamplingConfig(temperature=0.0)))
    greedy = SamplingConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="E627: temperature 0 makes the beam's 3 first steps the same"):
        check_decode(DecodeConfig("step-beam", 3, sampling=greedy, search=SearchConfig(expand=1)))
    check_decode(DecodeConfig("step-beam", 1, sampling=greedy, search=SearchConfig(expand=1)))  # one path: fine


# ---- the CLI on a tiny random model --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tiny_dir


@pytest.mark.parametrize("extra", [[], ["--strategy", "tree", "--tree-search", "dfs", "--prune-threshold", "0"]])
def test_cli_generate_runs_step_search_on_a_tiny_model(tiny, capsys, extra):
    argv = ["generate", "--model", str(tiny), "--prompt", "2 + 2?", "--max-tokens", "12", "--seed", "0",
            "--strategy", "step-beam", "--beam-width", "2", "--expand", "2", "--step-delimiter", " ", "--max-steps", "3"]  # fmt: skip
    assert main(argv + extra) == 0
    err = capsys.readouterr().err
    assert "[search:" in err and "tokens prefilled" in err and "stopped by" in err


@pytest.mark.parametrize(
    "flags, code",
    [
        (["--expand", "0"], "E631"),
        (["--expand", "two"], "E637"),
        (["--beam-width", "-1"], "E631"),
        (["--step-delimiter", ""], "E632"),
        (["--step-aggregate", "mean"], "E633"),
        (["--max-steps", "0"], "E634"),
        (["--tree-search", "astar"], "E635"),
        (["--prune-threshold", "nan"], "E636"),
        (["--prune-threshold", "high"], "E637"),
        (["--max-nodes", "0"], "E637"),
        (["--max-search-tokens", "0"], "E637"),
        (["--max-seconds", "-1"], "E637"),
        (["--dvts", "--strategy", "tree"], "E627"),
    ],
)
def test_cli_bad_search_flags_are_one_line_errors(tmp_path, capsys, flags, code):
    argv = ["generate", "--model", str(tmp_path / "never-loaded"), "--prompt", "hi", "--strategy", "step-beam"]
    assert main(argv + flags) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and code in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_built_scorer_is_used_per_step(tok, V):
    """`mlxpt eval` hands strategies a built Scorer: step search reads it per step where it can."""
    from mlxpt.decode.scorers import make_scorer

    built = search(StepLM(tok, V), scorer=make_scorer("verifier"), beam_width=2, expand=3)
    spec = search(StepLM(tok, V), scorer="verifier", beam_width=2, expand=3)
    assert built.text == spec.text == GOOD + GOOD + ANSWER and built.scores == spec.scores


def test_a_real_prm_run_guides_step_beam_through_the_cli(tiny, tmp_path, capsys, monkeypatch):
    """`--scorer prm:RUN` loads the process reward model of a (1-step) `mlxpt train prm` run, and
    the search cuts its steps at the PRM's own delimiter (a space here) unless told otherwise; a
    different `--step-delimiter` is one line (E638) before anything is generated."""
    import json

    from mlxpt.config import PRMConfig
    from mlxpt.decode import batch
    from mlxpt.train.prm import run_prm

    rows = [{"prompt": f"Check {i}.", "completions": ["1 = good", "2 = bad"], "labels": [True, False]}
            for i in range(8)]  # fmt: skip
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir, outcome = run_prm(run_config(PRMConfig, tiny, tmp_path, tmp_path, steps=1, step_delimiter=" "))
    assert outcome == "finished"
    stops: list = []
    real = batch.generate_from
    monkeypatch.setattr(batch, "generate_from", lambda *a, **k: stops.append(a[6]) or real(*a, **k))
    argv = ["generate", "--model", str(tiny), "--prompt", "2 + 2?", "--max-tokens", "10", "--seed", "0",
            "--strategy", "step-beam", "--beam-width", "2", "--expand", "2",
            "--max-steps", "3", "--scorer", f"prm:{run_dir}"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    scores = [float(x) for x in err.split("step scores: ")[1].split("]")[0].split(", ")]
    assert scores and all(0 < x < 1 for x in scores)  # the PRM's sigmoid, one per step
    assert stops and set(stops) == {(" ",)}  # every expansion stops at the PRM's delimiter
    assert main([*argv, "--step-delimiter", " "]) == 0  # the same one, given: fine
    capsys.readouterr()
    stops.clear()
    for flag in ("\\n", ";"):
        assert main([*argv, "--step-delimiter", flag]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error E638") and "' '" in lines[0], lines
    assert stops == []  # refused before any step was generated


def test_a_prm_scorer_brings_its_own_step_delimiter(tmp_path, monkeypatch):
    """The delimiter a step search cuts at: the one given, else the PRM's (read from its run's
    config before anything loads), else a newline; a given one the PRM was not trained with is
    E638 from check_decode, step search itself and eval's checks. Best-of-N cuts a completion
    into steps at the PRM's delimiter too."""
    import json

    import mlxpt.decode.scorers as scorers
    from mlxpt.config import PRMConfig
    from mlxpt.decode.evaluate import EvalConfig, check_config
    from mlxpt.decode.step_search import make_step_scorer

    run = tmp_path / "prm"
    run.mkdir()
    saved = {"method": "prm", **PRMConfig().to_dict()}
    saved["prm"]["step_delimiter"] = "\\n\\n"  # as `--step-delimiter '\n\n'` saves it
    (run / "config.json").write_text(json.dumps(saved))
    spec = f"prm:{run}"
    assert scorers.search_delimiter(spec, None) == "\n\n" and scorers.search_delimiter(spec, "\n\n") == "\n\n"
    assert scorers.search_delimiter("verifier", None) == "\n" and scorers.search_delimiter("verifier", ";") == ";"
    check_decode(DecodeConfig("step-beam", scorer=spec))
    for cfg in (DecodeConfig("step-beam", scorer=spec, search=SearchConfig(delimiter="\n")),
                DecodeConfig("tree", scorer=f"prm+verifier:{run}", search=SearchConfig(delimiter=";"))):  # fmt: skip
        with pytest.raises(ConfigError, match=r"E638: --step-delimiter .* is not the step delimiter '\\n\\n'"):
            check_decode(cfg)
    with pytest.raises(ConfigError, match="E638"):
        check_config(EvalConfig(strategies=["step-beam"], scorer=spec, search=SearchConfig(delimiter="\n")))
    prm = FakePRM()
    prm.delimiter = ";"
    with pytest.raises(ConfigError, match="E638"):
        make_step_scorer(prm, None, lm_tok[0], delimiter="\n")
    monkeypatch.setattr(scorers, "load_prm", lambda run, tokenizer=None: prm)
    texts = ["g 2 + 2 = 4;b 2 + 2 = 5;Answer: 4", "g one\nh two;Answer: 4"]
    assert scorers.make_scorer(spec)(PROMPT, texts) == [0.1, 0.9]  # steps end at ';', not at newlines
    assert prm.calls[-1] == [["g 2 + 2 = 4", "b 2 + 2 = 5", "Answer: 4"], ["g one\nh two", "Answer: 4"]]


def test_eval_passes_search_flags_and_the_scorer_to_step_search(tiny, tmp_path, monkeypatch):
    """`mlxpt eval --strategies step-beam` takes the search flags and --scorer (not logprob silently)."""
    import json

    import mlxpt.decode.scorers as scorers

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(2)))
    built = []
    real = scorers.make_scorer
    monkeypatch.setattr(scorers, "make_scorer", lambda spec, *a, **k: built.append(spec) or real(spec, *a, **k))
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny), "--data", str(data), "--strategies", "step-beam", "--n", "2",
            "--max-tokens", "8", "--scorer", "verifier", "--expand", "3", "--step-delimiter", " ",
            "--max-steps", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert built == ["verifier"]
    import argparse

    from mlxpt.commands import eval as eval_command

    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    cfg = eval_command.config_from(parser.parse_args(argv))
    assert (cfg.search.expand, cfg.search.delimiter, cfg.search.max_steps) == (3, " ", 2)


def test_eval_refuses_bad_search_flags_before_loading(tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "never-loaded"), "--strategies", "step-beam", "--expand", "0",
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "E631" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_generate_takes_auto_with_a_budget(tiny, capsys, tmp_path):
    argv = ["generate", "--model", str(tiny), "--prompt", "2 + 2?", "--max-tokens", "6", "--seed", "0",
            "--strategy", "auto"]  # fmt: skip
    assert main(argv + ["--budget", "24"]) == 0
    assert "auto" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "never-loaded"), "--prompt", "x", "--strategy", "auto"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "E651" in lines[0], lines


def test_equal_values_go_to_the_likelier_partial_solution(tok, V):
    def mostly_h(done):  # two steps the verifier both calls right; h is four times likelier
        return {"A": 1.0} if len(done) >= 2 else {"g": 0.2, "h": 0.8}

    for seed in range(40):  # a seed whose root draws g first (sample order alone would keep it)
        drawn: list = []
        r = search(StepLM(tok, V, mostly_h), beam_width=1, expand=3, seed=seed, on_samples=drawn.append)
        first = [c.text[0] for c in drawn[0]]
        if first[0] == "g" and "h" in first:
            break
    else:
        pytest.skip("no seed drew g before h")
    assert r.search["step_scores"][0] == 1.0 and r.search["steps"][0].startswith("h")


@pytest.mark.parametrize("likelier", [0, 1])
def test_best_of_n_ties_go_to_the_likelier_sample(likelier):
    """The verifier gives 1.0 to every sample with right arithmetic: a tie goes to the sample the
    model finds likelier (mean log-prob), not to the one drawn first (as in step-beam's rank)."""
    from mlxpt.decode.batch import Completion
    from mlxpt.decode.strategies import DecodeContext, best_of_n

    texts = ["1 + 1 = 2\nAnswer: 2", "1 + 2 = 3\nAnswer: 3"]
    pool = [Completion([1, 2], t, "stop", [-0.2 if i == likelier else -2.0] * 2) for i, t in enumerate(texts)]
    cfg = DecodeConfig("best-of-n", 2, 8, SamplingConfig(temperature=1.0, seed=0), "verifier")
    r = best_of_n(None, None, [0], cfg, DecodeContext(prompt="q", pool=pool))
    assert r.scores == [1.0, 1.0] and r.answer == ["2", "3"][likelier]
