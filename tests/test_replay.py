"""Replay against forgetting (`--replay FILE --replay-ratio R`) and `mlxpt data self-answers` (tiny model)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import StopAfter, run_config

from mlxpt.cli import main
from mlxpt.config import SFTConfig
from mlxpt.data.replay import ReplayExample, replay_count


def write_replay(path: Path, n: int = 10) -> Path:
    """n short chat rows unlike the arithmetic training rows."""
    rows = [
        {"messages": [{"role": "user", "content": f"Say word {i}."}, {"role": "assistant", "content": "w" * (i + 1)}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tiny_dir, data_dir, tmp_path, **kw) -> SFTConfig:
    return run_config(SFTConfig, tiny_dir, data_dir, tmp_path, **kw)


def replay_cfg(tiny_dir, data_dir, tmp_path, **kw) -> SFTConfig:
    replay = write_replay(tmp_path / "replay.jsonl")
    return make_cfg(tiny_dir, data_dir, tmp_path, **{"replay": str(replay), "replay_ratio": 0.25, **kw})


def encoded(cfg):
    from mlxpt.models.loader import load_tokenizer
    from mlxpt.train.sft import prepare_data

    return prepare_data(cfg, load_tokenizer(cfg.model.model))


def micro_batches(train, cfg, epoch: int = 0, index: int = 0, n: int = 20) -> list:
    """The first n micro-batches from a data position, as (examples, last, position)."""
    from mlxpt.train.loop import LoopState
    from mlxpt.train.sft import iter_replay_batches

    it = iter_replay_batches(train, LoopState(epoch=epoch, batch_index=index), cfg, collate=lambda ex: ex)
    return [(mb.arrays, mb.last, mb.position) for mb in (next(it) for _ in range(n))]


def test_replay_count_keeps_a_training_row():
    assert replay_count(0.25, 4) == 1
    assert replay_count(0.01, 4) == 1  # at least one
    assert replay_count(0.99, 4) == 3  # at most B - 1
    assert replay_count(0.5, 8) == 4
    assert replay_count(0.3, 2) == 1


def test_each_micro_batch_holds_k_replay_rows_and_an_epoch_is_the_training_data_once(tiny_dir, data_dir, tmp_path):
    cfg = replay_cfg(tiny_dir, data_dir, tmp_path, batch_size=4, replay_ratio=0.5, max_seq_len=1024)  # k = 2
    train, _, report = encoded(cfg)
    rows = [e for e in train if not isinstance(e, ReplayExample)]
    assert len(rows) == 24 and sum(isinstance(e, ReplayExample) for e in train) == 10
    assert report["replay"]["rows_per_batch"] == 2 and report["replay"]["kept"] == 10
    batches = micro_batches(train, cfg, n=12)  # 24 training rows / 2 per batch: one epoch
    seen = []
    for examples, last, _ in batches:
        replayed = [e for e in examples if isinstance(e, ReplayExample)]
        assert len(replayed) == 2 and len(examples) == 4 and last
        assert len({id(e) for e in replayed}) == 2, "no replay row twice in one micro-batch"
        seen += [id(e) for e in examples if not isinstance(e, ReplayExample)]
    assert sorted(seen) == sorted(id(e) for e in rows), "every training row exactly once per epoch"
    assert batches[-1][2] == (0, 12, 0)  # the plan has 12 batches of B - k rows
    used = [id(e) for examples, _, _ in batches for e in examples if isinstance(e, ReplayExample)]
    assert {used.count(i) for i in set(used)} <= {2, 3} and len(set(used)) == 10, "replay rows used evenly"


def test_replay_picks_are_deterministic_and_resume_from_any_position(tiny_dir, data_dir, tmp_path):
    cfg = replay_cfg(tiny_dir, data_dir, tmp_path, grad_accum=2)
    train, _, _ = encoded(cfg)

    def where(batches):
        return [([(e.where, isinstance(e, ReplayExample)) for e in ex], last, pos) for ex, last, pos in batches]

    straight = where(micro_batches(train, cfg, n=24))
    assert where(micro_batches(train, cfg, n=24)) == straight
    # a window ends every second micro-batch; start from the position the 5th window left
    pos = straight[9][2]
    assert where(micro_batches(train, cfg, pos[0], pos[1], n=14)) == straight[10:]
    cfg.train.seed += 1
    other = where(micro_batches(train, cfg, n=24))

    def picks(batches):
        return [[w for w, replayed in ws if replayed] for ws, _, _ in batches]

    assert picks(other) != picks(straight), "the seed moves the picks"


def _load_state(run_dir):
    from mlxpt.runs import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))


def test_replay_rows_are_trained_and_resume_equals_uninterrupted(tiny_dir, data_dir, tmp_path):
    from mlxpt.train.sft import run_sft

    kw = {"steps": 9, "dropout": 0.1, "batch_size": 4, "max_seq_len": 1024}  # every training row kept
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    straight_dir, _ = run_sft(replay_cfg(tiny_dir, data_dir, tmp_path / "a", **kw))
    cfg = replay_cfg(tiny_dir, data_dir, tmp_path / "b", **kw)
    part_dir, outcome = run_sft(cfg, stop=StopAfter(4 * 2 + 1))  # stopped in step 5
    assert outcome == "interrupted" and _load_state(part_dir)[1]["loop"]["step"] == 4
    resumed_dir, outcome = run_sft(cfg, resume_dir=part_dir)
    assert outcome == "finished"
    a, sa = _load_state(straight_dir)
    b, sb = _load_state(resumed_dir)
    # 24 rows, 3 per batch: 8 batches an epoch, so step 9 is the first of epoch 1
    assert (
        (sa["loop"]["epoch"], sa["loop"]["batch_index"]) == (sb["loop"]["epoch"], sb["loop"]["batch_index"]) == (1, 1)
    )
    for group in ("adapters", "optimizer", "rng"):
        for k in a[group]:
            np.testing.assert_allclose(a[group][k], b[group][k], rtol=0, atol=1e-6, err_msg=f"{group}/{k}")

    def steps(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["event"] == "step"]

    la, lb = steps(straight_dir), steps(resumed_dir)
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)
    # the replay rows' trained tokens count in the loss weight, their tokens in tokens/s
    train, _, _ = encoded(cfg)
    first, _, _ = micro_batches(train, cfg, n=1)[0]
    assert any(isinstance(e, ReplayExample) for e in first)
    assert la[0]["trained_tokens"] == sum(sum(e.mask[1:]) for e in first)
    assert la[0]["tokens"] == sum(len(e.tokens) - 1 for e in first)
    report = json.loads((straight_dir / "config.json").read_text())["data_report"]["replay"]
    assert report["rows_per_batch"] == 1 and report["train_rows_per_batch"] == 3 and report["rows"] == 10


def _no_run_folder(runs: Path) -> bool:
    return not runs.exists() or not any(runs.iterdir())


def train_cli(tmp_path, tiny_dir, data_dir, settings: dict) -> int:
    """`mlxpt train` with the replay settings in a YAML file (the same config path as the flags)."""
    yaml = tmp_path / "replay.yaml"
    yaml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    argv = ["train", "--model", str(tiny_dir), "--data", str(data_dir), "--runs-dir", str(tmp_path / "runs")]
    return main([*argv, "--steps", "2", "--config", str(yaml)])


@pytest.mark.parametrize(
    "settings,code",
    [
        ({"replay": "{replay}"}, "E561"),  # ratio 0
        ({"replay_ratio": 0.25}, "E560"),  # no file
        ({"replay": "{train}", "replay_ratio": 0.25}, "E563"),  # the training file itself
        ({"replay": "{valid}", "replay_ratio": 0.25}, "E563"),  # the validation file
        ({"replay": "{replay}", "replay_ratio": 0.5, "batch_size": 1}, "E562"),  # no room beside a training row
    ],
)
def test_replay_refusals_are_one_line_and_write_nothing(settings, code, tiny_dir, data_dir, tmp_path, capsys):
    replay = write_replay(tmp_path / "replay.jsonl")
    fill = {"replay": str(replay), "train": str(data_dir / "train.jsonl"), "valid": str(data_dir / "valid.jsonl")}
    settings = {k: v.format(**fill) if isinstance(v, str) else v for k, v in settings.items()}
    assert train_cli(tmp_path, tiny_dir, data_dir, settings) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error {code}:") and " - " in err[0], err
    assert _no_run_folder(tmp_path / "runs")


def test_bad_replay_rows_are_named_by_file_and_line(tiny_dir, data_dir, tmp_path, capsys):
    replay = write_replay(tmp_path / "replay.jsonl", 3)
    replay.write_text(replay.read_text() + '{"text": 5}\nnot json\n')
    assert train_cli(tmp_path, tiny_dir, data_dir, {"replay": str(replay), "replay_ratio": 0.25}) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 2
        and err[0].startswith("error E109")
        and err[0].endswith(f"({replay}:4) - use one format per file; split the file or convert the rows")
    ), err
    assert err[1].startswith("error E105") and f"({replay}:5)" in err[1], err
    assert _no_run_folder(tmp_path / "runs")
    from mlxpt.errors import DataError
    from mlxpt.train.sft import read_rows

    with pytest.raises(DataError, match="2 invalid rows in the replay file replay.jsonl"):
        read_rows(make_cfg(tiny_dir, data_dir, tmp_path, replay=str(replay), replay_ratio=0.25))
    replay.unlink()
    assert train_cli(tmp_path, tiny_dir, data_dir, {"replay": str(replay), "replay_ratio": 0.25}) == 1
    assert capsys.readouterr().err.startswith(f"error E101: file not found ({replay})")
    assert _no_run_folder(tmp_path / "runs")


def test_replay_rows_are_encoded_like_training_rows_before_any_weights(tiny_dir, data_dir, tmp_path, monkeypatch):
    from mlxpt.errors import DataError
    from mlxpt.train import runner
    from mlxpt.train.sft import run_sft

    cfg = replay_cfg(tiny_dir, data_dir, tmp_path, max_seq_len=1024, overlong="error")
    replay = tmp_path / "replay.jsonl"
    long = {"messages": [{"role": "user", "content": "x" * 1500}, {"role": "assistant", "content": "y"}]}
    replay.write_text(replay.read_text() + json.dumps(long) + "\n")
    monkeypatch.setattr(runner, "create_backend", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(DataError) as e:
        run_sft(cfg)
    assert e.value.code == "E203" and e.value.where == f"{replay}:11"
    assert _no_run_folder(tmp_path / "runs")


# --- mlxpt data self-answers ------------------------------------------------------------------


PROMPTS = [
    {"prompt": "Name a colour."},
    {"system": "Be brief.", "prompt": "What is 2 + 2?"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Say a word."}]},
]  # fmt: skip


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


EXPECTED = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    PROMPTS[2]["messages"],
]  # the prompts as conversations, in order


def test_self_answers_writes_sft_rows_that_data_check_accepts(tiny_dir, tmp_path, capsys):
    prompts, out = write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "sub" / "answers.jsonl"
    argv = ["data", "self-answers", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_dir)]
    assert main([*argv, "--max-tokens", "6", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "self-answers: 2/3 prompts" in err and "self-answers: 3/3 prompts" in err
    wrote, dropped = re.search(r"wrote (\d+) rows to .* \((\d+) empty answers dropped", err).groups()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == int(wrote) >= 1 and int(wrote) + int(dropped) == 3
    prefixes = [r["messages"][:-1] for r in rows]
    assert prefixes == [m for m in EXPECTED if m in prefixes], "each prompt's conversation, in order"
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip() for r in rows)
    first = out.read_bytes()
    assert main([*argv, "--max-tokens", "6", "--batch-size", "2"]) == 0
    assert out.read_bytes() == first, "greedy: the same bytes again"
    assert main(["data", "check", str(out), "--model", str(tiny_dir)]) == 0


def test_self_answers_drops_and_counts_empty_answers(tiny_dir, tmp_path, monkeypatch, capsys):
    from mlxpt.decode import batch
    from mlxpt.decode.batch import Completion

    def fake(model, tokenizer, prompts, max_tokens):
        return [Completion([1], " \n" if i == 0 else f"yes {i}", "stop") for i in range(len(prompts))]

    monkeypatch.setattr(batch, "generate_many", fake)
    prompts, out = write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "answers.jsonl"
    argv = ["data", "self-answers", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_dir)]
    assert main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [
        {"messages": [*EXPECTED[1], {"role": "assistant", "content": "yes 1"}]},
        {"messages": [*EXPECTED[2], {"role": "assistant", "content": "yes 2"}]},
    ]
    err = capsys.readouterr().err
    assert "wrote 2 rows" in err and "(1 empty answers dropped" in err
    monkeypatch.setattr(batch, "generate_many", lambda m, t, p, n: [Completion([], "", "stop") for _ in p])
    out.unlink()
    assert main(argv) == 1
    assert "E641" in capsys.readouterr().err and not out.exists()


def test_self_answers_refuses_an_out_that_is_an_input_or_a_run(tiny_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    before = prompts.read_bytes()
    run = tmp_path / "runs" / "sft-1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "status.json").write_text('{"status": "finished"}')
    model_copy = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    for out in (prompts, run, run / "answers.jsonl", model_copy / "answers.jsonl"):
        argv = ["data", "self-answers", "--prompts", str(prompts), "--out", str(out), "--model", str(model_copy)]
        assert main(argv) == 1, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error E617"), err
    assert prompts.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "status.json"]
    assert not (model_copy / "answers.jsonl").exists()
