"""Preference data: bad rows give one-line errors before any model load; encoding keeps the prompt."""

from __future__ import annotations

import json

import pytest
import tiny

from mlxpt.data.preference import encode_preference, load_preference, scan_preference
from mlxpt.errors import DataError

GOOD = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5\nAnswer: 5", "rejected": "2 + 3 = 6\nAnswer: 6"}
CHAT = {
    "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
    "chosen": [{"role": "assistant", "content": "Answer: 5"}],
    "rejected": [{"role": "assistant", "content": "Answer: 6"}],
}

BAD = [
    ('{"prompt": "hi", "chosen": "a"}', "E180"),
    ({**GOOD, "prompt": 5}, "E181"),
    ({**GOOD, "prompt": "   "}, "E182"),
    ({**GOOD, "chosen": None}, "E183"),
    ({**GOOD, "rejected": ""}, "E184"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": "x"}]}, "E185"),
    ({**CHAT, "prompt": [{"content": "no role"}]}, "E186"),
    ({**CHAT, "chosen": [{"role": "user", "content": "x"}]}, "E187"),
    ({**CHAT, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "E188"),
    ({**GOOD, "system": 3}, "E189"),
    ({**CHAT, "system": "s", "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "E189"),
    ({**CHAT, "rejected": []}, "E184"),
    ({**CHAT, "chosen": "Answer: 5"}, "E185"),
    ('{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}', "E112"),
    ("[1, 2]", "E107"),
    ('{"prompt": "a", ', "E105"),
]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,code", BAD, ids=[c + "-" + str(i) for i, (_, c) in enumerate(BAD)])
def test_bad_rows_are_one_line_errors_with_file_line(row, code, tmp_path):
    path = _write(tmp_path / "train.jsonl", [GOOD, row])
    with pytest.raises(DataError) as e:
        load_preference(path)
    line = e.value.line()
    assert e.value.code == code and f"{path}:2" in line and "\n" not in line and " - " in line, line


def test_every_problem_is_collected_in_one_pass(tmp_path):
    path = _write(tmp_path / "train.jsonl", [row for row, _ in BAD])
    rows, _, errors = scan_preference(path)
    assert rows == [] and [e.code for e in errors] == [c for _, c in BAD]


def test_identical_pairs_are_dropped_and_counted_then_refused_above_5_percent(tmp_path):
    same = {**GOOD, "rejected": "2 + 3 =   5\n Answer: 5 "}  # equal after whitespace normalisation
    train, _, counts = load_preference(_write(tmp_path / "a.jsonl", [GOOD] * 40 + [same]))
    assert len(train) == 40 and counts["train"] == 1
    with pytest.raises(DataError) as e:
        load_preference(_write(tmp_path / "b.jsonl", [GOOD] * 10 + [same]))
    assert e.value.code == "E190" and "1 of 11" in e.value.line()


def test_empty_file_and_folder_without_train(tmp_path):
    with pytest.raises(DataError) as e:
        load_preference(_write(tmp_path / "empty.jsonl", []))
    assert e.value.code == "E103"
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError) as e:
        load_preference(tmp_path / "dir")
    assert e.value.code == "E160"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.make_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_encoding_uses_the_template_and_trains_end_of_turn(tok, tmp_path):
    rows, _, _ = load_preference(_write(tmp_path / "t.jsonl", [GOOD, CHAT, {**GOOD, "system": "Be brief."}]))
    ex, report = encode_preference(rows, tok, max_len=512, overlong="truncate")
    assert report["kept"] == 3
    e = ex[0]
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": GOOD["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(e.prompt) == prompt_text
    assert tok.decode(e.chosen) == GOOD["chosen"] + "<|im_end|>\n"
    assert tok.decode(e.rejected) == GOOD["rejected"] + "<|im_end|>\n"
    assert "Be brief." in tok.decode(ex[2].prompt)
    chosen_row, _ = e.rows()
    assert chosen_row.mask == [0] * len(e.prompt) + [1] * len(e.chosen)


def test_overlong_policies_never_cut_the_prompt(tok, tmp_path):
    long = {**GOOD, "chosen": "x" * 300 + " Answer: 5", "rejected": "y" * 300}
    rows, _, _ = load_preference(_write(tmp_path / "t.jsonl", [GOOD, long]))
    n_prompt = len(encode_preference(rows[:1], tok, 512, "truncate")[0][0].prompt)
    ex, report = encode_preference(rows, tok, 100, "truncate")
    assert report["truncated"] == 1 and len(ex) == 2
    assert len(ex[1].prompt) == n_prompt and len(ex[1].prompt) + len(ex[1].chosen) == 100
    ex, report = encode_preference(rows, tok, 100, "drop")
    assert len(ex) == 1 and report["dropped_too_long"] == 1
    with pytest.raises(DataError) as e:
        encode_preference(rows, tok, 100, "error")
    assert e.value.code == "E192"
    ex, report = encode_preference(rows, tok, n_prompt, "truncate")  # the prompt leaves no room
    assert ex == [] and report["dropped_no_room"] == 2


def test_chat_form_without_a_template_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(str(tiny.make_tokenizer(tmp_path / "tok", chat_template=None)))
    rows, _, _ = load_preference(_write(tmp_path / "t.jsonl", [CHAT]))
    with pytest.raises(DataError) as e:
        encode_preference(rows, tk, 512, "truncate")
    assert e.value.code == "E193"
    rows, _, _ = load_preference(_write(tmp_path / "s.jsonl", [GOOD]))  # strings fall back to plain text
    assert encode_preference(rows, tk, 512, "truncate")[1]["kept"] == 1


def test_bundled_preference_data_is_valid_and_verifiably_ordered():
    """Chosen answers right in the form the prompt asks for; rejected is wrong (another number) or
    ignores the instruction (the working when asked for a number, the number when asked for steps)."""
    import re
    from pathlib import Path

    from mlxpt.data.synth import ASK_NUMBER, ASK_STEPS, extract_answer, problem_of

    root = Path(__file__).resolve().parent.parent / "assets" / "pref"
    train, valid, counts = load_preference(root)
    assert (len(train), len(valid)) == (1000, 100) and counts == {"train": 0, "valid": 0}
    kinds = {"wrong number": 0, "ignores the instruction": 0}
    for row in train + valid:
        prompt, good, bad = row.prompt[-1]["content"], row.chosen[0]["content"], row.rejected[0]["content"]
        asks_number, asks_steps = any(a in prompt for a in ASK_NUMBER), any(a in prompt for a in ASK_STEPS)
        bare = re.compile(r"\d+")
        assert extract_answer(good) is not None and bool(bare.fullmatch(good)) == asks_number, row
        if extract_answer(bad) != extract_answer(good):
            kinds["wrong number"] += 1
        else:
            assert (asks_number and not bare.fullmatch(bad)) or (asks_steps and bare.fullmatch(bad)), row
            kinds["ignores the instruction"] += 1
    assert kinds["ignores the instruction"] > 100 and kinds["wrong number"] > 700, kinds
    sft = {
        problem_of(json.loads(x))
        for split in ("train", "valid", "test")
        for x in (root.parent / "sft" / f"{split}.jsonl").read_text().splitlines()
    }
    assert not sft & {problem_of(r.prompt[-1]["content"]) for r in train + valid}
