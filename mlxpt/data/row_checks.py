"""The checks of one row of each dataset format (chat, completions, text): every problem gets its
code, what is wrong and how to fix it; a valid row becomes the normalised data `Row.data` holds.
formats.py reads the files and calls these per line (foreign.py checks the other tools' formats)."""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")
FORMAT_KEYS = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
}
OPTIONAL_KEYS = {"chat": ("tools",), "alpaca": ("input", "system", "history"), "sharegpt": ("system",)}


def detect_kind(obj: dict) -> list[str]:
    """Formats whose keys appear in `obj` (normally exactly one)."""
    return [k for k, keys in FORMAT_KEYS.items() if any(key in obj for key in keys)]


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


def _check_chat(obj: dict, err) -> dict | None:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        return err(
            "E120",
            f"'messages' is {_tname(msgs)}, expected a list of messages",
            'write "messages": [{"role": "user", "content": "..."}, ...]',
        )
    if not msgs:
        return err("E121", "'messages' is empty", "add at least a user and an assistant turn")
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        return err(
            "E132",
            f"'tools' is {_tname(tools)}, expected a list of tool schemas",
            'write "tools": [{"type": "function", "function": {...}}] or remove it',
        )
    ok = True
    for j, m in enumerate(msgs):
        at = f"messages[{j}]"
        if not isinstance(m, dict):
            ok = err(
                "E122",
                f"{at} is {_tname(m)}, expected an object",
                'each message is {"role": ..., "content": ...}',
            )
            continue
        role = m.get("role")
        if "role" not in m or not isinstance(role, str):
            ok = err(
                "E123",
                f"{at} has no string 'role'",
                "add a role: system, user, assistant or tool",
            )
            continue
        if role not in ROLES:
            ok = err(
                "E124",
                f"{at} has unknown role {role!r}",
                f"use one of {', '.join(ROLES)} (rename e.g. 'human'->'user', 'gpt'->'assistant')",
            )
            continue
        calls = m.get("tool_calls")
        if calls is not None and (
            role != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)
        ):
            ok = err(
                "E133",
                f"{at} has invalid 'tool_calls'",
                "tool_calls must be a list of objects on an assistant message",
            )
            continue
        if "content" not in m:
            ok = err("E125", f"{at} ({role}) has no 'content'", "add a 'content' string")
            continue
        content = m["content"]
        if content is None:
            if role == "assistant" and calls:
                continue
            ok = err(
                "E128",
                f"{at} ({role}) content is null",
                "null content is allowed only on an assistant message with tool_calls",
            )
            continue
        if not isinstance(content, str):
            ok = err(
                "E126",
                f"{at} ({role}) content is {_tname(content)}, expected a string",
                "flatten content parts into one string",
            )
            continue
        weight = m.get("weight", 1)
        if "weight" in m and (role != "assistant" or isinstance(weight, bool) or weight not in (0, 1)):
            # OpenAI's fine-tuning files: weight 0 marks an assistant turn as context, not trained
            ok = err(
                "E159",
                f"{at} ({role}) has weight {weight!r}",
                "weight is 0 (context, not trained) or 1, on assistant messages only",
            )
            continue
        if not content.strip() and role != "tool" and not calls:
            ok = err(
                "E127",
                f"{at} ({role}) content is empty or whitespace",
                "remove the message or write its text",
            )
            continue
    if not ok:
        return None
    roles = [m["role"] for m in msgs]
    if "system" in roles[1:]:
        return err(
            "E130",
            f"system message at messages[{roles.index('system', 1)}], not first",
            "put one system message first or merge it into the first one",
        )
    if "assistant" not in roles:
        return err(
            "E129",
            "conversation has no assistant turn, so nothing would be trained",
            "add the assistant reply, or use the text format for plain text",
        )
    if all(m.get("weight", 1) == 0 for m in msgs if m["role"] == "assistant"):
        return err(
            "E159",
            "every assistant turn has weight 0, so nothing would be trained",
            "give the turns to learn weight 1 (or drop the key), or drop the row",
        )
    if roles[-1] != "assistant":
        return err(
            "E131",
            f"conversation ends with a {roles[-1]} turn, not assistant",
            "drop the trailing turn or add the assistant reply (an untrained tail is almost always a data bug)",
        )
    data = {"messages": [dict(m) for m in msgs]}
    if tools is not None:
        data["tools"] = tools
    return data


def _check_completions(obj: dict, err) -> dict | None:
    for key, c_type, c_empty in (
        ("prompt", "E140", "E141"),
        ("completion", "E142", "E143"),
    ):
        if key not in obj:
            return err(
                "E111",
                f"completions row has no {key!r}",
                "a completions row needs both 'prompt' and 'completion'",
            )
        v = obj[key]
        if not isinstance(v, str):
            return err(
                c_type,
                f"{key!r} is {_tname(v)}, expected a string",
                f"make {key!r} a string",
            )
        if not v.strip():
            return err(
                c_empty,
                f"{key!r} is empty or whitespace",
                "remove the row or fill it in",
            )
    return {"prompt": obj["prompt"], "completion": obj["completion"]}


def _check_text(obj: dict, err) -> dict | None:
    v = obj["text"]
    if not isinstance(v, str):
        return err("E150", f"'text' is {_tname(v)}, expected a string", "make 'text' a string")
    if not v.strip():
        return err("E151", "'text' is empty or whitespace", "remove the row or fill it in")
    return {"text": v}


_CHECKS = {"chat": _check_chat, "completions": _check_completions, "text": _check_text}
