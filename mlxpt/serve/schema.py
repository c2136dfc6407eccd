"""Request schema of the OpenAI-compatible endpoints: a JSON body checked field by field into a
`Request`, or an `ApiError` (an MlxptError with an HTTP status) that becomes OpenAI's error JSON.

Nothing here loads a model or reads a file: a request is validated completely before it costs
anything. Scorer specs that load code (`verifier:file.py:fn`, `reward:file.py:fn`) or folders
(`rm:RUN`) are refused unless the same spec was given to `mlxpt serve --scorer` on the command line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from mlxpt.decode.options import DecodeConfig, check_decode
from mlxpt.decode.sampling import SamplingConfig
from mlxpt.errors import ConfigError, MlxptError


class ApiError(MlxptError):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, code: str, what: str, param: str | None = None, hint: str | None = None):
        super().__init__(code, what, param, hint)
        self.status, self.param = status, param

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.line(), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """Request limits (flags of `mlxpt serve`)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # most tokens one choice may ask for
    max_n: int = 16  # most choices (or strategy samples) per request
    max_streams: int = 32  # requests being generated at once (more get 429)


@dataclass
class Request:
    kind: str  # "chat" | "completion"
    model: str
    messages: list[dict] | None  # chat
    prompt: str | None  # completion
    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    decode: DecodeConfig | None = None  # a test-time strategy (the `mlxpt` field or a model suffix)
    extra: dict = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        """True when the request decodes on the shared batched loop (no strategy)."""
        return self.decode is None


STRATEGY_FIELDS = (
    "strategy",
    "n",
    "scorer",
    "extract",
    "weighting",
    "adaptive",
    "batch",
    "confidence",
    "length_penalty",
)


def _bad(what: str, param: str, hint: str = "see docs/serve.md", code: str = "E906") -> ApiError:
    return ApiError(400, code, what, param, hint)


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (E901 for anything else)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(
            f"the body is not valid JSON ({str(e).splitlines()[0][:80]})", "body", "send a JSON object", "E901"
        ) from None
    if not isinstance(body, dict):
        raise _bad("the body is not a JSON object", "body", "send a JSON object", "E901")
    return body


def _shown(v) -> str:
    """A request's value in an error, at most 40 characters (a 400-digit number once came back whole)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None, limit_flag: str = "") -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be a whole number, got {_shown(v)}", name)
    if v < lo:
        raise _bad(f"{name}={_shown(v)} is out of range", name, f"use a whole number >= {lo}")
    if hi is not None and v > hi:
        raise _bad(
            f"{name}={_shown(v)} is over this server's limit of {hi}",
            name,
            f"ask for at most {hi} {limit_flag}",
            "E908",
        )
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(min(max(v, -1e300), 1e300)):
        raise _bad(f"{name} must be a finite number, got {_shown(v)}", name)  # a 400-digit int: no OverflowError
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(f"{name}={_shown(v)} is out of range", name, f"use a value in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) and s for s in v):
        raise _bad("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(v)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list", "messages", "send [{'role': 'user', 'content': '...'}]", "E907")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role", code="E907")
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise _bad(f"messages[{i}] has a non-text content part", f"messages[{i}].content", code="E907")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", f"messages[{i}].content", code="E907")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str) or not p:
        raise _bad("prompt must be a non-empty string", "prompt", "send one prompt string per request", "E907")
    return p


def check_scorer(spec, allowed: tuple[str, ...]) -> None:
    """A request may name built-in scorers; specs that load code or folders only if the server was
    started with that exact spec (`--scorer`)."""
    if spec is None or spec in allowed or spec in ("logprob", "verifier"):
        return
    if not isinstance(spec, str):
        raise _bad("mlxpt.scorer must be a string", "mlxpt.scorer", code="E912")
    kind, _, rest = spec.partition(":")
    if kind == "reward" and rest and ":" not in rest and "/" not in rest and "\\" not in rest and "." not in rest:
        return
    raise ApiError(
        403, "E913", f"scorer {spec!r} would load code or files named by a request", "mlxpt.scorer",
        "use logprob, verifier or reward:NAME, or start the server with --scorer SPEC",
    )  # fmt: skip


def _decode_config(
    extra: dict, suffix: str | None, common: dict, allowed_scorers: tuple[str, ...]
) -> DecodeConfig | None:
    if not isinstance(extra, dict):
        raise _bad("the mlxpt field must be an object", "mlxpt", code="E912")
    unknown = sorted(set(extra) - set(STRATEGY_FIELDS))
    if unknown:
        raise _bad(
            f"unknown mlxpt field {unknown[0]!r}", f"mlxpt.{unknown[0]}", f"use {', '.join(STRATEGY_FIELDS)}", "E912"
        )
    strategy = extra.get("strategy", suffix)
    if strategy is None:
        if extra:
            raise _bad("the mlxpt field needs a strategy", "mlxpt.strategy", code="E912")
        return None
    check_scorer(extra.get("scorer"), allowed_scorers)
    limit = common.pop("max_n")
    n = _int(extra, "n", min(8, limit) if strategy != "greedy" else 1, 1, limit, "(--max-n)")
    kw = {
        k: extra[k]
        for k in ("scorer", "extract", "weighting", "adaptive", "batch", "confidence", "length_penalty")
        if k in extra
    }
    try:
        cfg = DecodeConfig(strategy, n, common["max_tokens"], common["sampling"], **kw)
        check_decode(cfg)
    except ConfigError as e:
        raise _bad(e.line(), "mlxpt", "fix the mlxpt field", "E912") from None
    except TypeError as e:
        raise _bad(f"bad mlxpt field ({e})", "mlxpt", code="E912") from None
    return cfg


def parse_request(kind: str, body: dict, limits: Limits, allowed_scorers: tuple[str, ...] = ()) -> Request:
    """A checked Request of a chat or completion body (ApiError E906-E913 on anything wrong)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model", "GET /v1/models lists the names", "E907")
    messages = _messages(body) if kind == "chat" else None
    prompt = _prompt(body) if kind == "completion" else None
    n = _int(body, "n", 1, 1, limits.max_n, "(--max-n)")
    cap = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, cap, min(256, limits.max_tokens), 1, limits.max_tokens, "(--max-tokens)")
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed", None, 0, 2**63 - 1)
    if kind == "chat":
        logprobs = body.get("logprobs") or False
        if not isinstance(logprobs, bool):
            raise _bad("logprobs must be true or false", "logprobs")
        top = _int(body, "top_logprobs", 0, 0, 20) or 0
    else:
        top = _int(body, "logprobs", None, 0, 5)
        logprobs, top = top is not None, top or 0
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    base, _, suffix = model.partition("@")
    common = {"max_tokens": max_tokens, "max_n": limits.max_n}
    common["sampling"] = None if "temperature" not in body else SamplingConfig(temperature, top_p, seed=seed)
    if common["sampling"] is None and (seed is not None or top_p != 1.0):
        common["sampling"] = SamplingConfig(0.7, top_p, seed=seed)
    decode = _decode_config(body.get("mlxpt") or {}, suffix or None, common, allowed_scorers)
    if decode is not None and n != 1:
        raise _bad("n > 1 with a strategy: the strategy's samples are mlxpt.n", "n", "set mlxpt.n instead", "E912")
    for key, given in (("stop", body.get("stop") is not None), ("logprobs", logprobs)):
        if decode is not None and given:  # once ignored without a word
            raise _bad(
                f"{key} with a strategy: a strategy chooses among whole samples, which it does not cut or score per token",
                key, f"drop {key}, or leave out the strategy", "E912",
            )  # fmt: skip
    return Request(
        kind, base, messages, prompt, n, max_tokens, temperature, top_p, _stop(body), seed, logprobs, top,
        stream, include_usage, decode,
    )  # fmt: skip
