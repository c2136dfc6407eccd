"""The HTTP side of `mlxpt serve`: the standard library's ThreadingHTTPServer (one thread per
connection, no framework), OpenAI's routes and JSON shapes, server-sent events for streams.

Each handler thread checks the request (auth, size, schema), hands a Job to the Engine and turns
its events into a response. A client that goes away (a failed write, or a closed socket seen
while waiting) cancels its job, so its rows leave the batch at the next step.
"""

from __future__ import annotations

import hmac
import json
import queue
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mlxpt.serve.engine import Engine, Job
from mlxpt.serve.schema import ApiError, Limits, parse_body, parse_request

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, engine: Engine, limits: Limits, api_key: str | None, scorers: tuple[str, ...] = ()):
        self.engine, self.limits, self.api_key, self.scorers = engine, limits, api_key, scorers
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def _strategy_info(result) -> dict:
    return {
        "strategy": result.strategy, "answer": result.answer, "votes": result.votes, "weights": result.weights,
        "scores": result.scores, "samples": result.samples, "answers": result.answers, "n_used": result.n_used,
        "generated_tokens": result.generated_tokens, "seconds": round(result.seconds, 3),
    }  # fmt: skip


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "mlxpt-serve"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the standard library's name
        pass  # quiet: the CLI prints one line per request instead (see _log)

    # -- plumbing ------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        try:
            self._send_json(e.status, e.body())
        except OSError:
            self.close_connection = True

    def _authorised(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode())

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "E901", "the request has no Content-Length", "body", "send a JSON body") from None
        limit = self.server.limits.max_body_bytes
        if length < 0 or length > limit:
            self.close_connection = True
            if 0 < length <= 16 * limit:  # read it away, so the client sees the answer, not a reset
                self.rfile.read(length)
            raise ApiError(413, "E902", f"the body is {length} bytes, over the {limit}-byte limit", "body",
                           "send a smaller request, or start the server with a higher --max-body")  # fmt: skip
        return self.rfile.read(length)

    def _gone(self) -> bool:
        """True once the client closed its side of the connection."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        if not self._authorised():
            return self._error(ApiError(401, "E903", "missing or wrong API key", "Authorization", "send Bearer KEY"))
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            entries = self.server.engine.catalog.entries()
            data = [
                {"id": e.name, "object": "model", "created": e.created, "owned_by": "mlxpt"} for e in entries.values()
            ]
            return self._send_json(200, {"object": "list", "data": data})
        if path in ("/health", "/v1/health"):
            return self._send_json(200, {"status": "ok"})
        if path in ROUTES:
            return self._error(ApiError(405, "E911", f"{path} takes POST", "method", "send a POST request"))
        self._error(
            ApiError(
                404, "E910", f"no route {path[:80]}", "path", "use /v1/models, /v1/chat/completions or /v1/completions"
            )
        )

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if not self._authorised():
                raise ApiError(401, "E903", "missing or wrong API key", "Authorization", "send Bearer KEY")
            kind = ROUTES.get(path)
            if kind is None:
                self.close_connection = True
                raise ApiError(
                    404, "E910", f"no route {path[:80]}", "path", "use /v1/chat/completions or /v1/completions"
                )
            body = parse_body(self._read_body())
            req = parse_request(kind, body, self.server.limits, self.server.scorers)
            self.server.engine.catalog.find(req.model)  # an unknown name is a 404 before any stream starts
            job = Job(req)
            self.server.engine.submit(job)
        except ApiError as e:
            return self._error(e)
        if req.stream:
            self._stream(job)
        else:
            self._whole(job)

    # -- answers -------------------------------------------------------------------------------
    def _events(self, job: Job):
        """The job's events; cancels it once the client has gone."""
        checked = time.monotonic()
        while True:
            try:
                ev = job.events.get(timeout=0.25)
            except queue.Empty:
                ev = None
            if time.monotonic() - checked >= 0.25:  # a busy stream of events must not hide a hang-up
                checked = time.monotonic()
                if not job.cancelled.is_set() and self._gone():
                    job.cancelled.set()
                    self.close_connection = True
            if ev is None:
                continue
            yield ev
            if ev[0] == "done":
                return

    def _head(self, job: Job) -> dict:
        kind = "chat.completion" if job.req.kind == "chat" else "text_completion"
        return {"id": ("chatcmpl-" if job.req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
                "object": kind, "created": int(time.time()), "model": job.req.model}  # fmt: skip

    def _whole(self, job: Job) -> None:
        n = job.req.n
        texts, reasons, items = [""] * n, ["length"] * n, [[] for _ in range(n)]
        extra, error = None, None
        for ev in self._events(job):
            if ev[0] == "delta":
                texts[ev[1]] += ev[2]
                if ev[3] is not None:
                    items[ev[1]].append(ev[3])
            elif ev[0] == "finish":
                reasons[ev[1]] = ev[2]
            elif ev[0] == "strategy":
                texts, reasons, extra = (
                    [ev[1].text],
                    [ev[1].finish_reasons[0] if ev[1].finish_reasons else "stop"],
                    ev[1],
                )
            elif ev[0] == "error":
                error = ev[1]
            elif ev[0] == "done":
                usage = ev[1]
        if job.cancelled.is_set():
            return
        if error is not None:
            return self._error(error)
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            logprobs = self._logprobs(job, items[i]) if job.req.logprobs else None
            if job.req.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": reason or "stop"})  # fmt: skip
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason or "stop"})
        out = {**self._head(job), "choices": choices, "usage": usage}
        if extra is not None:
            out["mlxpt"] = _strategy_info(extra)
        try:
            self._send_json(200, out)
        except OSError:
            self.close_connection = True

    @staticmethod
    def _logprobs(job: Job, items: list[dict]) -> dict:
        if job.req.kind == "chat":
            return {"content": items}
        return {
            "tokens": [x["token"] for x in items],
            "token_logprobs": [x["logprob"] for x in items],
            "top_logprobs": [{t["token"]: t["logprob"] for t in x["top_logprobs"]} for x in items]
            if job.req.top_logprobs
            else None,
            "text_offset": [sum(len(y["token"]) for y in items[:i]) for i in range(len(items))],
        }

    def _chunk(self, job: Job, head: dict, index: int, text: str | None, reason: str | None, item=None) -> dict:
        if job.req.kind == "chat":
            delta = {"content": text} if text is not None else {}
            if text is not None and not getattr(self, "_sent_role", set()).__contains__(index):
                delta["role"] = "assistant"
                self._sent_role.add(index)
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": {"content": [item]} if item else None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": index, "text": text or "", "logprobs": self._logprobs(job, [item]) if item else None,
                      "finish_reason": reason}  # fmt: skip
        return {**head, "object": head["object"] + (".chunk" if job.req.kind == "chat" else ""), "choices": [choice]}

    def _write_event(self, obj) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job: Job) -> None:
        head, self._sent_role = self._head(job), set()
        self.close_connection = True
        try:  # headers now: a client sees its stream start even while the first text is held back
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for ev in self._events(job):
                if ev[0] == "delta":
                    self._write_event(self._chunk(job, head, ev[1], ev[2], None, ev[3]))
                elif ev[0] == "finish":
                    self._write_event(self._chunk(job, head, ev[1], None, ev[2]))
                elif ev[0] == "strategy":
                    r = ev[1]
                    if not job.req.decode.streamed:
                        self._write_event(self._chunk(job, head, 0, r.text, None))
                    last = self._chunk(job, head, 0, None, r.finish_reasons[0] if r.finish_reasons else "stop")
                    last["mlxpt"] = _strategy_info(r)
                    self._write_event(last)
                elif ev[0] == "error":
                    self._write_event(ev[1].body())
                elif ev[0] == "done":
                    if job.req.include_usage:
                        self._write_event(
                            {
                                **head,
                                "object": self._chunk(job, head, 0, None, None)["object"],
                                "choices": [],
                                "usage": ev[1],
                            }
                        )
                    self._write_event("[DONE]")
        except OSError:  # the client went away mid-stream: stop its generation
            job.cancelled.set()
            self.close_connection = True
            for _ in self._events(job):
                pass


def make_server(host: str, port: int, engine: Engine, limits: Limits, api_key: str | None, scorers=()) -> Server:
    """A bound (not yet serving) server; port 0 picks a free port (see `server.url`)."""
    return Server((host, port), engine, limits, api_key, tuple(scorers))
