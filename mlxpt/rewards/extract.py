"""Final-answer extraction shared by the GRPO accuracy reward and self-consistency voting.

`extract(text, how)` returns a normalised answer string or None. Methods:
- `tag`: the last `<answer>...</answer>` block;
- `boxed`: the last `\\boxed{...}` (nested braces allowed);
- `hash`: the last `#### n` (GSM8K style);
- `answer`: the last `Answer: n` line (the bundled data's format; `**Answer:** $5` tolerated);
- `last_number`: the last number anywhere;
- `auto` (default): the first of tag, boxed, hash, answer, last_number that finds something;
- a user regex (`re:<pattern>`): its last match, group 1 if it has groups.

Normalisation makes equal answers equal strings: numbers lose thousands commas, a leading `+`, a
currency sign and trailing zeros (`1,200.50` -> `1200.5`, `7.0` -> `7`); other text is stripped,
lower-cased and loses surrounding `$`/`.`. `same_answer` compares numbers with a tolerance.
"""

from __future__ import annotations

import math
import re

from mlxpt.errors import ConfigError

METHODS = ("auto", "tag", "boxed", "hash", "answer", "last_number")

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRACTION_RE = re.compile(r"^([-+]?\d+)\s*/\s*(\d+)$")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")
_ANSWER_RE = re.compile(
    r"answer\s*(?:is)?\s*\**\s*[:=]?\s*\**\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE
)  # "Answer: 7", "**Answer:** $7", "the answer is 7"


def _number(s: str) -> str | None:
    """The canonical form of a number string, or None when `s` is not one number."""
    s = s.strip().replace(",", "").replace("$", "").strip()
    frac = _FRACTION_RE.match(s)
    if frac and int(frac.group(2)) != 0:
        value = int(frac.group(1)) / int(frac.group(2))
    else:
        try:
            value = float(s)
        except ValueError:
            return None
    if not math.isfinite(value):
        return None
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def normalize(answer: str | None) -> str | None:
    """Canonical answer text (see the module doc); None stays None, empty becomes None."""
    if answer is None:
        return None
    s = _FRAC_RE.sub(r"\1/\2", str(answer)).strip()
    n = _number(s.rstrip("."))
    if n is not None:
        return n
    nums = _NUMBER_RE.findall(s)
    if len(nums) == 1 and re.fullmatch(r"[\s$]*" + re.escape(nums[0]) + r"[\s.%]*", s):
        return _number(nums[0])
    s = s.strip("$. \n\t").lower()
    s = re.sub(r"\s+", " ", s)
    return s or None


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _inner(content: str | None) -> str | None:
    """Tag/boxed content: its number when it holds exactly one, else the normalised text."""
    if content is None:
        return None
    n = normalize(content)
    if n is None:
        return None
    if _number(n) is None:
        nums = _NUMBER_RE.findall(content)
        if len(nums) == 1:
            return _number(nums[0])
    return n


def _last(pattern: re.Pattern, text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1] if found else None


def compile_regex(pattern: str) -> re.Pattern:
    """A user's answer regex, or ConfigError E606 naming what is wrong with it."""
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError("E606", f"invalid answer regex: {e}", pattern, "give a Python regular expression") from None


def check_method(how: str) -> None:
    if how in METHODS or how.startswith("re:"):
        return
    raise ConfigError(
        "E607",
        f"unknown answer extractor {how!r}",
        "--extract",
        f"use one of {', '.join(METHODS)} or re:<regex>",
    )


def extract(text: str | None, how: str = "auto") -> str | None:
    """The normalised final answer in `text` by method `how` (see the module doc), or None."""
    if not text:
        return None
    if how.startswith("re:"):
        found = compile_regex(how[3:]).findall(text)
        if not found:
            return None
        last = found[-1]
        return normalize(last[0] if isinstance(last, tuple) else last)
    check_method(how)
    order = ("tag", "boxed", "hash", "answer", "last_number") if how == "auto" else (how,)
    for m in order:
        if m == "tag":
            got = _inner(_last(_TAG_RE, text))
        elif m == "boxed":
            got = _inner(_boxed(text))
        elif m == "hash":
            got = _inner(_last(_HASH_RE, text))
        elif m == "answer":
            got = _inner(_last(_ANSWER_RE, text))
        else:
            got = _inner(_last(_NUMBER_RE, text))
        if got is not None:
            return got
    return None


def same_answer(pred: str | None, gold, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """True when two answers are equal after normalisation; numbers within a tolerance."""
    a, b = normalize(pred), normalize(None if gold is None else str(gold))
    if a is None or b is None:
        return False
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=abs_tol)
    return a == b
