"""The bundled arithmetic data teaches the skill, not a template (issue 22), and the OOD split is
really out of distribution.

Every training problem is solved here from its text alone, sentence by sentence, by a table of the
phrasings of mlxpt/data/synth.py: so the checks on answers, step counts and phrasings do not trust
the generator's own bookkeeping. A sentence the table does not know fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from mlxpt.data import synth

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"

N, S, W = r"[A-Z]\w+", r"(?:[A-Z]\w+|he|she)", r"\w+"  # a name, the subject (name or pronoun), a word
FRACTION = {"half": 2, "a third": 3, "a quarter": 4}
TIMES = {"doubles": 2, "triples": 3, "quadruples": 4}


# (operation, pattern, steps, value after the sentence given the value before and the numbers)
PHRASINGS = [
    ("start", rf"{N} has (\d+) {W}\.", 0, lambda v, a: int(a)),
    ("start", rf"{N} starts with (\d+) {W}\.", 0, lambda v, a: int(a)),
    ("start", rf"There are (\d+) {W} in {N}'s {W}\.", 0, lambda v, a: int(a)),
    ("start", rf"{N} collected (\d+) {W}\.", 0, lambda v, a: int(a)),
    ("*", rf"{N} buys (\d+) {W} of {W} with (\d+) in each\.", 1, lambda v, k, m: int(k) * int(m)),
    ("*", rf"{N} has (\d+) {W} of {W}, and each {W} holds (\d+)\.", 1, lambda v, k, m: int(k) * int(m)),
    ("*", rf"{N} fills (\d+) {W} with (\d+) {W} each\.", 1, lambda v, k, m: int(k) * int(m)),
    ("+", rf"{S} gets (\d+) more {W}\.", 1, lambda v, x: v + int(x)),
    ("+", rf"{N} gives (?:him|her) (\d+) more\.", 1, lambda v, x: v + int(x)),
    ("+", rf"Then {S} finds another (\d+)\.", 1, lambda v, x: v + int(x)),
    ("+", rf"Later, {S} buys (\d+) more {W}\.", 1, lambda v, x: v + int(x)),
    ("+", rf"{N} has (\d+) more {W} than {N}\.", 1, lambda v, x: v + int(x)),
    ("-", rf"{S} gives (\d+) of them to {N}\.", 1, lambda v, x: v - int(x)),
    ("-", rf"{S} loses (\d+) {W}\.", 1, lambda v, x: v - int(x)),
    ("-", rf"Then {S} uses (\d+) of (?:his|her) {W}\.", 1, lambda v, x: v - int(x)),
    ("-", rf"{S} sells (\d+) of them\.", 1, lambda v, x: v - int(x)),
    ("-", rf"{N} has (\d+) fewer {W} than {N}\.", 1, lambda v, x: v - int(x)),
    ("*", rf"{N} has (\d+) times as many {W} as {N}\.", 1, lambda v, k: v * int(k)),
    ("*", rf"Then {S} (doubles|triples|quadruples) (?:his|her) {W}\.", 1, lambda v, w: v * TIMES[w]),
    ("*", rf"{N}'s {W} then grow to (\d+) times as many\.", 1, lambda v, k: v * int(k)),
    ("*+", rf"{S} also buys (\d+) {W} with (\d+) {W} in each\.", 2, lambda v, k, m: v + int(k) * int(m)),
    ("*+", rf"{N} gives (?:him|her) (\d+) full {W}, each with (\d+) {W}\.", 2, lambda v, k, m: v + int(k) * int(m)),
    ("/", rf"{S} keeps (half|a third|a quarter) of them and gives the rest away\.", 1, lambda v, f: _div(v, FRACTION[f])),
    ("/", rf"{S} splits them into (\d+) equal piles and keeps one pile\.", 1, lambda v, k: _div(v, int(k))),
    ("/", rf"{N} has (half|a third|a quarter) as many {W} as {N}\.", 1, lambda v, f: _div(v, FRACTION[f])),
    ("/", rf"{S} shares them equally among (\d+) friends\.", 1, lambda v, k: _div(v, int(k))),
    ("/", rf"{S} packs them equally into (\d+) {W}\.", 1, lambda v, k: _div(v, int(k))),
]  # fmt: skip
QUESTION = re.compile(r"(How many .*\?|Find the number of .*\.)")


def _div(v: int, k: int) -> int:
    assert v % k == 0, (v, k)
    return v // k


def solve(problem: str) -> tuple[int, int, list[str]]:
    """(answer, number of steps, the phrasings used) of a training problem, from its text alone."""
    value, steps, used = None, 0, []
    sentences = re.split(r"(?<=[.?])\s+", problem)
    assert QUESTION.fullmatch(sentences[-1]), problem
    for s in sentences[:-1]:
        hits = [(i, m) for i, (_, p, _, _) in enumerate(PHRASINGS) if (m := re.fullmatch(p, s))]
        assert len(hits) == 1, f"{len(hits)} phrasings match {s!r} in {problem!r}"
        i, m = hits[0]
        op, _, n, fn = PHRASINGS[i]
        assert (value is None) == (op == "start" or i in range(4, 7)), problem  # an opening comes first, once
        value = fn(value, *m.groups())
        assert value >= 0, problem
        steps += n
        used.append(i)
    return value, steps, used


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    out = {f"sft/{s}": _jsonl(ASSETS / "sft" / f"{s}.jsonl") for s in ("train", "valid", "test")}
    out |= {f"pref/{s}": _jsonl(ASSETS / "pref" / f"{s}.jsonl") for s in ("train", "valid")}
    out |= {f"grpo/{s}": _jsonl(ASSETS / "grpo" / f"{s}.jsonl") for s in ("train", "test")}
    out["ood/test"] = _jsonl(ASSETS / "ood" / "test.jsonl")
    return out


def _question(row: dict) -> str:
    return row["prompt"] if "prompt" in row else synth.question_of(row)


def _replies(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def _is_worked(reply: str) -> bool:
    *lines, last = reply.split("\n")
    return (
        bool(lines)
        and all(re.fullmatch(r"\d+ [-+*/] \d+ = \d+", x) for x in lines)
        and bool(re.fullmatch(r"Answer: \d+", last))
    )


def _asks_number(text: str) -> bool:
    return any(a in text for a in synth.ASK_NUMBER)


def test_training_problems_take_one_to_four_steps_in_every_proportion(data):
    steps = Counter(solve(synth.problem_of(r))[1] for r in data["sft/train"])
    assert set(steps) == {1, 2, 3, 4}, steps
    share = {k: v / len(data["sft/train"]) for k, v in steps.items()}
    for k, want in {1: 0.25, 2: 0.30, 3: 0.25, 4: 0.20}.items():
        assert abs(share[k] - want) < 0.06, share
    for r in data["sft/train"]:  # a worked reply shows exactly the steps the problem takes
        first = _replies(r)[0]
        if _is_worked(first):
            assert len(first.split("\n")) - 1 == solve(synth.problem_of(r))[1], r


def test_every_operation_is_phrased_at_least_three_ways(data):
    used = Counter(i for r in data["sft/train"] for i in set(solve(synth.problem_of(r))[2]))
    by_op: dict[str, set[int]] = {}
    for i in used:
        for op in PHRASINGS[i][0].replace("start", ""):
            by_op.setdefault(op, set()).add(i)
    assert {op: len(v) >= 3 for op, v in by_op.items()} == dict.fromkeys("+-*/", True), by_op
    assert len(used) == len(PHRASINGS)  # every phrasing occurs in training


def test_replies_follow_the_instruction(data):
    for split in ("sft/train", "sft/valid", "sft/test"):
        rows = data[split]
        bare = [r for r in rows if _asks_number(synth.question_of(r))]
        assert 0.2 < len(bare) / len(rows) < 0.4, split
        for r in rows:
            replies = _replies(r)
            if r in bare:
                assert all(re.fullmatch(r"\d+", x) for x in replies), r
            else:
                assert all(_is_worked(x) for x in replies), r
    train = data["sft/train"]
    prompts = [synth.question_of(r) for r in train]
    for phrasing in synth.ASK_NUMBER + synth.ASK_STEPS:
        assert sum(phrasing in p for p in prompts) >= 20, phrasing
    systems = [
        (r["messages"][0]["content"], _asks_number(synth.question_of(r)))
        for r in train
        if r["messages"][0]["role"] == "system"
    ]
    assert 0.18 < len(systems) / len(train) < 0.32
    assert not [s for s, bare in systems if s in (synth.SYSTEMS_STEPS if bare else synth.SYSTEMS_NUMBER)]
    assert {s for s, _ in systems} == set(synth.SYSTEMS_ANY + synth.SYSTEMS_STEPS + synth.SYSTEMS_NUMBER)
    assert 0.06 < sum(len(_replies(r)) == 2 for r in train) / len(train) < 0.2  # follow-up turns


def test_extract_answer_of_every_reply_is_the_answer(data):
    """Solved from the question text: SFT first replies, test answers, GRPO and preference answers.
    (A generator row with a follow-up carries the follow-up's answer: GRPO prompts once had it.)"""
    for split in ("sft/train", "sft/valid", "sft/test"):
        for r in data[split]:
            replies = _replies(r)
            assert synth.extract_answer(replies[0]) == str(solve(synth.problem_of(r))[0]), r
            assert r.get("answer", synth.extract_answer(replies[-1])) == synth.extract_answer(replies[-1])
    for r in data["grpo/train"] + data["grpo/test"]:
        assert r["answer"] == str(solve(synth.problem_of(r["prompt"]))[0]), r
        assert not _asks_number(r["prompt"]), r  # the default format reward wants an `Answer:` line
    for r in data["pref/train"] + data["pref/valid"]:
        assert synth.extract_answer(r["chosen"]) == str(solve(synth.problem_of(r["prompt"]))[0]), r
    for r in data["ood/test"]:
        assert synth.extract_answer(_replies(r)[-1]) == r["answer"]


def test_no_problem_is_shared_between_any_two_splits(data):
    keys = {name: [synth.problem_of(_question(r)) for r in rows] for name, rows in data.items()}
    for name, ks in keys.items():
        assert len(set(ks)) == len(ks), name
    for a, b in combinations(keys, 2):
        assert not set(keys[a]) & set(keys[b]), (a, b)


# --- out of distribution ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ood():
    spec = importlib.util.spec_from_file_location("make_ood", ASSETS / "make_ood.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skeleton_maker(ood):
    names = {n for n, _ in synth.NAMES + ood.PEOPLE}
    items = {w for pair in synth.ITEMS for w in pair} | set(synth.PLURAL.values())
    items |= {w for g in ood.GOODS for w in g[:2]} | set(ood.INGREDIENTS) | {w for d in ood.DISHES for w in d}
    items |= set(ood.ACTIVITIES)
    numbers = set(ood.WORDS) | set(synth.FRACTION.values()) | set(synth.MULTIPLY.values()) | {"double", "triple"}
    words = sorted(names | items | numbers, key=len, reverse=True)
    sub = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")
    pron = re.compile(r"\b(he|she|him|her|his)\b", re.IGNORECASE)

    def skeleton(sentence: str) -> str:
        s = re.sub(r"\d[\d,]*", "#", sentence)
        s = sub.sub(lambda m: "#" if m.group(1) in numbers else "N" if m.group(1) in names else "I", s)
        return pron.sub("P", s).strip().lower()

    return skeleton


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.?!])\s+|\n", text) if s.strip()]


def test_ood_sentences_share_no_skeleton_with_training(data, ood):
    skeleton = _skeleton_maker(ood)
    training = [_question(r) for split in ("sft/train", "sft/valid", "pref/train", "grpo/train") for r in data[split]]
    train_skeletons = {skeleton(s) for q in training for s in _sentences(q)}
    assert skeleton("Mia has 12 apples.") == skeleton("Priya has twelve notebooks.")  # the skeleton is blind to these
    for r in data["ood/test"]:
        q = synth.question_of(r)
        shared = {skeleton(s) for s in _sentences(q)} & train_skeletons
        assert not shared, (q, shared)


def test_ood_step_counts_lie_outside_training(data):
    ood_steps = Counter(len(_replies(r)[0].split("\n")) - 1 for r in data["ood/test"])
    n = len(data["ood/test"])
    assert n == 200 and set(ood_steps) <= {1, 2, 3, 5, 6}
    assert 0.35 <= ood_steps[1] / n <= 0.45, ood_steps
    assert 0.15 <= (ood_steps[5] + ood_steps[6]) / n <= 0.20, ood_steps
    train_max = max(solve(synth.problem_of(r))[1] for r in data["sft/train"] + data["sft/valid"])
    assert train_max == 4 and max(ood_steps) > train_max


def test_ood_instructions_and_names_never_appear_in_training(data, ood):
    train_text = [
        m["content"]
        for split in ("sft/train", "sft/valid")
        for r in data[split]
        for m in r["messages"]
        if m["role"] != "assistant"
    ] + [r.get("system", "") + r["prompt"] for split in ("pref/train", "grpo/train") for r in data[split]]
    blob = "\n".join(train_text)
    for phrasing in ood.ASK_BARE + ood.ASK_WORKED:
        assert phrasing not in blob, phrasing
    ood_prompts = [synth.question_of(r) for r in data["ood/test"]]
    for phrasing in ood.ASK_BARE + ood.ASK_WORKED:
        assert any(phrasing in p for p in ood_prompts), phrasing  # every one is used
    for phrasing in synth.ASK_NUMBER + synth.ASK_STEPS:
        assert not any(phrasing in p for p in ood_prompts), phrasing
    asks = Counter(
        "bare" if any(a in p for a in ood.ASK_BARE) else "worked" if any(a in p for a in ood.ASK_WORKED) else "none"
        for p in ood_prompts
    )
    assert asks["bare"] >= 50 and asks["worked"] >= 50, asks
    assert not {n for n, _ in ood.PEOPLE} & {n for n, _ in synth.NAMES}
    assert all(_is_worked(_replies(r)[0]) for r in data["ood/test"])


def test_ood_generator_is_deterministic(ood):
    assert ood.make_ood(0) == ood.make_ood(0) != ood.make_ood(1)
