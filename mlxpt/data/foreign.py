"""SFT rows in the formats other tools write, read as chat rows (formats.py calls these per line):

  alpaca       {"instruction", "input"?, "output", "system"?, "history"?: [[user, reply], ...]}
  sharegpt     {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
  completions  TRL's conversational prompt-completion: {"prompt": [messages], "completion": [assistant messages]}

Alpaca's instruction and input are joined with a newline into one user turn (as LLaMA-Factory
does). A conversational prompt-completion row trains its completion only, as TRL does: the
assistant turns inside its prompt are context (`Row.data["train_from"]`). Problems are one-line
errors with codes E134-E139 and E144, named by the other tool's field names.
"""

from __future__ import annotations

import re

from mlxpt.data.row_checks import _check_chat, _tname

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _renamed(err, rename):
    """An `err` that names a message by the other format's field (`messages[3]` -> `conversations[3]`)."""

    def inner(code, what, hint=None):
        return err(code, re.sub(r"messages\[(\d+)\]", lambda m: rename(int(m.group(1))), what), hint)

    return inner


def check_alpaca(obj: dict, err) -> dict | None:
    missing = [k for k in ("instruction", "output") if k not in obj]
    if missing:
        return err(
            "E134",
            f"alpaca row has no {' or '.join(map(repr, missing))}",
            "an alpaca row needs 'instruction' and 'output' ('input' and 'system' are optional)",
        )
    for key in ("instruction", "input", "output", "system"):
        v = obj.get(key)
        if v is not None and not isinstance(v, str):
            return err("E135", f"alpaca {key!r} is {_tname(v)}, expected a string", f"make {key!r} a string")
    for key in ("instruction", "output"):
        if not obj[key].strip():
            return err("E136", f"alpaca {key!r} is empty or whitespace", "fill it in or drop the row")
    msgs, labels = [], []
    if (obj.get("system") or "").strip():
        msgs, labels = [{"role": "system", "content": obj["system"]}], ["'system'"]
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history
    ):
        return err("E135", "alpaca 'history' is not a list of [instruction, reply] string pairs", "fix or drop it")
    for i, (user, reply) in enumerate(history):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        labels += [f"history[{i}][0]", f"history[{i}][1]"]
    query = obj["instruction"] + (f"\n{obj['input']}" if (obj.get("input") or "").strip() else "")
    msgs += [{"role": "user", "content": query}, {"role": "assistant", "content": obj["output"]}]
    labels += ["'instruction'", "'output'"]
    return _check_chat({"messages": msgs}, _renamed(err, lambda j: labels[j]))


def check_sharegpt(obj: dict, err) -> dict | None:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        what = "is empty" if isinstance(turns, list) else f"is {_tname(turns)}, expected a list of turns"
        return err("E137", f"'conversations' {what}", 'write "conversations": [{"from": "human", "value": "..."}, ...]')
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        return err("E139", f"'system' is {_tname(system)}, expected a string", "make 'system' a string or drop it")
    msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    shift = len(msgs)  # a top-level 'system' becomes messages[0]
    for j, t in enumerate(turns):
        at = f"conversations[{j}]"
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or "value" not in t:
            return err(
                "E137",
                f"{at} is not a turn with a string 'from' and a 'value'",
                'each turn is {"from": "human"|"gpt"|"system", "value": "..."} (role/content turns: name the list "messages")',
            )
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            return err(
                "E138",
                f"{at} has unknown 'from' {t['from']!r}",
                "use human, gpt or system (tool turns: write the messages format with tool_calls)",
            )
        if not isinstance(t["value"], str) or not t["value"].strip():
            what = (
                "is empty or whitespace"
                if isinstance(t["value"], str)
                else f"is {_tname(t['value'])}, expected a string"
            )
            return err("E139", f"{at} ({t['from']}) value {what}", "write the turn's text or drop the turn")
        msgs.append({"role": role, "content": t["value"]})
    return _check_chat(
        {"messages": msgs}, _renamed(err, lambda j: f"conversations[{j - shift}]" if j >= shift else "'system'")
    )


def check_chat_completion(obj: dict, err) -> dict | None:
    """TRL's conversational prompt-completion row; None (with one error) when it is broken."""
    prompt, completion = obj["prompt"], obj["completion"]
    if not isinstance(prompt, list) or not isinstance(completion, list):
        key, other, code = (
            ("prompt", "completion", "E140") if isinstance(prompt, list) else ("completion", "prompt", "E142")
        )
        return err(
            code,
            f"{key!r} is list but {other!r} is {_tname(obj[other])}",
            "give both as strings, or both as message lists (completion: assistant messages)",
        )
    if not completion:
        return err("E144", "'completion' is an empty list", "give at least one assistant message")
    for j, m in enumerate(completion):
        if isinstance(m, dict) and m.get("role") != "assistant":
            return err(
                "E144", f"completion[{j}] has role {m.get('role')!r}, expected assistant", "the prompt holds the rest"
            )
    n = len(prompt)

    def rename(j: int) -> str:
        return f"prompt[{j}]" if j < n else f"completion[{j - n}]"

    data = _check_chat({"messages": [*prompt, *completion]}, _renamed(err, rename))
    if data is None:
        return None
    if n and data["messages"][n - 1]["role"] == "assistant":
        return err("E144", "'prompt' ends with an assistant turn", "end the prompt with the user turn")
    return {**data, "train_from": n}
