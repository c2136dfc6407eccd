"""`mlxpt serve` with the official `openai` client against a real server on loopback (a free port),
a tiny random model and a tiny runs folder; one server for the whole module."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
from test_decode import make_adapter_run
from tiny import make_model

openai = pytest.importorskip("openai")

KEY = "test-key"
RUN = "20260101-000000-sft"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import mlx.core as mx

    from mlxpt.runs.store import save_checkpoint
    from mlxpt.serve import ServeConfig, make_server
    from mlxpt.serve.schema import Limits

    root = tmp_path_factory.mktemp("serve")
    base = make_model(root / "base")
    runs = root / "runs"
    run = make_adapter_run(runs / RUN, base)
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 3}))
    weights = {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}
    save_checkpoint(run, 3, {"adapters": weights}, {})
    unfinished = make_adapter_run(runs / "20260102-000000-sft", base, seed=2)  # no status: not served
    (root / "secret.txt").write_text("not for requests")
    limits = Limits(max_body_bytes=4096, max_tokens=8192, max_n=4, max_streams=8)
    server = make_server(ServeConfig(port=0, model=str(base), runs_dir=str(runs), api_key=KEY, limits=limits))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    yield server, client, unfinished.name
    server.shutdown()
    server.server_close()
    server.engine.stop()


def _chat(client, **kw):
    return client.chat.completions.create(**{"model": "base", "messages": MSG, "max_tokens": 8, **kw})


def _raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def test_models_lists_base_finished_runs_and_checkpoints(served):
    server, client, unfinished = served
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and RUN in ids and f"{RUN}:step-00000003" in ids
    assert unfinished not in ids


def test_chat_with_n_and_usage(served):
    _, client, _ = served
    r = _chat(client, n=3, temperature=0.9, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # three samples, not one copied
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 3 * 8
    again = _chat(client, n=3, temperature=0.9, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_streamed_chat_matches_the_whole_answer(served):
    server, client, _ = served
    whole = _chat(client, temperature=0)
    reused = server.engine.reused_tokens
    chunks = list(_chat(client, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the stream's prompt came from the prefix cache (the first answer's), and gave the same text
    assert server.engine.reused_tokens - reused == whole.usage.prompt_tokens - 1


def test_an_adapter_by_run_name_and_its_checkpoint(served):
    _, client, _ = served
    base = _chat(client, temperature=0).choices[0].message.content
    tuned = _chat(client, model=RUN, temperature=0)
    ckpt = _chat(client, model=f"{RUN}:step-00000003", temperature=0)
    assert tuned.choices[0].message.content != base
    assert ckpt.choices[0].message.content == tuned.choices[0].message.content
    assert tuned.model == RUN


def test_a_run_whose_adapter_changed_on_disk_is_served_with_the_new_weights(served, tmp_path):
    """A run resumed and finished again replaces adapters.safetensors: its name was once served
    with the old weights (and their cached prefixes) until the server restarted."""
    import shutil

    server, client, _ = served
    runs = server.engine.catalog.runs_dir
    name = "20260103-000000-sft"
    run = make_adapter_run(runs / name, next(runs.parent.glob("base")), seed=3)
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 3}))
    before = _chat(client, model=name, temperature=0).choices[0].message.content
    other = make_adapter_run(tmp_path / "other", next(runs.parent.glob("base")), seed=4)
    shutil.copy(other / "adapters.safetensors", run / "adapters.safetensors.tmp")
    (run / "adapters.safetensors.tmp").replace(run / "adapters.safetensors")  # as a checkpoint write does
    after = _chat(client, model=name, temperature=0).choices[0].message.content
    assert after != before
    shutil.rmtree(run)


def test_a_strategy_via_the_extra_field_and_the_model_suffix(served):
    _, client, _ = served
    r = _chat(client, extra_body={"mlxpt": {"strategy": "self-consistency", "n": 4, "extract": "last_number"}})
    info = r.model_extra["mlxpt"]
    assert info["strategy"] == "self-consistency" and info["n_used"] == 4 and len(info["samples"]) == 4
    assert isinstance(info["votes"], dict) and r.choices[0].message.content in info["samples"]
    b = client.completions.create(model=f"{RUN}@best-of-n", prompt="2+2=", max_tokens=6)
    scores = b.model_extra["mlxpt"]["scores"]
    assert len(scores) == 4 and b.choices[0].text == b.model_extra["mlxpt"]["samples"][int(np.argmax(scores))]
    streamed = list(_chat(client, model="base@beam", stream=True, extra_body={"mlxpt": {"n": 2}}))
    assert streamed[-1].model_extra["mlxpt"]["strategy"] == "beam"


def test_completions_logprobs_and_stop(served):
    _, client, _ = served
    r = client.completions.create(model="base", prompt="abc", max_tokens=12, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    text = r.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model="base", prompt="abc", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


BAD = [
    ({"model": "nope"}, 404, "E904"),
    ({"model": "../secret.txt"}, 400, "E905"),
    ({"model": "/etc/passwd"}, 400, "E905"),
    ({"model": f"{RUN}/../../secret.txt"}, 400, "E905"),
    ({"model": "base", "n": -1}, 400, "E906"),
    ({"model": "base", "n": 10**6}, 400, "E908"),
    ({"model": "base", "max_tokens": -5}, 400, "E906"),
    ({"model": "base", "max_tokens": 10**9}, 400, "E908"),
    ({"model": "base", "temperature": "hot"}, 400, "E906"),
    ({"model": "base", "temperature": 10**400}, 400, "E906"),  # once an OverflowError in the range check
    ({"model": "base", "max_tokens": 10**400}, 400, "E908"),
    ({"model": "base", "messages": []}, 400, "E907"),
    ({"model": "base", "mlxpt": {"strategy": "telepathy"}}, 400, "E912"),
    ({"model": "base", "mlxpt": {"strategy": "greedy"}, "stop": ["$$"]}, 400, "E912"),  # once ignored
    ({"model": "base@self-consistency", "logprobs": True}, 400, "E912"),
    ({"model": "base", "mlxpt": {"strategy": "best-of-n", "scorer": "verifier:/tmp/x.py:fn"}}, 403, "E913"),
    ({"model": "base", "mlxpt": {"strategy": "best-of-n", "scorer": "rm:../runs/x"}}, 403, "E913"),
]


@pytest.mark.parametrize("body,status,code", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, code):
    server, client, _ = served
    got, answer = _raw(server, "POST", "/v1/chat/completions", json.dumps({"messages": MSG, **body}).encode())
    assert got == status and answer["error"]["code"] == code and answer["error"]["message"].startswith(code)
    assert _chat(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_bad_transport_and_keys(served):
    server, client, _ = served
    assert _raw(server, "POST", "/v1/chat/completions", b"{not json")[1]["error"]["code"] == "E901"
    streamed = json.dumps({"model": "nope", "messages": MSG, "stream": True}).encode()
    assert _raw(server, "POST", "/v1/chat/completions", streamed)[0] == 404  # before any stream starts
    status, answer = _raw(server, "POST", "/v1/chat/completions", b"x" * 10_000)
    assert status == 413 and answer["error"]["code"] == "E902"
    status, answer = _raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert _raw(server, "GET", "/v1/../../secret.txt")[0] == 404
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="nope")
    assert len(client.models.list().data) == 3  # still serving


def test_a_failing_generation_step_fails_its_request_not_the_server(served, monkeypatch):
    from mlx_lm.generate import BatchGenerator

    server, client, _ = served

    def broken(self):
        raise RuntimeError("injected")

    monkeypatch.setattr(BatchGenerator, "next", broken)
    with pytest.raises(openai.InternalServerError) as e:
        _chat(client, n=2)
    assert e.value.body["code"] == "E919" and "injected" in e.value.body["message"]
    monkeypatch.undo()
    assert _chat(client, max_tokens=2).choices and _active(server) == 0


def _active(server) -> int:
    with server.engine._lock:
        return server.engine._active


def test_a_client_that_disconnects_stops_its_generation(served):
    server, client, _ = served
    host, port = server.server_address[:2]
    for stream in (True, False):
        before = server.engine.cancelled_rows
        body = json.dumps(
            {"model": "base", "messages": MSG, "max_tokens": 8192, "n": 4, "stream": stream, "temperature": 0}
        ).encode()
        s = socket.create_connection((host, port))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.time() + 10
        while _active(server) == 0 and time.time() < deadline:
            time.sleep(0.005)
        if stream:
            s.recv(200)  # the first event came
        s.close()
        while _active(server) and time.time() < deadline:
            time.sleep(0.02)
        assert _active(server) == 0 and not any(b.rows for b in server.engine._batches.values())
        assert server.engine.cancelled_rows > before  # stopped, not run to its 8192 tokens
    assert _chat(client, max_tokens=2).choices


def test_concurrent_requests_share_the_batch(served):
    _, client, _ = served
    results, errors = [], []

    def one(i):
        try:
            results.append(_chat(client, temperature=0, max_tokens=6, messages=[{"role": "user", "content": f"q{i}"}]))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    alone = _chat(client, temperature=0, max_tokens=6, messages=[{"role": "user", "content": "q3"}])
    same = [r for r in results if r.usage.prompt_tokens == alone.usage.prompt_tokens]
    assert alone.choices[0].message.content in [r.choices[0].message.content for r in same]


def test_cli_refuses_a_public_bind_without_key_and_bad_flags(capsys, tmp_path):
    from mlxpt.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 5
    assert "E915" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 1
    assert "E916" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["serve", "--runs-dir", str(tmp_path / "f")]) == 1
    assert "E917" in capsys.readouterr().err
    assert main(["serve", "--scorer", "verifier:nope.py:fn"]) == 1
    assert "E622" in capsys.readouterr().err


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_runs_screen_serves_the_selected_run_and_stops_it_on_quit(tmp_path, monkeypatch):
    import subprocess

    from app.main import create_app
    from app.screens.runs import RunsScreen

    started = []

    class FakeServer:
        def __init__(self, cmd, **kw):
            self.cmd, self.code = cmd, None
            started.append(self)

        def poll(self):
            return self.code

        def terminate(self):
            self.code = -15

        def wait(self, timeout=None):
            return self.code

    runs = tmp_path / "runs"
    (runs / RUN).mkdir(parents=True)
    (runs / RUN / "config.json").write_text(
        json.dumps({"method": "sft", **{k: {} for k in ("data", "adapter", "train")}, "model": {"model": "/m/base"}})
    )
    (runs / RUN / "status.json").write_text(json.dumps({"status": "finished", "step": 3}))
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    app = create_app(str(runs), poll_runs=False)
    async with app.run_test(size=(100, 24)) as pilot:
        await pilot.pause(0.1)
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        await pilot.press("v")
        await pilot.pause(0.1)
        (proc,) = started
        assert proc.cmd[2:4] == ["mlxpt.cli", "serve"] and proc.cmd[proc.cmd.index("--model") + 1] == "/m/base"
        assert proc.cmd[proc.cmd.index("--runs-dir") + 1] == str(runs)
        detail = str(screen.query_one("#run-detail").render())
        assert "serving http://127.0.0.1:" in detail and RUN in detail
        await pilot.press("v")  # again: stopped
        assert proc.code == -15 and "serving" not in str(screen.query_one("#run-detail").render())
        await pilot.press("v")
        await pilot.pause(0.1)
        assert len(started) == 2 and started[1].code is None
    assert started[1].code == -15  # quitting the TUI stopped the server
