"""`mlxpt eval` and the strategy switch of `mlxpt generate` / `mlxpt chat` (fast: fake and tiny models)."""

from __future__ import annotations

import io
import json
import struct

import pytest
from test_decode import make_adapter_run
from test_tts_fakes import FakeLM, byte_tokenizer, scripted
from tiny import make_model

from mlxpt.cli import main
from mlxpt.decode.evaluate import EvalConfig, evaluate, parse_ns, read_rows
from mlxpt.decode.plot import png_chart, terminal_chart
from mlxpt.errors import ConfigError, DataError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROW = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer: 8"}], "answer": "8"}


def test_read_rows_accepts_chat_and_prompt_rows(tmp_path):
    f = _write(tmp_path / "t.jsonl", [ROW, {"prompt": "2+2?", "answer": 4}, ""])
    rows = read_rows(f)
    assert [r.answer for r in rows] == ["8", "4"] and rows[0].messages == [{"role": "user", "content": "Q?"}]
    assert rows[1].messages == [{"role": "user", "content": "2+2?"}] and rows[0].line == 1
    assert len(read_rows(f, limit=1)) == 1


def test_bad_eval_data_gives_one_line_per_row_with_file_and_line(tmp_path):
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "missing.jsonl")
    assert e.value.code == "E623"
    f = _write(tmp_path / "bad.jsonl", [ROW, {"messages": ROW["messages"]}, "{not json", {"answer": "3"}, "[1]"])
    with pytest.raises(DataError) as e:
        read_rows(f)
    errs = e.value.errors
    assert [x.code for x in errs] == ["E624"] * 4
    assert [x.where for x in errs] == [f"{f}:{i}" for i in (2, 3, 4, 5)]
    assert "answer" in errs[0].what and all("\n" not in x.line() for x in errs)


def test_parse_ns():
    assert parse_ns("16,1,4,4") == (1, 4, 16)
    for bad in ("0,2", "a", "", "-1"):
        with pytest.raises(ConfigError) as e:
            parse_ns(bad)
        assert e.value.code == "E621"


def test_evaluate_on_a_scripted_model(tmp_path):
    """The model answers 7 (p 0.4), 8 (0.35, the gold answer) or 9 (0.25): greedy says 7; with
    enough samples self-consistency finds 7 too, and an oracle best-of-n finds 8."""
    tok = byte_tokenizer(tmp_path)
    from mlxpt.decode.generate import chat_prompt

    rows = read_rows(_write(tmp_path / "t.jsonl", [ROW] * 3))
    plen = len(chat_prompt(tok, rows[0].messages))
    V = len(tok.get_vocab())
    lm = FakeLM(V, scripted(tok, plen, [("Answer: 7", 0.4), ("so 8", 0.35), ("x 9", 0.25)], V))
    cfg = EvalConfig(
        strategies=("greedy", "sample", "best-of-n", "self-consistency", "adaptive", "beam"),
        ns=(1, 4, 16),
        max_tokens=20,
        temperature=1.0,
        scorer="reward:accuracy",
    )
    res = {(r["strategy"], r["n"]): r for r in evaluate(lm, tok, rows, cfg)}
    assert set(res) == {
        ("greedy", 1), ("sample", 1), ("adaptive", 16),
        *[(s, n) for s in ("best-of-n", "self-consistency", "beam") for n in (1, 4, 16)],
    }  # fmt: skip
    assert res[("greedy", 1)]["accuracy"] == 0.0 and res[("greedy", 1)]["total"] == 3
    assert res[("best-of-n", 16)]["accuracy"] == 1.0  # the oracle finds the right sample
    assert res[("best-of-n", 16)]["generated_tokens"] > res[("best-of-n", 1)]["generated_tokens"]
    assert 1 <= res[("adaptive", 16)]["mean_samples"] <= 16
    assert res[("self-consistency", 16)]["mean_samples"] == 16
    for r in res.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] >= 0
    again = {(r["strategy"], r["n"]): r["accuracy"] for r in evaluate(lm, tok, rows, cfg)}
    assert again == {k: v["accuracy"] for k, v in res.items()}  # seeded per prompt: reproducible


def test_charts_draw_every_series():
    series = {"greedy": [(1, 0.2)], "self-consistency": [(1, 0.2), (4, 0.3), (16, 0.35)]}
    text = terminal_chart(series)
    assert "o greedy" in text and "* self-consistency" in text and "16" in text
    png = png_chart(series, title="accuracy vs samples, 3 prompts")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (900, 480)


def test_png_chart_is_a_matplotlib_figure_with_every_series(monkeypatch):
    """The PNG is drawn by matplotlib: every series is a line in the legend, the x axis is log2
    with ticks at the budgets, the y axis in percent."""
    from matplotlib.figure import Figure

    seen = {}
    real = Figure.savefig

    def keep(fig, *a, **kw):
        seen["ax"] = fig.axes[0]
        return real(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    png_chart({"greedy": [(1, 0.2)], "best-of-n": [(1, 0.2), (4, 0.3), (16, 0.45)]}, title="t")
    ax = seen["ax"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["greedy", "best-of-n"]
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [1, 4, 16]
    assert ax.get_ylim() == (0, 50)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("eval") / "base")


@pytest.fixture(scope="module")
def adapter_run(base, tmp_path_factory):
    return make_adapter_run(tmp_path_factory.mktemp("eval-run") / "run", base)


def test_eval_cli_compare_writes_table_json_and_png(base, adapter_run, tmp_path, capsys):
    data = _write(tmp_path / "t.jsonl", [ROW, {"prompt": "1+1?", "answer": "2"}])
    out = tmp_path / "res.json"
    code = main(
        ["eval", "--model", str(base), "--compare", str(adapter_run), "--data", str(data), "--n", "1,2",
         "--strategies", "greedy,best-of-n,self-consistency,adaptive", "--max-tokens", "4", "--out", str(out)]
    )  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert {r["adapter"] for r in rows} == {None, str(adapter_run)}
    assert len(rows) == 2 * (1 + 2 + 2 + 1)
    for r in rows:
        assert {"strategy", "n", "accuracy", "generated_tokens", "seconds", "model", "adapter"} <= set(r)
    assert "self-consistency" in cap.out and "accuracy" in cap.out and "%" in cap.out
    assert (tmp_path / "res.png").read_bytes().startswith(b"\x89PNG")
    progress = [line for line in cap.err.splitlines() if "prompts, " in line]  # not a terminal: lines, no \r
    assert "\r" not in cap.err and [p.split(" prompts")[0] for p in progress] == [
        "[base] 1/2",
        "[base] 2/2",
        "[adapter] 1/2",
        "[adapter] 2/2",
    ], cap.err


def test_charts_that_cannot_be_written_leave_the_results_and_no_stale_charts(base, tmp_path, capsys, monkeypatch):
    """A full disk at the charts once left the new results beside the previous run's charts
    (which the results name as theirs), with a hint about a checkpoint."""
    import mlxpt.decode.plot as plot

    data = _write(tmp_path / "t.jsonl", [ROW])
    out = tmp_path / "res.json"
    for old in ("res.json", "res.png", "res-tokens.png"):
        (tmp_path / old).write_bytes(b"an earlier run's")

    def full(path, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot, "write_png", full)
    argv = ["eval", "--model", str(base), "--data", str(data), "--strategies", "greedy", "--max-tokens", "4"]
    assert main([*argv, "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error E312: the results are saved in") and "charts could not be written" in err
    assert json.loads(out.read_text())["results"] and not (tmp_path / "res.png").exists()
    assert not (tmp_path / "res-tokens.png").exists()


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--strategies", "greedy,vote"], "E620"),
        (["--strategies", "greedy", "--calibration", "t.json"], "E651"),  # read by nothing: once accepted
        (["--n", "0"], "E621"),
        (["--scorer", "bogus"], "E622"),
        (["--data", "/no/such.jsonl"], "E623"),
        (["--temperature", "0"], "E626"),
    ],
)
def test_eval_bad_inputs_fail_before_loading(tmp_path, capsys, extra, code):
    data = _write(tmp_path / "t.jsonl", [ROW])
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and code in err[0], err


def test_eval_row_without_answer_is_reported_with_its_line(tmp_path, capsys):
    data = _write(tmp_path / "t.jsonl", [ROW, {"prompt": "hi"}])
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "E624" in err and f"{data}:2" in err


# ---- generate / chat with a strategy ---------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "shows"),
    [
        (["--strategy", "best-of-n", "--scorer", "verifier"], "[scores:"),
        (["--strategy", "self-consistency", "--adaptive"], "[votes"),
        (["--strategy", "beam"], "[scores:"),
        (["--strategy", "sample", "--n", "3"], "[sample: 3 samples"),
    ],
)
def test_generate_with_a_strategy_prints_answer_and_votes_or_scores(base, capsys, strategy, shows):
    argv = ["generate", "--model", str(base), "--prompt", "hi", "--max-tokens", "6", "--n", "4", *strategy]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert shows in cap.err and cap.out.strip() != ""


def test_generate_strategy_errors_are_one_line(base, capsys):
    for extra, code in [
        (["--strategy", "magic"], "E620"),
        (["--strategy", "best-of-n", "--n", "0"], "E621"),
        (["--strategy", "best-of-n", "--scorer", "rm:/nope"], "E622"),
        (["--strategy", "best-of-n", "--temperature", "0"], "E626"),
        (["--budget", "100"], "E651"),  # auto's settings without auto: once ignored
        (["--strategy", "beam", "--temperature", "0.9"], "E626"),  # beam is deterministic: once ignored
        (["--strategy", "best-of-n", "--adaptive"], "E626"),
        (["--strategy", "greedy", "--calibration", "t.json"], "E651"),
        (["--raw", "--system", "be brief"], "E608"),
    ]:
        assert main(["generate", "--model", "/no/model", "--prompt", "hi", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and code in err[0], err


def test_chat_switches_strategy_and_shows_votes(base, monkeypatch, capsys):
    script = "/strategy self-consistency\n/n 3\nhello\n/n zero\n/strategy nope\n/strategy greedy\nhello again\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(base), "--max-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "[strategy self-consistency, n 8" in err and "n 3" in err
    assert "[votes" in err and "[self-consistency: 3 samples" in err
    assert "not a whole number" in err and "E620" in err
    assert "[strategy greedy, n 3, scorer logprob, temperature 0]" in err


def test_independent_mode_times_each_cell_on_its_own(tmp_path):
    tok = byte_tokenizer(tmp_path)
    from mlxpt.decode.generate import chat_prompt

    rows = read_rows(_write(tmp_path / "t.jsonl", [ROW] * 2))
    plen = len(chat_prompt(tok, rows[0].messages))
    V = len(tok.get_vocab())
    lm = FakeLM(V, scripted(tok, plen, [("Answer: 8", 0.9), ("x 9", 0.1)], V))
    cfg = EvalConfig(strategies=("self-consistency", "adaptive"), ns=(1, 4), max_tokens=20, temperature=1.0)
    details: list = []
    res = evaluate(lm, tok, rows, cfg.__class__(**{**cfg.__dict__, "independent": True}), details=details)
    assert {(r["strategy"], r["n"]) for r in res} == {("self-consistency", 1), ("self-consistency", 4), ("adaptive", 4)}
    assert not any(r["seconds_estimated"] for r in res)
    assert len(details) == 2 and "pool" not in details[0] and details[0]["answers"]["self-consistency@4"][0] == "8"


def test_eval_several_data_sets_side_by_side(base, adapter_run, tmp_path, capsys):
    """Two --data sets: each model loaded once, scored on both, and a summary with one column per set."""
    (tmp_path / "ind").mkdir()
    (tmp_path / "ood").mkdir()
    a = _write(tmp_path / "ind" / "test.jsonl", [ROW, {"prompt": "1+1?", "answer": "2"}])
    b = _write(tmp_path / "ood" / "test.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    out = tmp_path / "res.json"
    argv = ["eval", "--model", str(base), "--compare", str(adapter_run), "--data", str(a), "--data", str(b),
            "--strategies", "greedy", "--max-tokens", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cap = capsys.readouterr()
    doc = json.loads(out.read_text())
    got = {(r["label"], r["data"]): r["total"] for r in doc["results"]}
    assert got == {("base", "ind/test"): 2, ("base", "ood/test"): 1, ("adapter", "ind/test"): 2,
                   ("adapter", "ood/test"): 1}  # fmt: skip
    assert doc["data"] == {"ind/test": str(a), "ood/test": str(b)} and doc["prompts"] == 3
    summary = [line for line in cap.out.splitlines() if line.startswith(("base ", "adapter "))][-2:]
    head = next(line for line in cap.out.splitlines() if "ind/test" in line and "ood/test" in line)
    assert head.split()[-2:] == ["ind/test", "ood/test"]
    assert all(line.count("%") == 2 for line in summary), cap.out


def test_batched_greedy_matches_one_by_one(base, tmp_path):
    """`greedy_batch` > 1 decodes prompts together (left-padded): the same answers as one by one."""
    from mlxpt.models.loader import load

    rows = read_rows(
        _write(tmp_path / "t.jsonl", [{"prompt": p, "answer": "1"} for p in ("a", "bb b", "ccc cc c", "d d")])
    )
    model, tok = load(str(base))
    one = EvalConfig(strategies=("greedy",), max_tokens=6, greedy_batch=1)
    together = EvalConfig(strategies=("greedy",), max_tokens=6, greedy_batch=4)
    d1, d4 = [], []
    r1, r4 = evaluate(model, tok, rows, one, details=d1), evaluate(model, tok, rows, together, details=d4)
    assert [d["answers"]["greedy@1"] for d in d1] == [d["answers"]["greedy@1"] for d in d4]
    assert r1[0]["total"] == r4[0]["total"] == 4 and r1[0]["generated_tokens"] == r4[0]["generated_tokens"]


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_eval_never_writes_over_its_data(tmp_path, capsys, flag):
    """--out or --plot naming one of the --data files is refused before any work; the file is kept."""
    data = _write(tmp_path / "t.jsonl", [ROW])
    other = _write(tmp_path / "u.jsonl", [ROW])
    before = other.read_bytes()
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--data", str(other), flag, str(other)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E617" in err[0] and "destroy" in err[0], err
    assert other.read_bytes() == before


@pytest.mark.parametrize("kind", ["verifier", "reward", "prm", "prm+verifier", "rm"])
def test_eval_never_writes_over_what_its_scorer_reads(tmp_path, capsys, kind):
    """--out over the scorer's .py file, or into its run folder, once replaced a user's verifier
    with results JSON (and a PRM run's config.json, so the PRM was refused from then on)."""
    data = _write(tmp_path / "t.jsonl", [ROW])
    (tmp_path / "check.py").write_text("def check(prompt, completion, **row):\n    return 1.0\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    if kind in ("verifier", "reward"):
        scorer, target = f"{kind}:{tmp_path / 'check.py'}:check", tmp_path / "check.py"
    else:
        scorer, target = f"{kind}:{tmp_path / 'run'}", tmp_path / "run" / "config.json"
    before = target.read_bytes()
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--strategies", "best-of-n"]
    assert main([*argv, "--n", "2", "--scorer", scorer, "--out", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "E617" in err[0] and "scorer" in err[0], err
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "check.py",
        "run",
        "t.jsonl",
    ]


def test_eval_data_given_twice_and_rows_no_answer_can_match_are_refused_before_loading(tmp_path, capsys):
    """The same --data twice once crashed (E001) after the whole evaluation, saving nothing; an
    empty or true/false gold answer was scored wrong for every model; so is a deep JSON row (E001)."""
    data = _write(tmp_path / "t.jsonl", [ROW])
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--data", f"{tmp_path}/./t.jsonl"]
    assert main([*argv, "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error E623") and "twice" in err[0], err
    bad = [{**ROW, "answer": ""}, {**ROW, "answer": "  "}, {**ROW, "answer": True}, "[" * 100_000]
    bad.append({"messages": [{"role": "user", "content": "  "}], "answer": "3"})
    with pytest.raises(DataError) as e:
        read_rows(_write(tmp_path / "bad.jsonl", [ROW, *bad]))
    assert [x.code for x in e.value.errors] == ["E624"] * 5
    assert [x.where.rsplit(":", 1)[1] for x in e.value.errors] == ["2", "3", "4", "5", "6"]
    assert not (tmp_path / "o.json").exists()


def test_progress_in_a_log_file_has_a_line_per_tenth_even_when_batches_jump(capsys):
    """Batched decoding reports several prompts at once; a log file (not a terminal) still gets
    a line each time a tenth is passed, and one at the end."""
    from mlxpt.commands.generate import progress_printer

    progress = progress_printer("[run]", 0.0)
    for done in range(8, 100, 8):  # 8, 16, ..., 96: never lands on a multiple of 10
        progress(done, 100)
    progress(100, 100)
    lines = capsys.readouterr().err.splitlines()
    shown = [int(x.split()[1].split("/")[0]) for x in lines]
    assert shown == [16, 24, 32, 40, 56, 64, 72, 80, 96, 100], shown
    assert all(x.startswith("[run] ") and " prompts, " in x for x in lines)
