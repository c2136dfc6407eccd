"""Synthetic chat SFT data with a verifiable skill: arithmetic word problems of 1 to 4 steps.

A problem is composed sentence by sentence: an opening (a count, or boxes of items: itself a step),
then operations on the running count, each drawn from several phrasings of +, -, * and /, then a
question. Steps take 1-4 operations (25/30/25/20 %); every value is a non-negative integer and every
division is exact. About 30 % of prompts ask for the bare number and get the reply `n`; the rest get
a worked reply, `a op b = c` lines ending with `Answer: n`, half of them after asking for the steps.
A quarter of the rows carry a system prompt that never contradicts the row's instruction, and some
have a follow-up turn answered the same way. Generation uses only a seeded `random.Random`, so the
same seed always gives the same rows.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = [
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Lily", "she"), ("Ben", "he"), ("Nora", "she"), ("Ravi", "he"), ("Emma", "she"), ("Theo", "he"),
    ("Ines", "she"), ("Kai", "he"), ("Rosa", "she"), ("Jack", "he"), ("Yuki", "she"), ("Ivan", "he"),
    ("Maya", "she"), ("Luis", "he"), ("Chloe", "she"), ("Finn", "he"), ("Aisha", "she"), ("Max", "he"),
    ("Hana", "she"), ("Eli", "he"), ("Sofia", "she"), ("Noah", "he"), ("Lena", "she"), ("Tom", "he"),
    ("Grace", "she"), ("Arjun", "he"), ("Ella", "she"), ("Jonas", "he"), ("Amara", "she"), ("Felix", "he"),
    ("Clara", "she"), ("Malik", "he"), ("Iris", "she"), ("Oscar", "he"),
]  # fmt: skip
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}
ITEMS = [
    ("apples", "bag"), ("pencils", "box"), ("marbles", "jar"), ("stickers", "sheet"), ("cookies", "tray"),
    ("books", "shelf"), ("cards", "pack"), ("shells", "bucket"), ("coins", "purse"), ("balloons", "bunch"),
    ("candies", "bowl"), ("stamps", "album"), ("eggs", "carton"), ("beads", "string"), ("buttons", "tin"),
    ("crayons", "box"), ("oranges", "crate"), ("cupcakes", "tray"), ("seeds", "packet"), ("flowers", "vase"),
    ("blocks", "bin"), ("plums", "basket"), ("muffins", "tray"), ("pebbles", "pail"), ("nails", "packet"),
    ("tomatoes", "basket"), ("socks", "drawer"), ("photos", "album"), ("feathers", "pouch"), ("toys", "chest"),
    ("bricks", "pallet"), ("chocolates", "box"), ("lemons", "crate"), ("badges", "pouch"), ("grapes", "bunch"),
]  # fmt: skip
PLURAL = {"box": "boxes", "shelf": "shelves", "bunch": "bunches", "pouch": "pouches"}
FRACTION = {2: "half", 3: "a third", 4: "a quarter"}
MULTIPLY = {2: "doubles", 3: "triples", 4: "quadruples"}

ASK_STEPS = [
    "Show your working.",
    "Solve it step by step.",
    "Work it out step by step, then give the answer.",
    "Show each step.",
    "Explain your steps.",
]
ASK_NUMBER = [
    "Reply with just the number.",
    "Only the final number, please.",
    "Give just the answer as a number.",
    "Answer with a single number.",
    "No working needed, just the number.",
    "Respond with the number only.",
]
SYSTEMS_ANY = [
    "You are a helpful assistant.",
    "You are a friendly math tutor for children.",
    "You help people with arithmetic word problems.",
    "You are a patient teacher.",
]
SYSTEMS_STEPS = [  # only on worked rows
    "You are a careful math tutor. Solve step by step and end with 'Answer: <number>'.",
    "Show each step on its own line, then give the final answer.",
]
SYSTEMS_NUMBER = [  # only on bare-number rows
    "When the user asks for just a number, give only the number.",
    "Keep replies as short as the user asks.",
]
STEP_WEIGHTS = {1: 25, 2: 30, 3: 25, 4: 20}
P_BARE = 0.30
P_ASK_STEPS = 0.5  # of the worked rows, the share whose prompt asks for the steps
P_SYSTEM = 0.25
P_FOLLOWUP = 0.12
MAX_VALUE = 999


def _eq(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def _reply(steps: list[str], answer: int, bare: bool) -> str:
    return str(answer) if bare else "\n".join([*steps, f"Answer: {answer}"])


@dataclass
class _State:
    """The running count of a problem being composed, and who holds it."""

    rng: random.Random
    value: int
    holder: tuple[str, str]  # (name, "he" | "she")
    item: str
    box: str
    people: list[tuple[str, str]]  # names not used yet
    steps: list[str] = field(default_factory=list)
    named: bool = True  # the holder was the subject of the last sentence: a pronoun is clear

    @property
    def boxes(self) -> str:
        return PLURAL.get(self.box, self.box + "s")

    def subject(self, cap: bool = True) -> str:
        """The holder's name, or a pronoun when the last sentence was about them."""
        if self.named and self.rng.random() < 0.5:
            he = self.holder[1]
            return he.capitalize() if cap else he
        return self.holder[0]

    def pron(self, i: int) -> str:
        return PRONOUNS[self.holder[1]][i]

    def other(self) -> tuple[str, str]:
        return self.people.pop()

    def apply(self, op: str, b: int) -> None:
        a = self.value
        self.value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        self.steps.append(_eq(a, op, b, self.value))


# Each phrasing applies one operation to the state and returns its sentence, or None where it does
# not fit the running count (no divisor, too large). `_FINAL` ones also return the question.


def _plus(st: _State) -> str | None:
    x, item = st.rng.randint(2, 30), st.item
    if st.value + x > MAX_VALUE:
        return None
    form = st.rng.randrange(5)
    if form == 4:
        (f, he), name = st.other(), st.holder[0]
        st.apply("+", x)
        st.holder, st.named = (f, he), False
        return f"{f} has {x} more {item} than {name}."
    if form == 0:
        s = f"{st.subject()} gets {x} more {item}."
    elif form == 1:
        s = f"{st.other()[0]} gives {st.pron(1)} {x} more."
    elif form == 2:
        s = f"Then {st.subject(cap=False)} finds another {x}."
    else:
        s = f"Later, {st.subject(cap=False)} buys {x} more {item}."
    st.apply("+", x)
    st.named = form != 1
    return s


def _minus(st: _State) -> str | None:
    if st.value < 3:
        return None
    x, item = st.rng.randint(2, min(st.value - 1, 40)), st.item
    form = st.rng.randrange(5)
    if form == 4:
        (f, he), name = st.other(), st.holder[0]
        st.apply("-", x)
        st.holder, st.named = (f, he), False
        return f"{f} has {x} fewer {item} than {name}."
    if form == 0:
        s = f"{st.subject()} gives {x} of them to {st.other()[0]}."
    elif form == 1:
        s = f"{st.subject()} loses {x} {item}."
    elif form == 2:
        s = f"Then {st.subject(cap=False)} uses {x} of {st.pron(2)} {item}."
    else:
        s = f"{st.subject()} sells {x} of them."
    st.apply("-", x)
    st.named = form != 0
    return s


def _times(st: _State) -> str | None:
    k, item = st.rng.randint(2, 4), st.item
    if st.value * k > MAX_VALUE:
        return None
    form = st.rng.randrange(3)
    if form == 0:
        (f, he), name = st.other(), st.holder[0]
        s = f"{f} has {k} times as many {item} as {name}."
        st.holder = (f, he)
    elif form == 1:
        s = f"Then {st.subject(cap=False)} {MULTIPLY[k]} {st.pron(2)} {item}."
    else:
        s = f"{st.holder[0]}'s {item} then grow to {k} times as many."
    st.apply("*", k)
    st.named = form != 0
    return s


def _boxes_added(st: _State) -> str | None:
    """Two steps: k boxes of m items, added to the count."""
    k, m = st.rng.randint(2, 6), st.rng.randint(2, 10)
    if st.value + k * m > MAX_VALUE:
        return None
    own = st.rng.random() < 0.5
    if own:
        s = f"{st.subject()} also buys {k} {st.boxes} with {m} {st.item} in each."
    else:
        s = f"{st.other()[0]} gives {st.pron(1)} {k} full {st.boxes}, each with {m} {st.item}."
    st.steps.append(_eq(k, "*", m, k * m))
    st.apply("+", k * m)
    st.named = own
    return s


def _divisors(st: _State, ks) -> list[int]:
    return [k for k in ks if st.value % k == 0 and st.value // k >= 2]


def _divide(st: _State) -> str | None:
    form = st.rng.randrange(3)
    ks = _divisors(st, FRACTION if form != 1 else range(2, 7))
    if not ks:
        return None
    k, item = st.rng.choice(ks), st.item
    if form == 0:
        s = f"{st.subject()} keeps {FRACTION[k]} of them and gives the rest away."
    elif form == 1:
        s = f"{st.subject()} splits them into {k} equal piles and keeps one pile."
    else:
        (f, he), name = st.other(), st.holder[0]
        s = f"{f} has {FRACTION[k]} as many {item} as {name}."
        st.holder = (f, he)
    st.apply("/", k)
    st.named = form != 2
    return s


def _divide_final(st: _State) -> tuple[str, str] | None:
    ks = _divisors(st, range(2, 9))
    if not ks:
        return None
    k, item = st.rng.choice(ks), st.item
    if st.rng.random() < 0.5:
        s, q = f"{st.subject()} shares them equally among {k} friends.", f"How many {item} does each friend get?"
    else:
        s, q = f"{st.subject()} packs them equally into {k} {st.boxes}.", f"How many {item} go in each {st.box}?"
    st.apply("/", k)
    return s, q


def _opening(st: _State, product: bool) -> str:
    r, name, item, box = st.rng.randint, st.holder[0], st.item, st.box
    if product:
        k, m = r(2, 9), r(2, 12)
        st.value = k * m
        st.steps.append(_eq(k, "*", m, k * m))
        return st.rng.choice(
            [
                f"{name} buys {k} {st.boxes} of {item} with {m} in each.",
                f"{name} has {k} {st.boxes} of {item}, and each {box} holds {m}.",
                f"{name} fills {k} {st.boxes} with {m} {item} each.",
            ]
        )
    st.value = r(3, 60)
    a = st.value
    return st.rng.choice(
        [f"{name} has {a} {item}.", f"{name} starts with {a} {item}.", f"There are {a} {item} in {name}'s {box}."]
        + [f"{name} collected {a} {item}."]
    )


def _question(st: _State, last: str) -> str:
    name, item = st.holder[0], st.item
    forms = [f"How many {item} does {name} have now?", f"How many {item} does {name} end up with?"]
    forms += [f"How many {item} does {name} have in the end?", f"Find the number of {item} {name} has."]
    if last in "-/":
        forms.append(f"How many {item} does {name} have left?")
    return st.rng.choice(forms)


_OPS = (("+", _plus, 3), ("-", _minus, 3), ("*", _times, 2), ("/", _divide, 2), ("*+", _boxes_added, 1))


def _problem(rng: random.Random) -> tuple[str, list[str], int]:
    """(problem text, step lines, answer) with 1-4 steps."""
    n = rng.choices(list(STEP_WEIGHTS), weights=list(STEP_WEIGHTS.values()))[0]
    while True:
        people = rng.sample(NAMES, 6)
        item, box = rng.choice(ITEMS)
        st = _State(rng, 0, people.pop(), item, box, people)
        sentences = [_opening(st, product=rng.random() < 0.3)]
        last, question, tries = "", None, 0
        while len(st.steps) < n and question is None and tries < 20:
            tries += 1
            left = n - len(st.steps)
            if left == 1 and rng.random() < 0.2 and (fin := _divide_final(st)):
                sentences.append(fin[0])
                question, last = fin[1], "/"
                continue
            ops = [o for o in _OPS if left >= len(o[0])]
            op, fn, _ = rng.choices(ops, weights=[w for *_, w in ops])[0]
            s = fn(st)
            if s is not None:
                sentences.append(s)
                last = op[-1]
        if len(st.steps) != n:
            continue  # stuck (no phrasing fits the count): start over
        sentences.append(question or _question(st, last))
        return " ".join(sentences), st.steps, st.value


def _followup(rng: random.Random, prev: int) -> tuple[str, list[str], int]:
    kind = rng.randrange(4)
    if kind == 0:
        e = rng.randint(2, 15)
        q = rng.choice([f"And if there were {e} more?", f"Now add {e} to that. What do you get?"])
        return q, [_eq(prev, "+", e, prev + e)], prev + e
    if kind == 1 and prev > 2:
        e = rng.randint(2, prev - 1)
        q = rng.choice([f"What if {e} of them were taken away?", f"And with {e} fewer?"])
        return q, [_eq(prev, "-", e, prev - e)], prev - e
    ks = [k for k in (2, 3, 4) if prev % k == 0 and prev >= 2 * k]
    if kind == 2 and ks:
        k = rng.choice(ks)
        return f"Split that equally into {k} groups. How many are in each?", [_eq(prev, "/", k, prev // k)], prev // k
    k = rng.randint(2, 3)
    word = {2: "double", 3: "triple"}[k]
    return f"Now {word} that number. What do you get?", [_eq(prev, "*", k, prev * k)], prev * k


@dataclass
class Example:
    """A chat row and how it was made: the first question's step lines and its instruction."""

    row: dict
    steps: list[str]
    bare: bool  # the prompt asks for the number alone
    asks_steps: bool  # the prompt asks for the working


def _example(rng: random.Random) -> Example:
    problem, steps, ans = _problem(rng)
    bare = rng.random() < P_BARE
    asks_steps = not bare and rng.random() < P_ASK_STEPS
    q = problem
    if bare or asks_steps:
        ask = rng.choice(ASK_NUMBER if bare else ASK_STEPS)
        where = rng.random()
        q = f"{problem} {ask}" if where < 0.6 else f"{problem}\n{ask}" if where < 0.85 else f"{ask}\n{problem}"
    msgs = []
    if rng.random() < P_SYSTEM:
        msgs.append(
            {"role": "system", "content": rng.choice(SYSTEMS_ANY + (SYSTEMS_NUMBER if bare else SYSTEMS_STEPS))}
        )
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": _reply(steps, ans, bare)}]
    if rng.random() < P_FOLLOWUP:
        q2, steps2, ans = _followup(rng, ans)
        msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": _reply(steps2, ans, bare)}]
    return Example({"messages": msgs, "answer": str(ans)}, steps, bare, asks_steps)


def make_example(rng: random.Random) -> dict:
    """One chat row: optional system, a word problem, its reply as asked, maybe a follow-up."""
    return _example(rng).row


def question_of(row: dict) -> str:
    """The first user message (the problem with its instruction, if any)."""
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


_INSTRUCTION = re.compile("|".join(re.escape(s) for s in ASK_STEPS + ASK_NUMBER))


def problem_of(row_or_text: dict | str) -> str:
    """The first question without its instruction: the key that must not repeat within or across
    splits (the same problem asked for steps and for a number is still the same problem)."""
    text = row_or_text if isinstance(row_or_text, str) else question_of(row_or_text)
    return _INSTRUCTION.sub("", text).strip()


def make_examples(n: int, seed: int, exclude: set[str] | None = None) -> list[Example]:
    """`n` examples with distinct problems, none in `exclude` (which is updated in place)."""
    rng = random.Random(seed)
    seen = exclude if exclude is not None else set()
    out: list[Example] = []
    while len(out) < n:
        ex = _example(rng)
        key = problem_of(ex.row)
        if key in seen:
            continue
        seen.add(key)
        out.append(ex)
    return out


def make_split(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`n` rows with distinct problems (`problem_of`), none in `exclude` (updated in place)."""
    return [ex.row for ex in make_examples(n, seed, exclude)]


_ANSWER = re.compile(r"answer\s*\**\s*[:=]\s*\**\s*\$?\s*([-+]?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_BARE = re.compile(r"\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*\.?\s*")


def extract_answer(text: str | None) -> str | None:
    """The number on the last `Answer: n` line (spacing, case and commas tolerated), or the reply
    itself when it is only a number (" 1,200 "); None otherwise."""
    if not text:
        return None
    found = _ANSWER.findall(text)
    if not found:
        bare = _BARE.fullmatch(text)
        if not bare:
            return None
        found = [bare.group(1)]
    s = found[-1].replace(",", "").lstrip("+")
    if "." in s:
        f = float(s)
        return str(int(f)) if f.is_integer() else s
    return str(int(s))
