"""Synthetic chat SFT data with a verifiable skill: 2-3 step arithmetic word problems.

Each reply is a few `a op b = c` lines ending with `Answer: <integer>`, so a 135M instruct model
can learn the format and eval can check it exactly (`extract_answer`). Generation uses only a
seeded `random.Random`, so the same seed always gives the same rows.
"""

from __future__ import annotations

import random
import re

NAMES = [
    ("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Sam", "he", "his"),
    ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lily", "she", "her"), ("Ben", "he", "his"),
    ("Nora", "she", "her"), ("Ravi", "he", "his"), ("Emma", "she", "her"), ("Theo", "he", "his"),
    ("Ines", "she", "her"), ("Kai", "he", "his"), ("Rosa", "she", "her"), ("Jack", "he", "his"),
    ("Yuki", "she", "her"), ("Ivan", "he", "his"), ("Maya", "she", "her"), ("Luis", "he", "his"),
]  # fmt: skip
ITEMS = [
    ("apples", "bag"), ("pencils", "box"), ("marbles", "jar"), ("stickers", "sheet"),
    ("cookies", "tray"), ("books", "shelf"), ("cards", "pack"), ("shells", "bucket"),
    ("coins", "purse"), ("balloons", "bunch"), ("candies", "bowl"), ("stamps", "album"),
    ("eggs", "carton"), ("beads", "string"), ("buttons", "tin"), ("crayons", "box"),
]  # fmt: skip
PLURAL = {"box": "boxes", "shelf": "shelves", "bunch": "bunches", "tin": "tins"}
SYSTEMS = [
    "You are a careful math tutor. Solve step by step and end with 'Answer: <number>'.",
    "Solve the word problem. Show each step on its own line, then give the final answer.",
    "You are a helpful assistant that is good at arithmetic.",
]
P_SYSTEM = 0.25
P_FOLLOWUP = 0.12


def _eq(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def _reply(steps: list[str], answer: int) -> str:
    return "\n".join([*steps, f"Answer: {answer}"])


def _problem(rng: random.Random) -> tuple[str, list[str], int, dict]:
    """(question, step lines, answer, names used) for one randomly chosen template."""
    (name, he, _), (friend, _, _) = rng.sample(NAMES, 2)
    item, box = rng.choice(ITEMS)
    boxes = PLURAL.get(box, box + "s")
    He = he.capitalize()
    kind = rng.randrange(7)
    r = rng.randint
    if kind == 0:
        a, b = r(5, 40), r(2, 20)
        c = r(1, a + b - 1)
        q = (
            f"{name} has {a} {item}. {He} gets {b} more and then gives {c} to {friend}. "
            f"How many {item} does {name} have now?"
        )
        s1, ans = a + b, a + b - c
        steps = [_eq(a, "+", b, s1), _eq(s1, "-", c, ans)]
    elif kind == 1:
        a, b, c = r(2, 9), r(2, 12), r(1, 30)
        q = (
            f"{name} buys {a} {boxes} of {item} with {b} {item} in each {box}. {He} already "
            f"had {c} {item}. How many {item} does {name} have in total?"
        )
        s1, ans = a * b, a * b + c
        steps = [_eq(a, "*", b, s1), _eq(s1, "+", c, ans)]
    elif kind == 2:
        a, b = r(2, 9), r(3, 12)
        c = r(1, a * b - 1)
        q = (
            f"A {box} holds {b} {item}. {name} fills {a} {boxes} and then uses {c} of the "
            f"{item}. How many {item} are left?"
        )
        s1, ans = a * b, a * b - c
        steps = [_eq(a, "*", b, s1), _eq(s1, "-", c, ans)]
    elif kind == 3:
        b, each, c = r(2, 8), r(2, 12), r(1, 15)
        a = b * each
        q = (
            f"{name} shares {a} {item} equally among {b} friends. Then each friend finds "
            f"{c} more {item}. How many {item} does each friend have now?"
        )
        ans = each + c
        steps = [_eq(a, "/", b, each), _eq(each, "+", c, ans)]
    elif kind == 4:
        a, b, c = r(1, 25), r(2, 6), r(2, 10)
        s1, s2 = b * c, a + b * c
        d = r(1, s2 - 1)
        q = (
            f"{name} has {a} {item}. {He} buys {b} {boxes} with {c} {item} in each and then "
            f"gives away {d}. How many {item} does {name} have left?"
        )
        ans = s2 - d
        steps = [_eq(b, "*", c, s1), _eq(a, "+", s1, s2), _eq(s2, "-", d, ans)]
    elif kind == 5:
        n, a, m = r(2, 6), r(2, 9), r(2, 6)
        s1 = n * a
        b = rng.choice([x for x in range(1, 3 * m + 1) if (s1 + x) % m == 0])
        s2 = s1 + b
        q = (
            f"{n} friends each collect {a} {item}. {name} adds {b} more to the pile, and "
            f"then all of the {item} are shared equally among {m} {boxes}. How many {item} "
            f"go in each {box}?"
        )
        ans = s2 // m
        steps = [_eq(n, "*", a, s1), _eq(s1, "+", b, s2), _eq(s2, "/", m, ans)]
    else:
        a = r(6, 40)
        b, k = r(1, a - 1), r(2, 4)
        s1 = a - b
        q = (
            f"{name} had {a} {item} and gave away {b}. {friend} has {k} times as many {item} "
            f"as {name} has left. How many {item} does {friend} have?"
        )
        ans = s1 * k
        steps = [_eq(a, "-", b, s1), _eq(s1, "*", k, ans)]
    return q, steps, ans, {"name": name, "he": he, "item": item}


def _followup(rng: random.Random, prev: int, ctx: dict) -> tuple[str, list[str], int]:
    item, name, he = ctx["item"], ctx["name"], ctx["he"]
    kind = rng.randrange(3)
    if kind == 0:
        e = rng.randint(2, 15)
        return (
            f"And if {he} then gets {e} more {item}?",
            [_eq(prev, "+", e, prev + e)],
            prev + e,
        )
    if kind == 1 and prev > 1:
        e = rng.randint(1, prev - 1)
        q = f"What if {name} then loses {e} of them?"
        return q, [_eq(prev, "-", e, prev - e)], prev - e
    k = rng.randint(2, 3)
    word = {2: "double", 3: "triple"}[k]
    return (
        f"Now {word} that number. What do you get?",
        [_eq(prev, "*", k, prev * k)],
        prev * k,
    )


def make_example(rng: random.Random) -> dict:
    """One chat row: optional system, a word problem, its worked answer, maybe a follow-up."""
    q, steps, ans, ctx = _problem(rng)
    msgs = []
    if rng.random() < P_SYSTEM:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    msgs += [
        {"role": "user", "content": q},
        {"role": "assistant", "content": _reply(steps, ans)},
    ]
    if rng.random() < P_FOLLOWUP:
        q2, steps2, ans = _followup(rng, ans, ctx)
        msgs += [
            {"role": "user", "content": q2},
            {"role": "assistant", "content": _reply(steps2, ans)},
        ]
    return {"messages": msgs, "answer": str(ans)}


def question_of(row: dict) -> str:
    """The first user question: the key that must not repeat within or across splits."""
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def make_split(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`n` rows with distinct questions, none in `exclude` (which is updated in place)."""
    rng = random.Random(seed)
    seen = exclude if exclude is not None else set()
    rows: list[dict] = []
    while len(rows) < n:
        row = make_example(rng)
        key = question_of(row)
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    return rows


_ANSWER = re.compile(r"answer\s*\**\s*[:=]\s*\**\s*\$?\s*([-+]?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def extract_answer(text: str | None) -> str | None:
    """The number on the last `Answer: n` line (spacing, case and commas tolerated), or None."""
    if not text:
        return None
    found = _ANSWER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").lstrip("+")
    if "." in s:
        f = float(s)
        return str(int(f)) if f.is_integer() else s
    return str(int(s))
