"""Loss masks: every assistant turn and its end-of-turn token trained, nothing else."""

import subprocess
import sys

import pytest
from tiny import make_tokenizer
from transformers import AutoTokenizer

from mlxpt.data.check import check_report, render_masked
from mlxpt.data.encode import encode, encode_all
from mlxpt.data.formats import Row
from mlxpt.errors import DataError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    d = make_tokenizer(tmp_path_factory.mktemp("plain"), chat_template=None)
    return AutoTokenizer.from_pretrained(d)


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    msgs += [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]
    return Row(where="t.jsonl:1", kind="chat", data={"messages": msgs})


def trained(tok, ex) -> list[str]:
    """Decoded text of each maximal trained span."""
    spans, cur = [], []
    for t, m in zip(ex.tokens, ex.mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


def test_multiturn_trains_every_assistant_turn(tok):
    ex = encode(chat("Q one", "A one", "Q two", "A two", system="Be brief."), tok)
    assert trained(tok, ex) == ["A one<|im_end|>\n", "A two<|im_end|>\n"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ex.tokens) if t == end]
    assert [ex.mask[i] for i in ends] == [
        0,
        0,
        1,
        0,
        1,
    ]  # system, user, asst, user, asst
    assert len(ex.tokens) == len(ex.mask) and ex.where == "t.jsonl:1"
    assert ex.tokens == tok.encode(tok.apply_chat_template(
        chat("Q one", "A one", "Q two", "A two", system="Be brief.").data["messages"],
        tokenize=False), add_special_tokens=False)  # fmt: skip


def test_mask_modes_prompt_and_none(tok):
    row = chat("Q one", "A one", "Q two", "A two")
    ex = encode(row, tok, mask="prompt")
    rest = "A one<|im_end|>\n<|im_start|>user\nQ two<|im_end|>\n<|im_start|>assistant\nA two"
    assert trained(tok, ex) == [rest + "<|im_end|>\n"]
    ex = encode(row, tok, mask="none")
    assert ex.mask[0] == 0 and all(ex.mask[1:])


def test_eos_trained_when_pad_is_eos(tmp_path):
    t = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id
    ex = encode(chat("hi", "hello"), t)
    assert ex.tokens[-2] == t.eos_token_id and ex.mask[-2] == 1
    text = encode(Row("t:1", "text", {"text": "abc"}), t)
    assert text.tokens[-1] == t.eos_token_id and text.mask[-1] == 1


def test_completions_with_and_without_template(tok, plain_tok):
    row = Row("c.jsonl:1", "completions", {"prompt": "2+2=", "completion": "4"})
    assert trained(tok, encode(row, tok)) == ["4<|im_end|>\n"]
    ex = encode(row, plain_tok)
    assert plain_tok.decode(ex.tokens, skip_special_tokens=False) == "2+2=4<|im_end|>"
    assert trained(plain_tok, ex) == ["4<|im_end|>"]
    assert sum(encode(row, plain_tok, mask="none").mask) == len(ex.tokens) - 1


def test_text_rows_train_everything_with_one_eos(plain_tok):
    ex = encode(Row("t:1", "text", {"text": "hello"}), plain_tok, mask="assistant")
    assert plain_tok.decode(ex.tokens, skip_special_tokens=False) == "hello<|im_end|>"
    assert ex.mask == [0] + [1] * (len(ex.tokens) - 1)
    ex2 = encode(Row("t:1", "text", {"text": "hello<|im_end|>"}), plain_tok)
    assert ex2.tokens == ex.tokens  # no second EOS


def test_chat_without_template_is_an_error(plain_tok):
    with pytest.raises(DataError) as info:
        encode(chat("a", "b"), plain_tok)
    assert info.value.code == "E201" and "chat template" in info.value.hint
    assert info.value.where == "t.jsonl:1"


class BosTokenizer:
    """A tokenizer that prepends BOS itself (Llama style); its template may also write BOS."""

    def __init__(self, tok, template_bos: bool):
        self.tk, self.bos_token = tok, "<|endoftext|>"
        self.bos_token_id = tok.convert_tokens_to_ids(self.bos_token)
        self.eos_token_id, self.chat_template = tok.eos_token_id, tok.chat_template
        self.template_bos = template_bos

    def encode(self, text, add_special_tokens=True):
        ids = self.tk.encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages, **kw):
        return self.bos_token * self.template_bos + self.tk.apply_chat_template(messages, **kw)


@pytest.mark.parametrize("template_bos", [True, False])
def test_exactly_one_bos(tok, template_bos):
    bt, row = BosTokenizer(tok, template_bos), chat("a", "b", "c", "d")
    base = encode(row, tok)
    ex = encode(row, bt)
    assert ex.tokens == [
        bt.bos_token_id,
        *base.tokens,
    ]  # one BOS, from template or from us
    assert ex.mask == [0, *base.mask]
    text = encode(Row("t:1", "text", {"text": "hi"}), bt)
    assert text.tokens == [bt.bos_token_id, *tok.encode("hi"), bt.eos_token_id]


def test_prefix_unstable_template_refused(tmp_path):
    unstable = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
        "<|im_start|>assistant\n(earlier)<|im_end|>\n{% else %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    t = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path, chat_template=unstable))
    assert encode(chat("a", "b"), t) is not None  # single turn is fine
    with pytest.raises(DataError) as info:
        encode(chat("a", "b", "c", "d"), t)
    assert info.value.code == "E202" and "prefix-stable" in info.value.what


def test_template_exception_is_a_data_error(tmp_path):
    t = AutoTokenizer.from_pretrained(
        make_tokenizer(tmp_path, chat_template="{{ raise_exception('roles must alternate') }}")
    )
    with pytest.raises(DataError) as info:
        encode(chat("a", "b"), t)
    assert info.value.code == "E204" and "roles must alternate" in info.value.what


def test_overlong_policies_and_counts(tok):
    short, long_ = chat("hi", "yo"), chat("hi", "x" * 400)
    n_short = len(encode(short, tok).tokens)
    rows = [short, long_, long_]
    ex, rep = encode_all(rows, tok, max_len=200, overlong="truncate")
    assert [len(e.tokens) for e in ex] == [n_short, 200, 200]
    assert all(len(e.mask) == 200 for e in ex[1:])
    assert rep["rows"] == 3 and rep["kept"] == 3 and rep["truncated"] == 2
    assert rep["dropped"] == 0 and rep["max_len_seen"] > 400
    assert rep["tokens"] == n_short + 400 and rep["trained_tokens"] == sum(sum(e.mask) for e in ex)
    ex, rep = encode_all(rows, tok, max_len=200, overlong="drop")
    assert len(ex) == 1 and rep["dropped"] == 2 and rep["truncated"] == 0
    assert encode(long_, tok, max_len=200, overlong="drop") is None
    with pytest.raises(DataError) as info:
        encode_all([long_, short, long_], tok, max_len=200, overlong="error")
    errs = info.value.errors
    assert [e.code for e in errs] == [
        "E203",
        "E203",
    ] and "longer than max_len 200" in errs[0].what
    # truncation that removes every trained token drops the row instead
    ex, rep = encode_all([short], tok, max_len=n_short - 6)
    assert ex == [] and rep["dropped"] == 1 and rep["untrainable"] == 1


def test_mlx_lm_wrapper_forwards(tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    row = chat("Q", "A", "Q2", "A2")
    assert encode(row, TokenizerWrapper(tok)) == encode(row, tok)


def test_check_report_with_tokenizer(tmp_path, tok):
    (tmp_path / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    text, n = check_report(str(tmp_path), tokenizer=tok)
    assert n == 1 and "E129" in text
    assert "train: 1 valid rows (chat 1)" in text and "tokens: min" in text
    assert "[[yo<|im_end|>\n]]" in text
    text, _ = check_report(str(tmp_path), tokenizer=tok, color=True)
    assert "\x1b[7myo" in text


def test_render_masked():
    class Dec:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(96 + i) for i in ids)

    assert render_masked(Dec(), [1, 2, 3, 4], [0, 1, 1, 0]) == "a[[bc]]d"


def test_data_package_imports_no_mlx_or_textual():
    code = (
        "import sys, mlxpt.data, mlxpt.data.synth; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'textual')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
