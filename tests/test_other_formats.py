"""The formats people already have: Alpaca, ShareGPT and TRL's conversational rows are read by
every reader (training and `mlxpt data check`), broken rows are named by file:line in the other
tool's own field names, `mlxpt data convert` writes mlxpt's format, and mlx-lm's config keys are
read as mlxpt settings or refused with the mlxpt way."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from tiny import make_tokenizer
from transformers import AutoTokenizer

from mlxpt.cli import main
from mlxpt.config import build_config
from mlxpt.data.encode import encode
from mlxpt.data.formats import read_jsonl, scan_jsonl
from mlxpt.data.preference import load_preference, scan_preference
from mlxpt.errors import ConfigError, DataError

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Add these.", "input": "2 and 3", "output": "5", "system": "Be brief."},
    {"instruction": "And 4 more?", "output": "9", "history": [["Add 2 and 3.", "5"]]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]},
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Add 2 and 3."},
            {"from": "gpt", "value": "5"},
        ]
    },
]
TRL_PAIRS = [
    {"prompt": [msg(U, "Add 2 and 3.")], "chosen": [msg(A, "5")], "rejected": [msg(A, "6")]},
    {"chosen": [msg(U, "Add 1 and 1."), msg(A, "2")], "rejected": [msg(U, "Add 1 and 1."), msg(A, "3")]},
]


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_alpaca_rows_become_chat_rows(tmp_path):
    rows = read_jsonl(write(tmp_path / "a.jsonl", ALPACA))
    assert [r.source for r in rows] == ["alpaca"] * 3 and {r.kind for r in rows} == {"chat"}
    assert rows[0].data["messages"] == [msg(U, "Add 2 and 3."), msg(A, "5")]
    assert rows[1].data["messages"] == [msg("system", "Be brief."), msg(U, "Add these.\n2 and 3"), msg(A, "5")]
    assert rows[2].data["messages"] == [msg(U, "Add 2 and 3."), msg(A, "5"), msg(U, "And 4 more?"), msg(A, "9")]


def test_sharegpt_rows_become_chat_rows_and_mix_with_alpaca(tmp_path):
    rows = read_jsonl(write(tmp_path / "s.jsonl", [*SHAREGPT, ALPACA[0]]))
    assert [r.source for r in rows] == ["sharegpt", "sharegpt", "alpaca"]
    assert rows[1].data["messages"] == [msg("system", "Be brief."), msg(U, "Add 2 and 3."), msg(A, "5")]


@pytest.mark.parametrize(
    "row,code,fragment",
    [
        ({"instruction": "x", "input": "y"}, "E134", "alpaca row has no 'output'"),
        ({"output": "x"}, "E134", "no 'instruction'"),
        ({"instruction": "x", "output": 5}, "E135", "alpaca 'output' is int"),
        ({"instruction": "x", "output": "y", "history": ["x"]}, "E135", "'history'"),
        ({"instruction": " ", "output": "y"}, "E136", "'instruction' is empty"),
        ({"instruction": "x", "output": "y", "history": [["", "a"]]}, "E127", "history[0][0] (user) content is empty"),
        ({"conversations": "hi"}, "E137", "'conversations' is str"),
        ({"conversations": []}, "E137", "'conversations' is empty"),
        ({"conversations": [{"role": "user", "content": "q"}]}, "E137", "conversations[0] is not a turn"),
        ({"conversations": [{"from": "bob", "value": "q"}]}, "E138", "conversations[0] has unknown 'from' 'bob'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "E139", "value is empty"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "E129", "no assistant turn"),
        (
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            "E131",
            "ends with a user",
        ),
        ({"prompt": [msg(U, "q")], "completion": "a"}, "E140", "'prompt' is list but 'completion' is str"),
        ({"prompt": "q", "completion": [msg(A, "a")]}, "E142", "'completion' is list"),
        ({"prompt": [msg(U, "q")], "completion": [msg(U, "a")]}, "E144", "completion[0] has role 'user'"),
        ({"prompt": [msg(U, "q")], "completion": [msg(A, " ")]}, "E127", "completion[0] (assistant) content is empty"),
    ],
)
def test_broken_rows_of_other_formats_are_named_by_file_and_line(tmp_path, row, code, fragment):
    path = write(tmp_path / "bad.jsonl", [ALPACA[0] if "conversations" not in row else SHAREGPT[0], row])
    rows, errors = scan_jsonl(path)
    assert len(rows) == 1 and len(errors) == 1, [e.line() for e in errors]
    e = errors[0]
    assert e.code == code and fragment in e.what and e.where == f"{path}:2", e.line()


def test_alpaca_rows_with_their_rendered_text_are_alpaca_rows(tmp_path):
    """tatsu-lab/alpaca has instruction, input, output and text (the row in Alpaca's prompt
    template) on every row: each was once refused as mixing two formats (E110)."""
    row = {**ALPACA[1], "text": "Below is an instruction...\n### Response:\n5"}
    rows, errors = scan_jsonl(write(tmp_path / "a.jsonl", [row, {**ALPACA[0], "text": "x"}]))
    assert not errors and [r.source for r in rows] == ["alpaca"] * 2
    assert rows[0].data["messages"][-1] == msg(A, "5") and "text" not in rows[0].extra
    rows, errors = scan_jsonl(write(tmp_path / "b.jsonl", [{"instruction": "x", "text": "y"}]))
    assert [e.code for e in errors] == ["E110"]  # no output: still two half formats


def test_a_text_row_in_an_alpaca_file_is_a_mixed_file(tmp_path):
    rows, errors = scan_jsonl(write(tmp_path / "m.jsonl", [ALPACA[0], {"text": "hi"}]))
    assert errors[0].code == "E109" and "text row in an alpaca file" in errors[0].what


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path):
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    row = {"prompt": [msg(U, "Q one"), msg(A, "A one"), msg(U, "Q two")], "completion": [msg(A, "A two")]}
    (r,) = read_jsonl(write(tmp_path / "c.jsonl", [row]))
    assert r.kind == "chat" and r.source == "conversational completions" and r.data["train_from"] == 3
    ex = encode(r, tok)
    trained = tok.decode([t for t, m in zip(ex.tokens, ex.mask, strict=True) if m], skip_special_tokens=False)
    assert "A two" in trained and "A one" not in trained


def test_openai_weight_0_turns_are_context_and_bad_weights_are_refused(tmp_path):
    """OpenAI's fine-tuning files mark assistant turns to skip with "weight": 0; they were once
    trained like the others."""
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    row = {
        "messages": [
            msg(U, "Say hi"),
            {**msg(A, "BAD ANSWER"), "weight": 0},
            msg(U, "again"),
            {**msg(A, "good"), "weight": 1},
        ]
    }
    (r,) = read_jsonl(write(tmp_path / "w.jsonl", [row]))
    for mask in ("assistant", "prompt"):
        ex = encode(r, tok, mask=mask)
        trained = tok.decode([t for t, m in zip(ex.tokens, ex.mask, strict=True) if m], skip_special_tokens=False)
        assert "good" in trained and "BAD ANSWER" not in trained, (mask, trained)
    bad = [
        {"messages": [{**msg(U, "x"), "weight": 0}, msg(A, "y")]},  # not an assistant turn
        {"messages": [msg(U, "x"), {**msg(A, "y"), "weight": 0.5}]},
        {"messages": [msg(U, "x"), {**msg(A, "y"), "weight": True}]},
        {"messages": [msg(U, "x"), {**msg(A, "y"), "weight": 0}]},  # nothing left to train
    ]
    rows, errors = scan_jsonl(write(tmp_path / "bad.jsonl", bad))
    assert not rows and [e.code for e in errors] == ["E159"] * 4
    assert [e.where for e in errors] == [f"{tmp_path / 'bad.jsonl'}:{i}" for i in range(1, 5)]


def test_trl_unpaired_preference_rows_and_one_line_json_arrays_are_refused(tmp_path, capsys):
    """A KTO file (prompt, completion, label) was once read as SFT rows, training the completions
    labelled false; a JSON array on one line (pandas, datasets' to_json) got a misleading hint."""
    kto = [
        {"prompt": "2+2?", "completion": "5, obviously", "label": False},
        {"prompt": "2+3?", "completion": "5", "label": True},
    ]
    path = write(tmp_path / "kto.jsonl", kto)
    rows, errors = scan_jsonl(path)
    assert not rows and [e.code for e in errors] == ["E115", "E115"] and "KTO" in errors[0].what
    out = tmp_path / "o.jsonl"
    assert main(["data", "convert", path, "--out", str(out)]) == 1 and not out.exists()
    assert "E115" in capsys.readouterr().err
    rows, errors = scan_jsonl(write(tmp_path / "a.json", [json.dumps([ALPACA[0]] * 3)]))
    assert not rows and [e.code for e in errors] == ["E114"] and "jq -c" in errors[0].hint
    rows, errors = scan_jsonl(write(tmp_path / "b.jsonl", [ALPACA[0], json.dumps([ALPACA[0]])]))
    assert [e.code for e in errors] == ["E107"]  # an array among rows is a bad row, not a whole-file array


def test_trl_conversational_and_implicit_prompt_pairs(tmp_path):
    rows, same, errors = scan_preference(write(tmp_path / "p.jsonl", TRL_PAIRS))
    assert not errors and same == 0
    assert [r.source for r in rows] == ["conversational pairs", "implicit-prompt pairs"]
    assert rows[1].prompt == [msg(U, "Add 1 and 1.")] and rows[1].chosen == [msg(A, "2")]
    assert rows[1].rejected == [msg(A, "3")] and rows[1].chat
    bad = {"chosen": [msg(U, "a"), msg(A, "2")], "rejected": [msg(U, "b"), msg(A, "3")]}
    with pytest.raises(DataError) as e:
        load_preference(write(tmp_path / "bad.jsonl", [TRL_PAIRS[0], bad]))
    assert e.value.code == "E145" and e.value.where.endswith("bad.jsonl:2")
    early = {  # they part at the first assistant reply, before the last user turn
        "chosen": [msg(U, "q1"), msg(A, "good1"), msg(U, "q2"), msg(A, "good2")],
        "rejected": [msg(U, "q1"), msg(A, "bad1"), msg(U, "q2"), msg(A, "bad2")],
    }
    systems = {k: [msg("system", k), msg(U, "q"), msg(A, k)] for k in ("chosen", "rejected")}
    for row, where in ((early, "differ at [1], before their last user turn"), (systems, "differ at [0]")):
        with pytest.raises(DataError) as e:
            load_preference(write(tmp_path / "bad.jsonl", [row]))
        assert e.value.code == "E145" and where in e.value.what, e.value.line()


@pytest.mark.parametrize(
    "rows,says", [(ALPACA, "alpaca 3"), (SHAREGPT, "sharegpt 2"), (TRL_PAIRS, "2 preference pairs")]
)
def test_data_check_passes_files_of_other_tools(tmp_path, capsys, rows, says):
    assert main(["data", "check", write(tmp_path / "d.jsonl", rows)]) == 0
    out = capsys.readouterr().out
    assert says in out and "rejected: 0 rows" in out


@pytest.mark.parametrize(
    "rows,code",
    [
        ([*ALPACA, {"instruction": "x"}], "E134"),
        ([*SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]}], "E138"),
        ([*TRL_PAIRS, {"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "r"), msg(A, "b")]}], "E145"),
    ],
)
def test_data_check_names_broken_rows_of_other_tools(tmp_path, capsys, rows, code):
    path = write(tmp_path / "d.jsonl", rows)
    assert main(["data", "check", path]) == 1
    out = capsys.readouterr().out
    assert f"{code}:" in out and f"({path}:{len(rows)})" in out


def test_convert_writes_our_format_with_counts(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", [*ALPACA, *SHAREGPT, {**ALPACA[0], "answer": "5"}])
    out = tmp_path / "sub" / "out.jsonl"
    assert main(["data", "convert", src, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote 6 SFT rows to {out}: 4 alpaca, 2 sharegpt" in said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"messages": [msg(U, "Add 2 and 3."), msg(A, "5")]} and rows[-1]["answer"] == "5"
    assert [r.source for r in read_jsonl(out)] == ["chat"] * 6  # read back as our own format
    pairs = write(tmp_path / "pairs.jsonl", TRL_PAIRS)
    assert main(["data", "convert", pairs, "--out", str(tmp_path / "p.jsonl"), "--method", "dpo"]) == 0
    assert "1 conversational pairs, 1 implicit-prompt pairs" in capsys.readouterr().out
    back, _, errors = scan_preference(tmp_path / "p.jsonl")
    assert not errors and [r.source for r in back] == ["conversational pairs"] * 2


def test_convert_refuses_its_input_as_output_and_bad_rows(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", ALPACA)
    before = (tmp_path / "in.jsonl").read_bytes()
    os.symlink(src, tmp_path / "link.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    for out in (src, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        assert main(["data", "convert", src, "--out", str(out)]) == 1
        assert capsys.readouterr().err.startswith("error E617")
    assert (tmp_path / "in.jsonl").read_bytes() == before
    bad = write(tmp_path / "bad.jsonl", [*ALPACA, {"instruction": "x"}])
    assert main(["data", "convert", bad, "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "E134" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


MLX_LM_YAML = """model: {model}
train: true
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.01
data: {data}
seed: 3
num_layers: 8
batch_size: 2
iters: 30
val_batches: 5
learning_rate: 1.0e-5
steps_per_eval: 10
resume_adapter_file: null
save_every: 10
test: false
test_batches: 100
max_seq_length: 256
grad_checkpoint: false
lr_schedule:
  name: cosine_decay
  warmup: 5
  warmup_init: 1.0e-7
  arguments: [1.0e-5, 1000, 1.0e-7]
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 4
  scale: 10.0
  dropout: 0.05
"""


def test_mlx_lm_config_keys_are_read_as_ours(tmp_path):
    path = tmp_path / "mlx_lm.yaml"
    path.write_text(MLX_LM_YAML.format(model="smollm2-135m", data="my_data"))
    cfg = build_config("sft", {"seed": "4"}, str(path))
    t, a = cfg.train, cfg.adapter
    assert (t.steps, t.eval_batches, t.eval_every, t.save_every, t.seed) == (30, 5, 10, 10, 4)
    assert (t.learning_rate, t.weight_decay, t.schedule, t.warmup_steps) == (1e-5, 0.01, "cosine", 5)
    assert t.min_lr_ratio == pytest.approx(0.01)
    assert (a.rank, a.alpha, a.dropout, a.num_layers) == (4, 40.0, 0.05, 8)  # alpha = scale x rank
    assert a.targets == "self_attn.q_proj,self_attn.v_proj"
    assert (cfg.data.max_seq_len, cfg.data.batch_size, cfg.data.data) == (256, 2, "my_data")


def test_mlx_lm_numbers_without_a_dot_are_numbers_as_in_mlx_lm(tmp_path):
    """PyYAML reads `1e-5` (YAML 1.1, no dot) as a string; mlx-lm's loader reads it as a float.
    The schedule's arguments were once skipped for it, training at 10x the learning rate."""
    text = MLX_LM_YAML.format(model="m", data="d").replace("learning_rate: 1.0e-5\n", "")
    text = text.replace("[1.0e-5, 1000, 1.0e-7]", "[1e-5, 1000, 1e-7]").replace("scale: 10.0", "scale: 1e1")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["lr_schedule"]["arguments"][0] == "1e-5"  # the YAML 1.1 trap itself
    cfg = build_config("sft", {}, str(path))
    assert cfg.train.learning_rate == pytest.approx(1e-5) and cfg.train.min_lr_ratio == pytest.approx(0.01)
    assert cfg.adapter.alpha == pytest.approx(40.0)


@pytest.mark.parametrize(
    "extra,codes",
    [
        ("hf_dataset: {path: x}\ntrain_mode: dpo\n", ["E580", "E580"]),
        ("steps: 20\n", ["E584"]),
        ("lr_schedule: {name: exponential_decay, arguments: [1.0e-5, 0.9]}\n", ["E583"]),
        ("lr_schedule: {name: cosine_decay, arguments: [fast, 1000]}\n", ["E583"]),
        ("lr_schedule: {name: cosine_decay, arguments: [0, 1000]}\n", ["E583"]),
        ("lr_schedule: {name: cosine_decay, arguments: 1.0e-5}\n", ["E583"]),
        ("lora_parameters: {rank: 4, scale: 2.0, alpha: 8}\n", ["E584"]),
    ],
)
def test_mlx_lm_keys_without_an_equivalent_are_refused_in_one_pass(tmp_path, capsys, extra, codes):
    settings = {**yaml.safe_load(MLX_LM_YAML.format(model="m", data="d")), **yaml.safe_load(extra)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        build_config("sft", {}, str(path))
    assert [x.code for x in e.value.errors] == codes and all("\n" not in x.line() for x in e.value.errors)
    assert main(["train", "--config", str(path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert [line.split(":")[0] for line in err] == [f"error {c}" for c in codes]


def test_mlx_lm_reporting_and_output_keys_are_ignored_with_a_note(tmp_path, capsys):
    """mlx-lm's own example config (adapter_path, steps_per_report, wandb...) trains as is: keys
    that do not change what is trained get one note each, nothing else; grad_checkpoint is ours."""
    extra = "adapter_path: adapters\nsteps_per_report: 10\ngrad_checkpoint: true\nwandb: proj\n"
    settings = {**yaml.safe_load(MLX_LM_YAML.format(model="m", data="d")), **yaml.safe_load(extra)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    cfg = build_config("sft", {}, str(path))
    assert cfg.train.steps == 30 and cfg.train.grad_checkpoint is True
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 4 and all(n.startswith(f"note: {path}: mlx-lm key") for n in notes), notes
    text = "\n".join(notes)
    assert "'adapter_path' ignored" in text and "runs_dir" in text and "'steps_per_report' ignored" in text
    # mlx-lm trains every token without mask_prompt, mlxpt the assistant turns: said, not silent
    assert "'mask_prompt' not given" in text and cfg.data.mask == "assistant"
    path.write_text(yaml.safe_dump({**settings, "mask_prompt": False}, sort_keys=False))
    assert build_config("sft", {}, str(path)).data.mask == "none"
    assert "mask_prompt" not in capsys.readouterr().err


def test_mlx_lm_resume_adapter_file_becomes_from_run(tmp_path, capsys):
    settings = {**yaml.safe_load(MLX_LM_YAML.format(model="m", data="d"))}
    settings["resume_adapter_file"] = "runs/x/adapters.safetensors"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert build_config("sft", {}, str(path)).adapter.from_run == "runs/x"
    assert "read as from_run: runs/x" in capsys.readouterr().err
