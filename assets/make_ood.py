"""Write assets/ood/test.jsonl: 200 arithmetic word problems unlike anything the bundled data trains on,
and assets/ood/arith.jsonl: 100 bare one-step sums ("What is 29 + 70?"), the easiest OOD form.

Usage: python assets/make_ood.py [--out assets/ood]. Running it twice gives identical bytes.
The training generator (mlxpt/data/synth.py) counts items that people get, lose, multiply and share,
in 1-4 steps. This one has its own generator, names and instructions, and shares none of them:
- contexts: money and prices, distance and speed, minutes and hours, ages, recipes, pages read per
  day, temperature changes; with units ($, km, minutes, grams, degrees);
- sentence structures: often the question first, small numbers partly written as words;
- step counts: 40 % one step (the skill a template-tuned adapter lost), 21 % two, 21 % three and
  18 % five or six steps (outside training's 1-4);
- instructions: some ask for the bare number, some for the working, in phrasings training never uses.
Rows have the format of assets/sft/test.jsonl: the chat with a worked reference reply, `a op b = c`
lines ending with `Answer: n`, plus "answer". Eval drops that reply and checks the model's answer.
The base model gets about 4 % of test.jsonl (it rambles past the token budget) and about 23 % of
arith.jsonl: the set where an accuracy drop has room to show.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxpt.data.synth import extract_answer  # noqa: E402
from mlxpt.runs.atomic import atomic_write_text  # noqa: E402

PEOPLE = [
    ("Priya", "she"), ("Mateo", "he"), ("Ada", "she"), ("Hugo", "he"), ("Farah", "she"), ("Tariq", "he"),
    ("Elif", "she"), ("Bruno", "he"), ("Keiko", "she"), ("Dmitri", "he"), ("Olga", "she"), ("Sione", "he"),
    ("Wanjiru", "she"), ("Pablo", "he"), ("Greta", "she"), ("Anil", "he"), ("Marta", "she"), ("Kofi", "he"),
    ("Selin", "she"), ("Rafael", "he"),
]  # fmt: skip
GOODS = [  # (one, several, cheapest, dearest)
    ("notebook", "notebooks", 3, 9), ("sandwich", "sandwiches", 4, 8), ("ticket", "tickets", 5, 15),
    ("scarf", "scarves", 8, 20), ("mug", "mugs", 4, 11), ("umbrella", "umbrellas", 9, 25),
]  # fmt: skip
ACTIVITIES = ["guitar practice", "jogging", "homework", "drawing", "swimming", "chess puzzles"]
INGREDIENTS = ["flour", "sugar", "butter", "oats", "rice", "cheese"]
DISHES = [("loaf of bread", "loaves of bread"), ("pie", "pies"), ("pot of soup", "pots of soup"), ("flan", "flans")]
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
ASK_BARE = [
    "Just give me the final figure.",
    "State the result only, no explanation.",
    "I only need the final value.",
    "Respond with nothing but the result.",
]
ASK_WORKED = [
    "Please walk me through the calculation.",
    "Lay out the arithmetic, then state the result.",
    "Talk me through it.",
    "Can you show how you get there?",
]
STEP_QUOTA = {1: 80, 2: 42, 3: 42, 5: 18, 6: 18}  # of 200 rows


def _num(rng: random.Random, n: int) -> str:
    """Small counts are written as words half of the time."""
    return WORDS[n] if n < len(WORDS) and rng.random() < 0.5 else str(n)


class _Work:
    """The `a op b = c` lines of a solution, computed as the problem is built."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, a: int, op: str, b: int) -> int:
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert c >= 0 and (op != "/" or a % b == 0), (a, op, b)
        self.lines.append(f"{a} {op} {b} = {c}")
        return c


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def money(rng: random.Random, n: int, w: _Work) -> str:
    (who, he), r = rng.choice(PEOPLE), rng.randint
    if n == 1:
        good, goods, lo, hi = rng.choice(GOODS)
        if rng.random() < 0.5:
            k, p = r(2, 9), r(lo, hi)
            w(k, "*", p)
            return f"What do {_num(rng, k)} {goods} cost at ${p} apiece?"
        bill, p = rng.choice([20, 50, 100]), r(lo, hi)
        w(bill, "-", p)
        return f"What change does {who} get from a ${bill} note after paying ${p} for a {good}?"
    # n steps of purchases: a single item costs one step (subtract), several cost two (multiply, subtract)
    parts, costs, left = [], [], n
    for good, goods, lo, hi in rng.sample(GOODS, len(GOODS)):
        if left == 0:
            break
        k = r(2, 5) if left >= 2 and rng.random() < 0.6 else 1
        p = r(lo, hi)
        parts.append(f"a {good} for ${p}" if k == 1 else f"{_num(rng, k)} {goods} at ${p} each")
        costs.append((k, p))
        left -= 1 if k == 1 else 2
    start = rng.choice([60, 80, 100, 120, 150, 200, 250, 300])
    while start < sum(k * p for k, p in costs):
        start += 100
    have = start
    for k, p in costs:
        have = w(have, "-", p if k == 1 else w(k, "*", p))
    if rng.random() < 0.5:
        return f"What does {who} have left, in dollars? {he.capitalize()} took ${start} to the market and bought {_join(parts)}."
    return f"With ${start} in {'his' if he == 'he' else 'her'} wallet, {who} pays for {_join(parts)}. What remains, in dollars?"


def distance(rng: random.Random, n: int, w: _Work) -> str:
    (who, _), r = rng.choice(PEOPLE), rng.randint
    if n == 1:
        if rng.random() < 0.5:
            s, h = r(4, 90), r(2, 6)
            w(s, "*", h)
            return f"How far, in km, does a cyclist get by riding at {s} km per hour for {_num(rng, h)} hours?"
        h, s = r(2, 6), r(5, 80)
        w(s * h, "/", h)
        return f"A coach covers {s * h} km in {_num(rng, h)} hours at a steady pace. What is its speed in km per hour?"
    legs, walk = {2: (1, True), 3: (2, False), 5: (3, False), 6: (3, True)}[n]
    parts, total = [], None
    for _ in range(legs):
        s, h = r(5, 90), r(2, 5)
        parts.append(f"{_num(rng, h)} hours at {s} km/h")
        d = w(s, "*", h)
        total = d if total is None else w(total, "+", d)
    tail = ""
    if walk:
        k = r(2, 12)
        total = w(total, "+", k)
        tail = f", then walks the last {_num(rng, k)} km"
    return f"What distance does {who} cover in total? {who} drives {_join(parts)}{tail}. Give it in km."


def minutes(rng: random.Random, n: int, w: _Work) -> str:
    (who, _), r = rng.choice(PEOPLE), rng.randint
    if n == 1:
        if rng.random() < 0.5:
            h = r(2, 12)
            w(h, "*", 60)
            return f"In {_num(rng, h)} hours, how many minutes pass?"
        m, d = r(10, 45), r(3, 7)
        w(m, "*", d)
        return f"Over {_num(rng, d)} days, {who} spends {m} minutes a day on {rng.choice(ACTIVITIES)}. What is that in minutes?"
    d = rng.choice([2, 3, 4, 5, 6])  # divides 60, so whole hours are easy to arrange
    if n == 2:
        m = 60 * r(1, 4) // d
        w(w(m, "*", d), "/", 60)
        return f"How many hours does {who} give to {rng.choice(ACTIVITIES)} if it is {m} minutes every day for {_num(rng, d)} days?"
    acts = rng.sample(ACTIVITIES, 2 if n == 3 else 3)
    each = [r(10, 40) for _ in acts]
    if n == 6:  # the last activity tops the daily sum up to a multiple of 60 / d: whole hours
        each[-1] = 10 + (-(sum(each[:-1]) + 10)) % (60 // d)
    total = None
    for m in each:
        t = w(m, "*", d)
        total = t if total is None else w(total, "+", t)
    plan = _join([f"{m} minutes of {a}" for m, a in zip(each, acts, strict=True)])
    if n == 6:
        w(total, "/", 60)
        return f"Every day for {_num(rng, d)} days, {who} fits in {plan}. How many hours is that altogether?"
    return f"Every day for {_num(rng, d)} days, {who} fits in {plan}. How many minutes does that come to?"


def ages(rng: random.Random, n: int, w: _Work) -> str:
    (who, he), r = rng.choice(PEOPLE), rng.randint
    if n == 1:
        a, k = r(5, 70), r(2, 15)
        if rng.random() < 0.5:
            w(a, "+", k)
            return f"How old will {who} be in {_num(rng, k)} years, if {he} is {a} today?"
        w(a + k, "-", k)
        return f"{who} turned {a + k} this spring. What age was {he} {_num(rng, k)} years back?"
    a, k, y = r(4, 15), r(3, 6), r(2, 12)
    grand = w(a, "*", k)
    if n == 2:
        w(grand, "+", y)
        return f"{who} is {_num(rng, a)}, and {'his' if he == 'he' else 'her'} grandfather is {_num(rng, k)} times that age. How old will the grandfather be {_num(rng, y)} years from now?"
    b = r(2, a - 2)
    cousin = w(a, "-", b)
    w(grand, "+", cousin)
    return f"What is the sum of a grandmother's age and a cousin's age? {who} is {a}; the cousin is {_num(rng, b)} years younger than {who}, and the grandmother is {_num(rng, k)} times {who}'s age."


def recipe(rng: random.Random, n: int, w: _Work) -> str:
    r, (dish, dishes) = rng.randint, rng.choice(DISHES)
    if n == 1:
        g, k = 25 * r(2, 16), r(2, 8)
        if rng.random() < 0.5:
            w(g, "*", k)
            return f"Each {dish} takes {g} grams of {rng.choice(INGREDIENTS)}. For {_num(rng, k)} of them, how many grams are required?"
        w(g * k, "/", k)
        return f"A batch of {_num(rng, k)} identical {dishes} used {g * k} grams of {rng.choice(INGREDIENTS)}. How many grams went into one?"
    if n == 2:
        s, per, t = r(2, 6), 10 * r(2, 12), r(2, 12)
        w(w(per * s, "/", s), "*", t)
        return f"A recipe serving {_num(rng, s)} calls for {per * s} g of {rng.choice(INGREDIENTS)}. Scaled for {_num(rng, t)} guests, how many grams is that?"
    ings = rng.sample(INGREDIENTS, 2 if n == 3 else 3)
    k, grams = r(2, 6), [10 * r(3, 30) for _ in ings]
    total = None
    for g in grams:
        t = w(g, "*", k)
        total = t if total is None else w(total, "+", t)
    need = _join([f"{g} g of {i}" for g, i in zip(grams, ings, strict=True)])
    if n == 6:
        have = 50 * r(1, total // 50 - 1)
        w(total, "-", have)
        return f"How many more grams of ingredients must Chef {rng.choice(PEOPLE)[0]} buy? Each {dish} needs {need}; the plan is {_num(rng, k)} of them, and the pantry already holds {have} g."
    return f"One {dish} needs {need}. What is the combined weight, in grams, for {_num(rng, k)} of them?"


def reading(rng: random.Random, n: int, w: _Work) -> str:
    (who, he), r = rng.choice(PEOPLE), rng.randint
    if n == 1:
        p, d = r(5, 40), r(3, 12)
        if rng.random() < 0.5:
            w(p * d, "/", p)
            return f"A novel runs to {p * d} pages. Reading {p} pages per day, how many days will {who} need?"
        w(p, "*", d)
        return f"{who} gets through {p} pages per day. How many pages is that after {_num(rng, d)} days?"
    stretches = {2: 1, 3: 2, 5: 3, 6: 3}[n]
    parts, total = [], None
    for _ in range(stretches):
        p, d = r(5, 40), r(2, 7)
        parts.append(f"{p} pages per day for {_num(rng, d)} days")
        t = w(p, "*", d)
        total = t if total is None else w(total, "+", t)
    if n in (2, 6):
        book = total + r(10, 200)
        w(book, "-", total)
        return f"How many pages of a {book}-page biography are still unread? {who} has managed {_join(parts)}."
    return f"{who} has been reading {_join(parts)}. In all, how many pages has {he} read?"


def temperature(rng: random.Random, n: int, w: _Work) -> str:
    r, t = rng.randint, rng.randint(5, 25)
    start, parts = t, []
    for _ in range(n):
        x = r(2, 9)
        if t - x >= 0 and rng.random() < 0.5:
            parts.append(f"dropped {_num(rng, x)} degrees")
            t = w(t, "-", x)
        else:
            parts.append(f"climbed {_num(rng, x)} degrees")
            t = w(t, "+", x)
    if n == 1:
        return f"What was the reading after the thermometer, at {start} degrees, {parts[0]}?"
    return f"What did the thermometer show at the end of the day? It began at {start} degrees, then {_join(parts)}."


CONTEXTS = {  # which step counts each context can make
    money: (1, 2, 3, 5, 6),
    distance: (1, 2, 3, 5, 6),
    minutes: (1, 2, 3, 5, 6),
    ages: (1, 2, 3),
    recipe: (1, 2, 3, 5, 6),
    reading: (1, 2, 3, 5, 6),
    temperature: (1, 2, 3, 5, 6),
}


def make_row(rng: random.Random, n: int) -> dict:
    """One chat row of `n` steps: question (maybe with an instruction), worked reply, answer."""
    make = rng.choice([f for f, ns in CONTEXTS.items() if n in ns])
    w = _Work()
    question = make(rng, n, w)
    assert len(w.lines) == n, (make.__name__, n, w.lines)
    answer = int(w.lines[-1].split()[-1])
    ask = rng.random()
    if ask < 0.35:
        question = f"{question} {rng.choice(ASK_BARE)}"
    elif ask < 0.7:
        instruction = rng.choice(ASK_WORKED)
        question = f"{instruction} {question}" if rng.random() < 0.5 else f"{question} {instruction}"
    reply = "\n".join([*w.lines, f"Answer: {answer}"])
    assert extract_answer(reply) == str(answer)
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
        "answer": str(answer),
    }


def make_ood(seed: int = 0) -> list[dict]:
    """The 200 rows of assets/ood/test.jsonl, step counts as in STEP_QUOTA, questions distinct."""
    rng = random.Random(seed)
    counts = [n for n, k in STEP_QUOTA.items() for _ in range(k)]
    rng.shuffle(counts)
    rows, seen = [], set()
    for n in counts:
        while True:
            row = make_row(rng, n)
            if (q := row["messages"][0]["content"]) not in seen:
                seen.add(q)
                rows.append(row)
                break
    return rows


ARITH_ASK = [
    "What is {a} {sym} {b}?",
    "Compute {a} {word} {b}.",
    "How much is {a} {word} {b}?",
    "{a} {sym} {b} = ?",
    "Quick one: {a} {word} {b}?",
]
ARITH_OPS = [("+", "+", "plus"), ("-", "-", "minus"), ("*", "×", "times"), ("/", "÷", "divided by")]


def make_arith(seed: int = 1, n: int = 100) -> list[dict]:
    """assets/ood/arith.jsonl: one-step sums with no story and no instruction (the easiest OOD
    form, where the base model has room to lose accuracy): 25 rows of each operation."""
    rng, rows, seen = random.Random(seed), [], set()
    for i in range(n):
        op, sym, word = ARITH_OPS[i % 4]
        while True:
            if op == "/":
                b, c = rng.randint(2, 12), rng.randint(2, 12)
                a = b * c
            elif op == "*":
                a, b = rng.randint(2, 12), rng.randint(2, 12)
            else:
                a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=op == "-")
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                break
        w = _Work()
        answer = w(a, op, b)
        question = rng.choice(ARITH_ASK).format(a=a, b=b, sym=sym, word=word)
        reply = f"{w.lines[0]}\nAnswer: {answer}"
        rows.append({
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "answer": str(answer),
        })  # fmt: skip
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "ood"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_ood()
    atomic_write_text(out / "test.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"test: {len(rows)} rows -> {out / 'test.jsonl'}")
    arith = make_arith()
    atomic_write_text(out / "arith.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arith))
    print(f"arith: {len(arith)} rows -> {out / 'arith.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
