"""Process reward model: its metrics against hand-computed values, the BCE objective, the stepwise
data format (every bad row one file:line error, before any weights load), encoding (a step's score
never depends on later steps), training on the shared runner, scoring that reproduces validation,
refusing another base model or tokenizer, `data label-steps` with scripted generations and its
resume, the bundled data's generator (tiny model or fakes, fast)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
from test_train import StopAfter, _load_state
from tiny import run_config

from mlxpt.config import PRMConfig
from mlxpt.decode import prm as P
from mlxpt.errors import MlxptError

ROOT = Path(__file__).resolve().parents[1]


def _row(rng: random.Random, chat: bool = False) -> dict:
    """A short stepwise row: steps `n = good` or `n = bad`; a step is correct while no bad one came."""
    n = rng.randint(2, 4)
    first_bad = rng.choice([None, *range(n)])
    steps = [f"{i} = {'bad' if i == first_bad else 'good'}" for i in range(n)]
    labels = [first_bad is None or i < first_bad for i in range(n)]
    q = f"Check {rng.randint(1, 99)}."
    prompt = [{"role": "user", "content": q}] if chat else q
    return {"prompt": prompt, "completions": steps, "labels": labels}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory):
    """32 train / 16 valid short stepwise rows, a quarter of them in the chat form."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("steps")
    write_rows(d / "train.jsonl", [_row(rng, chat=i % 4 == 0) for i in range(32)])
    write_rows(d / "valid.jsonl", [_row(rng, chat=i % 4 == 0) for i in range(16)])
    return d


def make_cfg(tiny_dir, data_dir, tmp_path, **kw) -> PRMConfig:
    return run_config(PRMConfig, tiny_dir, data_dir, tmp_path, **kw)


@pytest.fixture(scope="module")
def prm_run(tiny_dir, step_dir, tmp_path_factory):
    """One finished 6-step prm run with evaluations at steps 0, 3, 6 over the whole valid split."""
    from mlxpt.train.prm import run_prm

    events: list[dict] = []
    cfg = make_cfg(tiny_dir, step_dir, tmp_path_factory.mktemp("prm"), eval_every=3, eval_batches=-1)
    run_dir, outcome = run_prm(cfg, emit=events.append)
    assert outcome == "finished"
    return run_dir, events


# ---- metrics (pure functions) -------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    scores = [[0.9, 0.8, 0.3], [0.6, 0.4], [0.7, 0.2, 0.1, 0.6]]
    labels = [[1, 1, 0], [1, 1], [True, False, False, 0.0]]
    # steps right: 3 of 3, 1 of 2, 3 of 4 (0.6 says correct, the label says wrong)
    assert P.step_accuracy(scores, labels) == pytest.approx(7 / 9)
    # first errors: predicted 2, 1, 1; true 2, none, 1 -> two of three
    assert P.first_error_accuracy(scores, labels) == pytest.approx(2 / 3)
    assert P.first_error([0.9, 0.49, 0.1]) == 1 and P.first_error([0.5, 0.6]) is None
    # AUC: positives .9 .8 .6 .4 .7 against negatives .3 .2 .1 .6; of 20 pairs .4 loses 1 (.6),
    # .6 ties .6 (one half): (20 - 1 - 0.5) / 20
    flat_s = [p for s in scores for p in s]
    flat_y = [float(y) for ys in labels for y in ys]
    assert P.roc_auc(flat_s, flat_y) == pytest.approx(18.5 / 20)
    assert P.roc_auc([0.1, 0.9], [0, 1]) == 1.0 and P.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert P.roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert P.roc_auc([0.1, 0.2], [1, 1]) is None  # one class only: undefined
    # soft labels count as correct from 0.5 up
    assert P.step_accuracy([[0.7, 0.2]], [[0.5, 0.49]]) == 1.0
    m = P.step_metrics(scores, labels)
    assert set(m) == {"step_accuracy", "first_error_accuracy", "auc", "last_step_auc"}
    assert m["last_step_auc"] == pytest.approx(0.5)  # last steps .3 (0), .4 (1), .6 (0): 1 of 2 pairs
    assert P.step_accuracy([], []) is None
    with pytest.raises(ValueError):
        P.step_accuracy([[0.1, 0.2]], [[1]])


def test_bce_objective_values_soft_labels_and_gradient():
    import mlx.core as mx

    from mlxpt.train.prm import bce_objective

    z = np.array([[2.0, -1.0, 0.0], [0.5, 3.0, 0.0]], np.float32)
    y = np.array([[1.0, 0.0, 0.25], [1.0, 1.0, 0.0]], np.float32)
    w = np.array([[1, 1, 1], [1, 0, 0]], np.float32)  # row 2 has one step
    loss, n, m = bce_objective(z, y, w)

    def bce(x, t):
        return -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 / (1 + math.exp(x))))

    want = bce(2, 1) + bce(-1, 0) + bce(0, 0.25) + bce(0.5, 1)
    assert float(n) == 4 and float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["step_accuracy"]) == 3  # 0 vs 0.25 counts as "correct" predicted for a wrong step
    # a soft label's loss is least at its own logit: d/dz = σ(z) - y = 0 at z = logit(y)
    g = mx.grad(lambda x: bce_objective(x, mx.array(y), mx.array(w))[0])(mx.array(z))
    sig = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(np.array(g), (sig - y) * w, rtol=1e-5, atol=1e-6)


# ---- the data format ----------------------------------------------------------------------------------


def test_bad_rows_are_one_line_each_with_their_code(tmp_path):
    from mlxpt.data.stepwise import load_stepwise, scan_stepwise

    good = {"prompt": "q", "completions": ["a", "b"], "labels": [True, 0.5]}
    bad = [
        ({"prompt": "q", "completions": ["a"]}, "E146"),  # no labels
        ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, "E153"),  # misaligned
        ({"prompt": "q", "completions": ["a", "  "], "labels": [True, False]}, "E149"),  # empty step
        ({"prompt": "q", "completions": ["a"], "labels": ["yes"]}, "E154"),  # not boolean
        ({"prompt": "q", "completions": ["a"], "labels": [1.5]}, "E154"),  # out of range
        ({"prompt": "q", "completions": ["a"], "labels": [None]}, "E154"),
        ({"prompt": "q", "completions": [], "labels": []}, "E148"),
        ({"prompt": "q", "completions": "a", "labels": [True]}, "E148"),
        ({"prompt": "q", "completions": [3], "labels": [True]}, "E148"),
        ({"prompt": "q", "completions": ["a"], "labels": True}, "E152"),
        ({"prompt": " ", "completions": ["a"], "labels": [True]}, "E147"),
        ({"prompt": 7, "completions": ["a"], "labels": [True]}, "E147"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "completions": ["a"], "labels": [True]}, "E147"),
        ({"prompt": "q", "system": 3, "completions": ["a"], "labels": [True]}, "E155"),
    ]
    f = write_rows(tmp_path / "train.jsonl", [good] + [row for row, _ in bad] + [good])
    with f.open("a") as fh:
        fh.write("NaN\n")
    rows, errors = scan_stepwise(f)
    assert len(rows) == 2
    assert [e.code for e in errors] == [code for _, code in bad] + ["E107"]
    assert [e.where for e in errors] == [f"{f}:{i}" for i in range(2, len(bad) + 2)] + [f"{f}:{len(bad) + 3}"]
    assert all("\n" not in e.line() for e in errors)
    with pytest.raises(MlxptError) as e:
        load_stepwise(f)
    assert len(e.value.errors) == len(bad) + 1
    # JSON's NaN is read by Python's json; as a label it is refused too
    write_rows(tmp_path / "nan.jsonl", [{"prompt": "q", "completions": ["a"], "labels": [float("nan")]}])
    assert [e.code for e in scan_stepwise(tmp_path / "nan.jsonl")[1]] == ["E154"]


def test_bad_data_is_refused_before_any_weights_load(tmp_path, step_dir):
    """Every row of both splits is checked first: a model that does not exist is never reached."""
    from mlxpt.train.prm import run_prm

    d = tmp_path / "data"
    d.mkdir()
    write_rows(d / "train.jsonl", [{"prompt": "q", "completions": ["a"], "labels": [1, 0]}])
    write_rows(d / "valid.jsonl", [{"prompt": "q", "completions": ["a"], "labels": ["no"]}])
    cfg = make_cfg(tmp_path / "no-such-model", d, tmp_path)
    with pytest.raises(MlxptError) as e:
        run_prm(cfg)
    assert [x.code for x in e.value.errors] == ["E153", "E154"] and not (tmp_path / "runs").exists()


def test_data_check_knows_stepwise_rows(tmp_path, capsys):
    from mlxpt.cli import main
    from mlxpt.config import ASSETS

    assert main(["data", "check", str(ASSETS / "prm")]) == 0
    out = capsys.readouterr().out
    assert "data for prm" in out and "300 stepwise rows" in out and "rejected: 0 rows" in out
    assert main(["data", "check", str(ASSETS / "prm"), "--method", "prm"]) == 0
    f = write_rows(tmp_path / "s.jsonl", [_row(random.Random(1)), {"prompt": "q", "completions": ["a"], "labels": []}])
    assert main(["data", "check", str(f)]) == 1
    out = capsys.readouterr().out
    assert "1 stepwise rows" in out and f"{f}:2" in out and "E153" in out
    # convert writes TRL's form back: labels stay booleans, a soft one stays a number
    src = write_rows(
        tmp_path / "c.jsonl", [{"prompt": "q", "system": "s", "completions": ["a", "b"], "labels": [1, 0.25]}]
    )
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text()) == {
        "system": "s", "prompt": "q", "completions": ["a", "b"], "labels": [True, 0.25]
    }  # fmt: skip


def test_encoding_puts_each_label_on_its_delimiter_and_prefixes_are_stable(tiny_dir, tmp_path):
    from mlxpt.data.stepwise import check_delimiter, encode_stepwise, load_stepwise, split_steps, step_delimiter
    from mlxpt.models.loader import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    row = {"prompt": [{"role": "user", "content": "Check 7."}], "completions": ["0 = good", "1 = bad", "2 = good"]}
    rows, _ = load_stepwise(write_rows(tmp_path / "enc.jsonl", [{**row, "labels": [True, False, False]}]))
    (ex,), report = encode_stepwise(rows, tok, "\n", 512, "truncate")
    assert report["kept"] == 1 and len(ex.ends) == len(rows[0].steps)
    assert all(tok.decode([ex.tokens[e]]) == "\n" for e in ex.ends)
    head = tok.apply_chat_template(rows[0].prompt, tokenize=False, add_generation_prompt=True)
    text = tok.decode(ex.tokens)
    assert text == head + "".join(s + "\n" for s in rows[0].steps)
    # too long: whole steps are dropped, never part of one; nothing fits -> dropped and counted
    cut = ex.ends[1] + 1
    (short,), report = encode_stepwise(rows, tok, "\n", cut, "truncate")
    assert short.tokens == ex.tokens[:cut] and short.ends == ex.ends[:2] and report["truncated"] == 1
    assert encode_stepwise(rows, tok, "\n", ex.ends[0], "truncate")[1]["dropped_no_room"] == 1
    with pytest.raises(MlxptError) as e:
        encode_stepwise(rows, tok, "\n", cut, "error")
    assert e.value.code == "E157"
    assert step_delimiter("\\n") == "\n" and step_delimiter("\\n\\n") == "\n\n" and step_delimiter(";") == ";"
    with pytest.raises(MlxptError) as e:
        check_delimiter("")
    assert e.value.code == "E530"
    assert split_steps("a\n\n b \n  \nc") == ["a", " b ", "c"]


# ---- training and scoring -----------------------------------------------------------------------------


def test_every_trainable_parameter_changes_and_no_frozen_one(tiny_dir, step_dir, tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxpt.backends.mlx_backend import MLXBackend, make_optimizer
    from mlxpt.models import load
    from mlxpt.models.adapters import apply_adapters
    from mlxpt.models.heads import add_reward_head
    from mlxpt.train import prm

    cfg = make_cfg(tiny_dir, step_dir, tmp_path, num_layers=1)
    model, tok = load(str(tiny_dir))
    apply_adapters(model, cfg.adapter, seed=0)
    add_reward_head(model, seed=0)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    backend = MLXBackend(model, make_optimizer("adamw"), prm.make_objective(cfg), output="reward")
    train, _, _ = prm.prepare_data(cfg, tok)
    batch = prm.collate(train[:4], 0)
    for _ in range(3):
        backend.accumulate(batch)
        loss, n, norm, aux = backend.reduce()
        assert norm > 0 and n == sum(len(e.ends) for e in train[:4]) and math.isfinite(loss)
        backend.apply(1e-2, 1.0)
    mx.eval(model.parameters())
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == (k in trainable), f"{'trainable' if k in trainable else 'frozen'} {k}"


def test_prm_run_layout_metrics_and_scores_agree_with_validation(prm_run, step_dir):
    from mlxpt.models.heads import HEAD_FILE

    run_dir, events = prm_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "adapters.safetensors", HEAD_FILE, "metrics.jsonl"} <= names
    assert json.loads((run_dir / "config.json").read_text())["method"] == "prm"
    steps = [e for e in events if e["event"] == "step"]
    assert all(math.isfinite(e["loss"]) and 0 <= e["step_accuracy"] <= 1 for e in steps)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert {"val_loss", "val_step_accuracy", "val_first_error_accuracy", "val_auc"} <= set(evals[-1])
    # the scorer reproduces validation: its metrics over the valid split are the last eval's
    prm = P.load_process_reward_model(run_dir)
    assert prm.delimiter == "\n"
    rows = [json.loads(x) for x in (step_dir / "valid.jsonl").read_text().splitlines()]
    scores = [prm.score_steps(r["prompt"], r["completions"]) for r in rows]
    labels = [r["labels"] for r in rows]
    assert all(0 <= p <= 1 for s in scores for p in s)
    assert P.step_accuracy(scores, labels) == pytest.approx(evals[-1]["val_step_accuracy"], abs=1e-6)
    assert P.roc_auc(sum(scores, []), sum(labels, [])) == pytest.approx(evals[-1]["val_auc"], abs=1e-4)
    # batched = one at a time; a prefix scores as inside the whole; an empty list scores nothing
    r = rows[0]
    prefixes = [r["completions"][:k] for k in range(len(r["completions"]) + 1)]
    many = prm.score_many(r["prompt"], prefixes)
    assert many[0] == [] and len(many[-1]) == len(r["completions"])
    for k, got in enumerate(many):
        np.testing.assert_allclose(got, scores[0][:k], atol=1e-5)
    # a string prompt is the one-user-turn chat prompt
    text = next(x for x in rows if isinstance(x["prompt"], str))
    as_chat = prm.score_steps([{"role": "user", "content": text["prompt"]}], text["completions"])
    np.testing.assert_allclose(as_chat, prm.score_steps(text["prompt"], text["completions"]), atol=1e-6)


def test_prm_resume_equals_uninterrupted(tiny_dir, step_dir, tmp_path):
    from mlxpt.train.prm import run_prm

    kw = {"steps": 6, "dropout": 0.1}
    straight, _ = run_prm(make_cfg(tiny_dir, step_dir, tmp_path / "a", **kw))
    cfg = make_cfg(tiny_dir, step_dir, tmp_path / "b", **kw)
    part, outcome = run_prm(cfg, stop=StopAfter(3 * 2 + 1))
    assert outcome == "interrupted" and _load_state(part)[1]["loop"]["step"] == 3
    resumed, outcome = run_prm(cfg, resume_dir=part)
    assert outcome == "finished"
    a, b = _load_state(straight)[0], _load_state(resumed)[0]
    assert "reward_head.weight" in a["adapters"]
    for group in ("adapters", "optimizer", "rng"):
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")


def test_prm_learns_held_out_step_labels(tiny_dir, tmp_path):
    """A step is wrong from the first `bad` one on: after 30 steps the PRM separates held-out
    correct and wrong steps (AUC near 1) and its validation loss has fallen."""
    from mlxpt.train.prm import run_prm

    rng = random.Random(3)
    write_rows(tmp_path / "train.jsonl", [_row(rng) for _ in range(96)])
    write_rows(tmp_path / "valid.jsonl", [_row(rng) for _ in range(32)])
    cfg = make_cfg(tiny_dir, tmp_path, tmp_path, steps=30, eval_every=30, eval_batches=-1, warmup_steps=3)
    events: list[dict] = []
    run_prm(cfg, emit=events.append)
    first, last = (e for e in events if e["event"] == "eval")
    assert last["val_auc"] > 0.95 and last["val_loss"] < 0.6 * first["val_loss"], (first, last)
    assert last["val_step_accuracy"] > 0.9


def test_cli_train_prm_events_resume_and_refusals(tiny_dir, step_dir, tmp_path, capsys):
    from mlxpt.cli import main

    args = ["--model", str(tiny_dir), "--data", str(step_dir), "--runs-dir", str(tmp_path / "runs")]
    args += ["--steps", "2", "--num-layers", "1", "--regression-data", "none", "--step-delimiter", "\\n"]
    assert main(["train", "prm", *args, "--events", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["method"] == "prm" and events[-1]["event"] == "done"
    run_dir = Path(events[-1]["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["prm"]["step_delimiter"] == "\\n"
    assert main(["train", "--resume", str(run_dir), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "step acc" in out and "process reward model saved" in out
    # a prm-only flag on another method, bad settings and a non-prm resume: one-line errors, no run
    assert main(["train", "rm", "--model", str(tiny_dir), "--step-delimiter", ";"]) == 1
    assert capsys.readouterr().err.startswith("error E504")
    for extra, code in ((["--step-delimiter", ""], "E530"), (["--backend", "numpy"], "E525")):
        assert main(["train", "prm", *args[:6], "--runs-dir", str(tmp_path / "none"), *extra]) == 1
        assert capsys.readouterr().err.startswith(f"error {code}")
        assert not (tmp_path / "none").exists()


def test_resuming_another_method_as_prm_is_refused(tiny_dir, pref_dir, step_dir, tmp_path):
    from mlxpt.config import RMConfig
    from mlxpt.train.prm import run_prm
    from mlxpt.train.rm import run_rm

    rm_dir, _ = run_rm(run_config(RMConfig, tiny_dir, pref_dir, tmp_path, steps=1, max_seq_len=512))
    with pytest.raises(MlxptError) as e:
        run_prm(make_cfg(tiny_dir, step_dir, tmp_path), resume_dir=rm_dir)
    assert e.value.code == "E526" and "rm run" in e.value.line()
    with pytest.raises(MlxptError) as e:
        P.load_process_reward_model(rm_dir)
    assert e.value.code == "E527" and "not a process reward model" in e.value.line()
    with pytest.raises(MlxptError) as e:
        P.load_process_reward_model(tmp_path / "nope")
    assert e.value.code == "E527"


def test_another_base_model_or_tokenizer_is_refused(prm_run, tiny_dir, tmp_path):
    import shutil

    from mlxpt.models.loader import load_tokenizer

    run_dir = prm_run[0]
    prm = P.load_process_reward_model(run_dir, expect_model=str(tiny_dir), tokenizer=load_tokenizer(str(tiny_dir)))
    prm.check_compatible(str(run_dir))  # a run folder stands for its base model
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)  # the same model in another folder is the same model
    prm.check_compatible(str(copy))
    other = tiny.make_model(tmp_path / "other", seed=1, hidden_size=32, intermediate_size=64)
    with pytest.raises(MlxptError) as e:
        P.load_process_reward_model(run_dir, expect_model=str(other))
    assert e.value.code == "E528" and "trained on" in e.value.line() and "\n" not in e.value.line()

    class OtherVocab:
        eos_token_id = 2

        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(MlxptError) as e:
        prm.check_compatible(None, OtherVocab())
    assert e.value.code == "E528" and "tokenizer" in e.value.line()


def test_bad_scoring_inputs_are_one_line_errors(prm_run):
    prm = P.load_process_reward_model(prm_run[0])
    cases = [
        (lambda: prm.score_steps("q", "one step"), "E529"),
        (lambda: prm.score_steps("q", [1, 2]), "E529"),
        (lambda: prm.score_many("q", "a"), "E529"),
        (lambda: prm.score_steps("", ["a"]), "E147"),
        (lambda: prm.score_steps(7, ["a"]), "E147"),
        (lambda: prm.score_steps([{"role": "assistant", "content": "x"}], ["a"]), "E147"),
    ]
    for call, want in cases:
        with pytest.raises(MlxptError) as e:
            call()
        assert e.value.code == want and "\n" not in e.value.line()
    assert prm.score_steps("q", []) == [] and prm.score_many("q", []) == []
    assert len(prm.score_steps("q", ["", "x"])) == 2  # a search may score an empty step


# ---- label-steps -------------------------------------------------------------------------------------


class _Scripted:
    """generate_group / generate_groups stand-ins: the solution, then per prefix K continuations
    from a script; records the prompts they were given."""

    def __init__(self, solution: str, continuations: dict[str, list[str]]):
        self.solution, self.continuations, self.calls = solution, continuations, []

    def group(self, model, tok, ids, n, max_tokens, sampler, stats=None):
        from mlxpt.decode.batch import Completion

        return [Completion([1, 2], self.solution, "stop")]

    def groups(self, model, tok, prompts, n, max_tokens, sampler, stats=None):
        from mlxpt.decode.batch import Completion

        out = []
        for ids in prompts:
            prefix = tok.decode(ids[len(self.head) :])
            self.calls.append((prefix, n))
            out.append([Completion([1], c, "stop") for c in self.continuations[prefix][:n]])
        return out


@pytest.mark.parametrize("soft", [True, False])
def test_label_prompt_labels_each_prefix_by_its_continuations(tiny_dir, monkeypatch, soft):
    from mlxpt.data.prompts import PromptRow
    from mlxpt.decode import batch, label_steps
    from mlxpt.decode.generate import chat_prompt
    from mlxpt.models.loader import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    row = PromptRow(
        "p:1", "What is 2 + 3 + 4?", [{"role": "user", "content": "What is 2 + 3 + 4?"}], False, {"answer": "9"}
    )
    fake = _Scripted(
        "2 + 3 = 5\n\n5 + 4 = 10\nAnswer: 10",  # a wrong solution: its last step is labelled 0
        {
            "2 + 3 = 5\n": ["5 + 4 = 9\nAnswer: 9", "Answer: 9", "5 + 4 = 8\nAnswer: 8", "no idea"],
            "2 + 3 = 5\n5 + 4 = 10\n": ["Answer: 10"] * 4,
        },
    )
    fake.head = chat_prompt(tok, row.messages)
    monkeypatch.setattr(batch, "generate_group", fake.group)
    monkeypatch.setattr(batch, "generate_groups", fake.groups)
    s = label_steps.LabelSettings("d", "p", rollouts=4, soft=soft)
    counts = label_steps.LabelCounts()
    out = label_steps.label_prompt(None, tok, row, 0, s, counts)
    assert out["completions"] == ["2 + 3 = 5", "5 + 4 = 10", "Answer: 10"]
    assert out["labels"] == ([0.5, 0.0, 0.0] if soft else [True, False, False])
    assert [c for c in fake.calls] == [("2 + 3 = 5\n", 4), ("2 + 3 = 5\n5 + 4 = 10\n", 4)]
    assert out["prompt"] == row.prompt and out["answer"] == "9" and out["row"] == 0
    assert counts.rows == 1 and counts.steps == 3 and counts.correct_solutions == 0


def _fake_labeller(monkeypatch, fail_at: int | None = None):
    """label_prompt replaced by a scripted one (row i -> one step labelled i % 2); raises at `fail_at`."""
    from mlxpt.decode import label_steps

    def fake(model, tok, row, index, s, counts):
        if index == fail_at:
            raise KeyboardInterrupt
        counts.rows += 1
        return {"prompt": row.prompt, "completions": [f"step {index}"], "labels": [index % 2 == 0], "row": index}

    monkeypatch.setattr(label_steps, "label_prompt", fake)


def test_label_steps_resumes_after_the_last_complete_row(tmp_path, monkeypatch):
    from mlxpt.data.prompts import scan_prompts
    from mlxpt.data.stepwise import load_stepwise
    from mlxpt.decode import label_steps as L

    prompts = tiny.write_prompt_dir(tmp_path, train=(6, 5)) / "train.jsonl"
    rows, _ = scan_prompts(prompts, require=("answer",))
    out = tmp_path / "out" / "steps.jsonl"
    s = L.LabelSettings(str(prompts), "policy", rollouts=2)
    _fake_labeller(monkeypatch, fail_at=3)
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        L.label_steps(None, None, rows, out, s, lambda done, total, c: seen.append(done))
    assert seen == [1, 2, 3] and len(out.read_text().splitlines()) == 3
    with out.open("a") as f:
        f.write('{"prompt": "torn')  # a crash mid-append: cut away on resume
    _fake_labeller(monkeypatch)
    counts = L.label_steps(None, None, rows, out, s)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in got] == list(range(6)) and counts.rows == 6
    assert len(load_stepwise(out)[0]) == 6  # a valid stepwise file
    # other settings for the same OUT, or an OUT that is not a label-steps output: refused, untouched
    before = out.read_bytes()
    for bad in (L.LabelSettings(str(prompts), "policy", rollouts=3), L.LabelSettings(str(prompts), "other")):
        with pytest.raises(MlxptError) as e:
            L.label_steps(None, None, rows, out, bad)
        assert e.value.code == "E533" and "other settings" in e.value.line()
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("{}\n")
    with pytest.raises(MlxptError) as e:
        L.label_steps(None, None, rows, foreign, s)
    assert e.value.code == "E533" and out.read_bytes() == before and foreign.read_text() == "{}\n"


def test_label_steps_cuts_only_a_tail_it_wrote_itself(tmp_path, monkeypatch):
    """Rows someone appended to OUT are never cut: more than label-steps' own torn tail (part of a
    line, or the next prompt's line written before its progress record) is E533 with OUT untouched;
    "nothing to do" leaves OUT as it is."""
    from mlxpt.data.prompts import scan_prompts
    from mlxpt.decode import label_steps as L

    prompts = tiny.write_prompt_dir(tmp_path, train=(6, 5)) / "train.jsonl"
    rows, _ = scan_prompts(prompts, require=("answer",))
    s = L.LabelSettings(str(prompts), "policy", rollouts=2)
    out = tmp_path / "steps.jsonl"
    _fake_labeller(monkeypatch)
    L.label_steps(None, None, rows[:4], out, s)
    prog = L.progress_path(out)
    done, record = out.read_bytes(), prog.read_bytes()
    line = (json.dumps({"prompt": "q", "completions": ["a"], "labels": [True], "row": 4}) + "\n").encode()
    other = (json.dumps({"prompt": "q", "completions": ["a"], "labels": [True], "row": 0}) + "\n").encode()
    for added in (other, line + other, line + b'{"prompt": "torn', other + line):
        out.write_bytes(done + added)
        for limit in (4, 6):  # nothing to do, and something to do
            with pytest.raises(MlxptError) as e:
                L.label_steps(None, None, rows[:limit], out, s)
            assert e.value.code == "E533" and f"grew by {len(added)} bytes" in e.value.line()
            assert out.read_bytes() == done + added
    for torn in (b'{"prompt": "to', line):  # a crash mid-append, or before the progress record
        out.write_bytes(done + torn)
        assert L.start_point(out, s) == (4, 4) and out.read_bytes() == done + torn
        assert L.label_steps(None, None, rows[:4], out, s).rows == 4 and out.read_bytes() == done + torn
        L.label_steps(None, None, rows, out, s)
        assert [json.loads(x)["row"] for x in out.read_text().splitlines()] == list(range(6))
        out.write_bytes(done)
        prog.write_bytes(record)


def test_label_steps_cli_refuses_bad_inputs_before_loading(tmp_path, capsys):
    from mlxpt.cli import main

    prompts = tiny.write_prompt_dir(tmp_path, train=(3, 5)) / "train.jsonl"
    base = ["data", "label-steps", "--policy", str(tmp_path / "no-model"), "--data", str(prompts)]
    out = ["--out", str(tmp_path / "o.jsonl")]
    cases = [
        ([*base, "--out", str(prompts)], "E617"),  # the output is an input
        ([*base, *out, "--rollouts", "0"], "E531"),
        ([*base, *out, "--temperature", "0"], "E531"),
        ([*base, *out, "--max-tokens", "0"], "E531"),
        ([*base, *out, "--step-delimiter", ""], "E530"),
        ([*base, *out, "--extract", "nope"], "E607"),
        ([*base, *out, "--limit", "0"], "E531"),
    ]
    for argv, code in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error {code}") and len(err.splitlines()) == 1, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q"}) + "\n")  # no answer
    assert main(["data", "label-steps", "--policy", "x", "--data", str(bad), *out]) == 1
    assert f"{bad}:1" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_label_steps_cli_end_to_end_on_the_tiny_model(tiny_dir, tmp_path, capsys):
    from test_decode import make_adapter_run

    from mlxpt.cli import main

    prompts = tiny.write_prompt_dir(tmp_path, train=(2, 5)) / "train.jsonl"
    run = make_adapter_run(tmp_path / "runs" / "run", tiny_dir)  # the policy: an adapter on the tiny model
    for inside in (run / "steps.jsonl", Path(tiny_dir) / "steps.jsonl"):  # in the policy's run or model
        argv = ["data", "label-steps", "--policy", str(run), "--data", str(prompts), "--out", str(inside)]
        assert main(argv) == 1 and capsys.readouterr().err.startswith("error E617") and not inside.exists()
    out = tmp_path / "steps.jsonl"
    argv = ["data", "label-steps", "--policy", str(run), "--data", str(prompts), "--out", str(out)]
    argv += ["--rollouts", "2", "--max-tokens", "24", "--hard"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "label-steps: 2/2 prompts" in err and "wrote" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(
        len(r["labels"]) == len(r["completions"]) and all(isinstance(x, bool) for x in r["labels"]) for r in rows
    )
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().err


def test_label_steps_refuses_a_reward_model_as_the_policy(prm_run, tmp_path, capsys):
    """A PRM's adapter is a scoring backbone: --policy refuses it with --from's and --teacher's E579."""
    from mlxpt.cli import main
    from mlxpt.models.chaining import resolve_start

    run_dir, _ = prm_run
    prompts = tiny.write_prompt_dir(tmp_path, train=(2, 5)) / "train.jsonl"
    out = tmp_path / "steps.jsonl"
    argv = ["data", "label-steps", "--policy", str(run_dir), "--data", str(prompts), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error E579: this is a reward model; --policy takes a policy's adapter")
    assert len(err.splitlines()) == 1 and not out.exists()
    with pytest.raises(MlxptError) as e:
        resolve_start(str(run_dir))
    assert e.value.code == "E579" and e.value.hint in err
    # generate, chat and eval (--adapter, --compare) once sampled from the PRM's backbone as a policy
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    for argv, flag in (
        (["generate", "--adapter", str(run_dir), "--prompt", "hi"], "--adapter"),
        (["eval", "--adapter", str(run_dir), "--data", str(eval_data), "--out", str(tmp_path / "e.json")], "--adapter"),
        (["eval", "--compare", str(run_dir), "--data", str(eval_data), "--out", str(tmp_path / "e.json")], "--compare"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error E579: this is a reward model; {flag} takes") and len(err.splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


# ---- the bundled data ---------------------------------------------------------------------------------


def test_bundled_stepwise_data_is_reproducible_and_labelled_as_said(tmp_path):
    from mlxpt.data.stepwise import load_stepwise
    from mlxpt.rewards.extract import extract

    subprocess.run([sys.executable, str(ROOT / "assets" / "make_prm.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    for split in ("train", "valid"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / "assets/prm" / f"{split}.jsonl").read_bytes(), (
            "assets/prm is stale: rerun assets/make_prm.py"
        )
    train, valid = load_stepwise(ROOT / "assets" / "prm")
    assert len(train) == 300 and len(valid) == 120
    raw = [json.loads(x) for x in (ROOT / "assets/prm/train.jsonl").read_text().splitlines()]
    for row, r in zip(train, raw, strict=True):
        right = extract("\n".join(row.steps)) == r["answer"]
        assert right == all(row.labels)  # a solution is right exactly when every step is
        k = next((i for i, x in enumerate(row.labels) if not x), len(row.labels))
        assert all(row.labels[:k]) and not any(row.labels[k:])  # true before k, false from k on
        exact = [_exact(step) for step in row.steps[:-1]]  # every step but the answer line
        assert all(exact[:k])  # steps labelled true are right
        if k < len(exact):
            assert not exact[k]  # the first wrong step's arithmetic is wrong


def _exact(step: str) -> bool:
    a, op, b, _, c = step.split()
    a, b, c = int(a), int(b), int(c)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c


def test_a_prm_of_another_base_model_is_refused_before_any_weights_load(prm_run, tiny_dir, tmp_path, capsys):
    """eval, generate and an RFT step search with `--scorer prm:RUN` on a model the PRM was not
    trained on: E528 from the PRM run's config, exit 1, no output and no run folder; the same
    commands on the PRM's own base model get past the check."""
    from mlxpt.cli import main

    run_dir = prm_run[0]
    other = tiny.make_model(tmp_path / "other", seed=1, hidden_size=32, intermediate_size=64)
    (tmp_path / "prompts").mkdir()
    prompts = tiny.write_prompt_dir(tmp_path / "prompts", train=(4, 1), test=(2, 2))
    out, runs = tmp_path / "ev.json", tmp_path / "runs"
    search = ["--strategy", "step-beam", "--scorer", f"prm:{run_dir}", "--n", "2", "--temperature", "0.7"]
    commands = [
        ["eval", "--strategies", "step-beam", "--scorer", f"prm:{run_dir}", "--n", "2", "--temperature", "0.7",
         "--data", str(prompts / "test.jsonl"), "--out", str(out)],
        ["generate", *search, "--prompt", "2 + 2 = ?"],
        ["train", "rft", "--data", str(prompts), "--strategy", "step-beam", "--scorer", f"prm:{run_dir}",
         "--steps", "2", "--rounds", "1", "--save-every", "1", "--regression-data", "none", "--runs-dir", str(runs)],
    ]  # fmt: skip
    for cmd in commands:
        assert main([*cmd, "--model", str(other)]) == 1, cmd
        err = capsys.readouterr().err
        assert err.startswith("error E528") and "trained on" in err and err.count("\n") == 1, (cmd, err)
    assert not out.exists() and not runs.exists()
    # a PRM whose base-model folder is gone since (a cleared cache) is checked by its model reference
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    saved = json.loads((moved / "config.json").read_text())
    saved["model_path"], saved["model"]["model"] = str(tmp_path / "gone"), str(tiny_dir)
    (moved / "config.json").write_text(json.dumps(saved))
    assert P.check_base(moved, str(tiny_dir))
    with pytest.raises(MlxptError) as e:
        P.check_base(moved, str(other))
    assert e.value.code == "E528"
    # the PRM's own base model passes the check, and so does a command that does not use the scorer
    main([*commands[1], "--model", str(tiny_dir), "--max-tokens", "4"])
    assert "E528" not in capsys.readouterr().err
    main(["generate", "--strategy", "greedy", "--scorer", f"prm:{run_dir}", "--prompt", "2 + 2 = ?",
          "--model", str(other), "--max-tokens", "4"])  # fmt: skip
    assert "E528" not in capsys.readouterr().err


def test_prm_plus_verifier_is_checked_like_prm_and_scores_through_the_cli(prm_run, tiny_dir, tmp_path, capsys):
    """`--scorer prm+verifier:RUN`: the same base-model check (E528, exit 1), a missing folder
    E628, and on the PRM's own base model every step score is the PRM's times the verifier's."""
    from mlxpt.cli import main

    run_dir = prm_run[0]
    other = tiny.make_model(tmp_path / "other", seed=1, hidden_size=32, intermediate_size=64)
    # no --step-delimiter: the search cuts steps at the PRM's own (another one is E638)
    cmd = ["generate", "--strategy", "step-beam", "--n", "2", "--temperature", "0.7", "--prompt", "2 + 2 = ?",
           "--max-tokens", "6", "--max-steps", "3"]  # fmt: skip
    assert main([*cmd, "--scorer", f"prm+verifier:{run_dir}", "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error E528") and err.count("\n") == 1
    assert main([*cmd, "--scorer", f"prm+verifier:{tmp_path / 'nope'}", "--model", str(tiny_dir)]) == 1
    assert capsys.readouterr().err.startswith("error E628")
    assert main([*cmd, "--scorer", f"prm+verifier:{run_dir}", "--model", str(tiny_dir)]) == 0
    err = capsys.readouterr().err
    scores = [float(x) for x in err.split("step scores: ")[1].split("]")[0].split(", ")]
    assert scores and all(0 <= x < 1 for x in scores)


def test_a_second_label_steps_job_on_the_same_output_is_refused(tiny_dir, tmp_path, capsys):
    """Two jobs on one OUT once both appended every row (each prompt twice) and both exited 0."""
    from mlxpt.cli import main
    from mlxpt.decode.label_steps import OutputLock

    prompts = tiny.write_prompt_dir(tmp_path, train=(3, 5)) / "train.jsonl"
    out = tmp_path / "steps.jsonl"
    argv = ["data", "label-steps", "--policy", str(tiny_dir), "--data", str(prompts), "--out", str(out)]
    with OutputLock(out):  # the first job, still writing
        assert main([*argv, "--rollouts", "1", "--max-tokens", "4"]) == 1
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith("error E535: another label-steps job is writing this output") and len(err.splitlines()) == 1
        )
        assert out.read_bytes() == b"" and not (tmp_path / "steps.jsonl.progress.json").exists()
    assert main([*argv, "--rollouts", "1", "--max-tokens", "4"]) == 0  # once it is done, the next one runs
