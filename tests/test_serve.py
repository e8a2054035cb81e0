"""`edgelm serve`: a real uvicorn server on a loopback port, driven by a plain HTTP client.

The model's runtime is the torch runtime behind a wrapper that counts forward calls and can hold one call
until the test lets it go, so that disconnecting and cancelling are observed without timing anything.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import numpy as np
import pytest
import uvicorn
from conftest import make_checkpoint

import edgelm
from edgelm.errors import EdgelmError
from edgelm.generation.api import Model
from edgelm.runtimes.base import Runtime
from edgelm.serve import create_app, listen
from edgelm.serve_guard import BODY_BYTES_BASE, BODY_BYTES_PER_TOKEN
from edgelm.tokenizer import Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [{"role": "user", "content": "def"}]


class GatedRuntime:
    """Another runtime's forward calls, counted; the call numbered `pause_at` waits for `gate`, and with
    `fail` set every call raises."""

    name: ClassVar[str] = "gated"
    artifacts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inner: Runtime) -> None:
        self.inner, self.config, self.tokenizer, self.device = inner, inner.config, inner.tokenizer, "cpu"
        self.calls = 0
        self.pause_at: int | None = None
        self.reached, self.gate = threading.Event(), threading.Event()
        self.fail = False

    def reset(self) -> None:
        self.inner.reset()

    @property
    def held(self) -> tuple[int, ...]:
        return self.inner.held

    def keep(self, n: int) -> int:
        return self.inner.keep(n)

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the accelerator caught fire")
        if self.calls == self.pause_at:
            self.reached.set()
            self.gate.wait()
        return self.inner.forward(ids, all_logits)

    def close(self) -> None:
        self.inner.close()


class LogWatch(logging.Handler):
    """Collects edgelm.serve's messages; `wait_for` blocks until enough of them contain a text."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.messages.append(record.getMessage())
            self.changed.notify_all()

    def wait_for(self, text: str, count: int = 1) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.matching(text)) >= count, timeout=60), self.messages
            return self.matching(text)

    def matching(self, text: str) -> list[str]:
        return [m for m in self.messages if text in m]


@dataclass
class Served:
    port: int
    model: Model
    runtime: GatedRuntime
    log: LogWatch


@contextmanager
def running(app: Any) -> Iterator[int]:
    """`app` served by uvicorn in a thread of this process, on a free port of this machine."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    while not server.started:
        assert thread.is_alive() and not started.wait(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Iterator[Served]:
    from edgelm.runtimes.torch import TorchRuntime

    path = make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", small_tokenizer)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    runtime = GatedRuntime(TorchRuntime(path, device="cpu"))
    model = Model(runtime)  # type: ignore[arg-type]
    watch = LogWatch()
    logger = logging.getLogger("edgelm.serve")
    logger.addHandler(watch)
    level, logger.level = logger.level, logging.INFO
    with running(create_app(model, "tiny")) as port:
        yield Served(port, model, runtime, watch)
    model.close()
    logger.removeHandler(watch)
    logger.level = level


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    """Send a request to the server on this machine's port (JSON, unless `headers` say otherwise); its
    status, JSON answer and response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    raw = isinstance(body, (bytes, type(None), Iterator))  # bytes as they are, an iterator in chunks
    data = body if raw else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload, response


def events(served: Served, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON events of a streamed response, checking the SSE framing and the final [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.request(
        "POST", path, body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    raw = response.read().decode("utf-8")
    conn.close()
    blocks = raw.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""] and all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-2]]


def test_completion(served: Served) -> None:
    expected = served.model.generate("def", max_new_tokens=12, temperature=0)
    body = {
        "prompt": "def",
        "max_tokens": 12,
        "temperature": 0,
        "model": "whatever",
        # fields OpenAI clients send, at the values that switch off what edgelm does not support
        "logprobs": None,
        "echo": False,
        "frequency_penalty": 0,
        "user": "me",
        "stream_options": None,
    }
    status, out, _ = request(served.port, "POST", "/v1/completions", body)
    assert status == 200, out
    assert out["object"] == "text_completion" and out["model"] == "whatever"
    (choice,) = out["choices"]
    assert choice["text"] == expected and choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(served.model.tokenize("def", add_bos=True))
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 12 else "stop")
    # OpenAI's default is 16 tokens; same seed, same text
    status, a, _ = request(served.port, "POST", "/v1/completions", {"prompt": "class", "seed": 3})
    assert status == 200 and a["usage"]["completion_tokens"] <= 16
    assert (
        request(served.port, "POST", "/v1/completions", {"prompt": "class", "seed": 3})[1]["choices"]
        == a["choices"]
    )


def test_chat_completion(served: Served) -> None:
    expected = served.model.chat(MESSAGES, max_new_tokens=10, temperature=0)
    status, out, _ = request(
        served.port,
        "POST",
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 10, "temperature": 0},
    )
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert out["usage"]["prompt_tokens"] == len(served.model.tokenize(served.model.chat_prompt(MESSAGES)))
    # content as a list of text parts, and max_completion_tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "d"}, {"type": "text", "text": "ef"}]}]
    body = {"messages": parts, "max_completion_tokens": 10, "temperature": 0}
    assert request(served.port, "POST", "/v1/chat/completions", body)[1]["choices"] == out["choices"]


def test_streaming_equals_the_whole_response(served: Served) -> None:
    body = {"prompt": "class", "max_tokens": 30, "temperature": 0.9, "seed": 11}
    whole = request(served.port, "POST", "/v1/completions", body)[1]
    chunks = events(served, "/v1/completions", body)
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]

    body = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    whole = request(served.port, "POST", "/v1/chat/completions", body)[1]
    chunks = events(served, "/v1/chat/completions", body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": whole["choices"][0]["finish_reason"],
    }
    assert chunks[-1]["usage"] == whole["usage"]


def test_logprobs_in_both_shapes_whole_and_streamed(served: Served) -> None:
    """Chat's logprobs.content and completions' tokens/token_logprobs/top_logprobs hold the model's own
    figures (`Model.stream(logprobs=k)`), one entry per generated token, the same streamed as whole."""
    with served.model.chat_stream(MESSAGES, max_new_tokens=10, temperature=0, logprobs=2) as stream:
        text = "".join(stream)
    assert stream.logprobs is not None and len(stream.logprobs) == stream.completion_tokens
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    status, out, _ = request(served.port, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    (choice,) = out["choices"]
    assert choice["message"]["content"] == text
    content = choice["logprobs"]["content"]
    # within the runtime's tolerance: the server's request reuses the prefix this call left
    assert [e["logprob"] for e in content] == pytest.approx([e.logprob for e in stream.logprobs], abs=1e-4)
    pieces = served.model.tokenizer.token_bytes
    assert [bytes(e["bytes"]) for e in content] == [pieces[e.token] for e in stream.logprobs]
    for e, w in zip(content, stream.logprobs, strict=True):
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx([lp for _, lp in w.top], abs=1e-4)
    chunks = events(served, "/v1/chat/completions", body)
    assert [
        e for c in chunks[1:] if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
    ] == content

    body = {"prompt": "def", "max_tokens": 8, "temperature": 0, "logprobs": 3}
    status, out, _ = request(served.port, "POST", "/v1/completions", body)
    logprobs = out["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == out["usage"]["completion_tokens"]
    assert all(
        len(top) <= 3 and max(top.values()) >= lp
        for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"], strict=True)
    )
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    chunks = events(served, "/v1/completions", body)
    streamed = [c["choices"][0]["logprobs"] for c in chunks[:-1]]
    for key in ("tokens", "token_logprobs", "text_offset"):  # offsets run on across the chunks
        assert [v for part in streamed for v in part[key]] == logprobs[key], key
    chosen_only = request(served.port, "POST", "/v1/completions", {**body, "logprobs": 0})[1]["choices"][0]
    assert chosen_only["logprobs"]["token_logprobs"] == logprobs["token_logprobs"]
    assert chosen_only["logprobs"]["top_logprobs"] == [{}] * len(logprobs["tokens"])
    assert (
        request(served.port, "POST", "/v1/completions", {**body, "logprobs": None})[1]["choices"][0][
            "logprobs"
        ]
        is None
    )


def test_response_format_gives_json(served: Served) -> None:
    from test_json_mode import SCHEMA

    spec = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    body = {"messages": MESSAGES, "max_tokens": 70, "temperature": 0.7, "seed": 2, "response_format": spec}
    status, out, _ = request(served.port, "POST", "/v1/chat/completions", body)
    assert status == 200 and out["choices"][0]["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMA)
    chunks = events(served, "/v1/chat/completions", body)
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        == out["choices"][0]["message"]["content"]
    )
    body = {"prompt": "x", "max_tokens": 40, "temperature": 0, "response_format": {"type": "json_object"}}
    text = request(served.port, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    assert text.startswith("{")
    body["response_format"] = {"type": "text"}
    assert request(served.port, "POST", "/v1/completions", body)[0] == 200


def test_models(served: Served) -> None:
    status, out, _ = request(served.port, "GET", "/v1/models")
    assert status == 200 and out["object"] == "list"
    assert [m["id"] for m in out["data"]] == ["tiny"] and out["data"][0]["context_length"] == 96


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b"{not json", None),
        ("/v1/completions", b"\xff\xfe", None),
        ("/v1/completions", [1, 2], None),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": 3}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 95}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "top_k": -3}, "top_k"),
        ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
        ("/v1/completions", {"prompt": "x", "seed": True}, "seed"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, None),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "word " * 200}, None),
        ("/v1/chat/completions", {}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 500}, "max_tokens"),
        # fields edgelm does not support, named
        ("/v1/completions", {"prompt": "x", "something_new": {"nested": [1]}}, "something_new"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"messages": MESSAGES, "cache_prompt": True}, "cache_prompt"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 3}, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "response_format": {"type": "xml"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "response_format": {"type": "json_schema"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": MESSAGES,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}},
            },
            None,
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "logprobs": True, "top_logprobs": 30},
            "top_logprobs",
        ),
    ],
)
def test_bad_requests_get_openai_errors(served: Served, path: str, body: Any, param: str | None) -> None:
    calls = served.runtime.calls
    status, out, response = request(served.port, "POST", path, body)
    assert status == 400 and response.getheader("content-type") == "application/json"
    error = out["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert served.runtime.calls == calls  # refused before generating


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({"Host": "evil.example:8080"}, {"prompt": "x"}, 403, "Host 'evil.example' is not served here"),
        ({"Origin": "http://evil.example"}, {"prompt": "x"}, 403, "--allow-origin http://evil.example"),
        ({"Content-Type": "text/plain"}, {"prompt": "x"}, 415, "Content-Type: application/json"),
        ({}, b"[" * 100_000, 400, "nests too deeply"),
        ({}, "OVERSIZED", 413, "more than the"),
        ({}, "OVERSIZED-CHUNKED", 413, "more than the"),  # no Content-Length: counted as it is read
    ],
    ids=["rebound-host", "foreign-origin", "text-plain", "deep-json", "oversized", "oversized-chunked"],
)
def test_what_browsers_and_floods_send_is_refused_before_generating(
    served: Served, headers: dict[str, str], body: Any, status: int, message: str
) -> None:
    calls = served.runtime.calls
    limit = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * served.model.config.max_position_embeddings
    if body == "OVERSIZED":  # one byte too many
        body = b" " * (limit + 1)
    elif body == "OVERSIZED-CHUNKED":  # http.client sends an iterator in chunks, without a length
        body = iter([b" " * limit, b" "])
    got, out, _ = request(served.port, "POST", "/v1/completions", body, headers)
    assert got == status and message in out["error"]["message"], out
    assert served.runtime.calls == calls
    assert request(served.port, "GET", "/docs")[0] == 404  # FastAPI's pages only with --docs


def test_an_allowed_origin_gets_cors_headers() -> None:
    """A page from an Origin the server was told to allow gets its preflight answered and CORS headers."""
    import asyncio

    from starlette.requests import Request
    from starlette.responses import Response

    from edgelm.serve_guard import Guard, guarded

    guard = Guard(origins=("http://localhost:3000",))

    def scope(method: str, origin: str) -> Request:
        headers = [(b"host", b"127.0.0.1:8080"), (b"origin", origin.encode())]
        headers += [(b"content-type", b"application/json")]
        return Request({"type": "http", "method": method, "path": "/v1/models", "headers": headers})

    async def call_next(request: Request) -> Response:
        return Response("ok")

    def refused(status: int, message: str) -> Response:
        return Response(message, status_code=status)

    allowed = "http://localhost:3000"
    preflight = asyncio.run(guarded(guard, scope("OPTIONS", allowed), call_next, refused))
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == allowed
    answered = asyncio.run(guarded(guard, scope("POST", allowed), call_next, refused))
    assert answered.body == b"ok" and answered.headers["access-control-allow-origin"] == allowed
    other = asyncio.run(guarded(guard, scope("OPTIONS", "http://evil.example"), call_next, refused))
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


def test_errors_outside_generation(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    status, out, _ = request(served.port, "GET", "/v1/nothing")
    assert status == 404 and out["error"]["type"] == "invalid_request_error"
    assert request(served.port, "GET", "/v1/completions")[0] == 405
    monkeypatch.setattr(served.model.tokenizer, "chat_template", None)
    status, out, _ = request(served.port, "POST", "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 400 and "no chat template" in out["error"]["message"]


def test_internal_errors_are_json(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(served.runtime, "fail", True)
    status, out, _ = request(served.port, "POST", "/v1/completions", {"prompt": "x"})
    assert (
        status == 500 and out["error"]["type"] == "server_error" and "caught fire" in out["error"]["message"]
    )
    (event,) = events(served, "/v1/completions", {"prompt": "x"})
    assert event["error"]["type"] == "server_error"
    monkeypatch.setattr(served.runtime, "fail", False)
    assert request(served.port, "POST", "/v1/completions", {"prompt": "x"})[0] == 200  # the model still works


def test_concurrent_requests_queue(served: Served) -> None:
    bodies = [{"prompt": p, "max_tokens": 20, "temperature": 0.8, "seed": i} for i, p in enumerate("abcdef")]
    expected = [request(served.port, "POST", "/v1/completions", b)[1]["choices"] for b in bodies]
    results: list[Any] = [None] * len(bodies)

    def run(i: int) -> None:
        results[i] = request(served.port, "POST", "/v1/completions", bodies[i])[1]["choices"]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected


def test_slots_run_at_once_and_keep_each_conversation(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """Two slots: a request runs while the other slot is held up mid-generation, and a conversation's next
    turn goes to the slot that holds its last one, which prefills only what the turn adds."""
    from edgelm.runtimes.torch import TorchRuntime

    path = make_checkpoint(tmp_path / "ckpt", small_tokenizer)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    runtimes = [GatedRuntime(TorchRuntime(path, device="cpu")) for _ in range(2)]
    models = [Model(r) for r in runtimes]  # type: ignore[arg-type]
    reference = Model(TorchRuntime(path, device="cpu"))
    greedy = {"max_tokens": 6, "temperature": 0}
    with running(create_app(models, "tiny")) as port:
        first = runtimes[0]
        first.pause_at = first.calls + 2  # the first request takes slot 1, and stops after its prefill
        held_up: list[Any] = []
        thread = threading.Thread(
            target=lambda: held_up.append(
                request(port, "POST", "/v1/completions", {"prompt": "a", **greedy})
            ),
            daemon=True,
        )
        thread.start()
        assert first.reached.wait(60)
        status, out, _ = request(port, "POST", "/v1/completions", {"prompt": "b", **greedy})
        assert status == 200 and out["choices"][0]["text"] == reference.generate("b", 6, 0)
        assert not held_up  # slot 2 answered while slot 1 was still held up
        first.gate.set()
        thread.join(60)
        assert held_up[0][1]["choices"][0]["text"] == reference.generate("a", 6, 0)

        turn = [{"role": "user", "content": "def fibonacci(n):"}]
        out = request(port, "POST", "/v1/chat/completions", {"messages": turn, **greedy})[1]
        answer = out["choices"][0]["message"]["content"]
        slot = max(range(2), key=lambda i: models[i].reusable(models[i].chat_ids(turn)))
        request(port, "POST", "/v1/completions", {"prompt": "class", **greedy})  # to the other slot
        turn += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and again"}]
        calls = [r.calls for r in runtimes]
        reusable = models[slot].reusable(models[slot].chat_ids(turn))
        out = request(port, "POST", "/v1/chat/completions", {"messages": turn, **greedy})[1]
        assert runtimes[1 - slot].calls == calls[1 - slot] and runtimes[slot].calls > calls[slot]
        assert reusable > len(reference.chat_ids(turn[:1])) - 2
        assert out["choices"][0]["message"]["content"] == reference.chat(turn, 6, 0)
    for model in [*models, reference]:
        model.close()


def open_stream(served: Served, body: dict[str, Any]) -> http.client.HTTPConnection:
    """Start a streamed completion and return once its response headers have arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    data = json.dumps({**body, "stream": True})
    conn.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    return conn


def hang_up(conn: http.client.HTTPConnection) -> None:
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_disconnect_cancels_the_running_generation(served: Served) -> None:
    runtime, log = served.runtime, served.log
    runtime.reached.clear()
    runtime.gate.clear()
    runtime.pause_at = runtime.calls + 4  # the prefill and three decode steps
    try:
        conn = open_stream(served, {"prompt": "def", "max_tokens": 60, "temperature": 0})
        assert runtime.reached.wait(60)
        went = len(log.matching("went away"))
        hang_up(conn)
        log.wait_for("went away", went + 1)  # the server saw the disconnect and cancelled
        ended = len(log.matching("finish_reason cancelled"))
        runtime.gate.set()
        (message,) = log.wait_for("finish_reason cancelled", ended + 1)[ended:]
        # the forward call in flight was the last one: its token ends the generation
        assert runtime.calls == runtime.pause_at
        assert message.endswith(": 2 prompt + 4 completion tokens, finish_reason cancelled")
    finally:
        runtime.pause_at = None
        runtime.gate.set()


def test_disconnect_cancels_only_that_request(served: Served) -> None:
    """A queued request whose client leaves is cancelled before it starts; the running one goes on."""
    runtime, log = served.runtime, served.log
    body = {"prompt": "class", "max_tokens": 40, "temperature": 0}
    before = runtime.calls
    expected = events(served, "/v1/completions", body)
    forwards = runtime.calls - before
    runtime.reached.clear()
    runtime.gate.clear()
    runtime.pause_at = runtime.calls + 3
    try:
        first: list[Any] = []
        reader = threading.Thread(
            target=lambda: first.extend(events(served, "/v1/completions", body)), daemon=True
        )
        reader.start()
        assert runtime.reached.wait(60)
        went = len(log.matching("went away"))
        hang_up(open_stream(served, {"prompt": "x", "max_tokens": 40}))  # queued behind the first
        log.wait_for("went away", went + 1)
        ended = len(log.matching("finish_reason"))
        runtime.gate.set()
        reader.join(60)
        messages = log.wait_for("finish_reason", ended + 2)[ended:]
        assert [c["choices"] for c in first] == [c["choices"] for c in expected]
        assert messages[1].endswith(": 2 prompt + 0 completion tokens, finish_reason cancelled")
        assert runtime.calls - before == 2 * forwards  # the queued request never reached the runtime
    finally:
        runtime.pause_at = None
        runtime.gate.set()


def test_missing_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "edgelm.serve")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(EdgelmError, match=r"pip install 'edgelm\[serve\]'"):
        importlib.import_module("edgelm.serve")


def test_listen_errors(served: Served) -> None:
    with pytest.raises(EdgelmError, match=r"cannot listen on 127\.0\.0\.1"):
        listen("127.0.0.1", served.port)
    with pytest.raises(EdgelmError, match="port"):
        listen("127.0.0.1", 70000)


def test_serve_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    from edgelm.cli import main

    with pytest.raises(SystemExit) as end:
        main(["serve", "--help"])
    assert end.value.code == 0
    help_text = capsys.readouterr().out
    assert "OpenAI" in help_text and "--host" in help_text and "127.0.0.1" in help_text


# ------------------------------------------------------------------------------ `edgelm serve` as a process


def exported_artifact(kind: str, directory: Path, tokenizer: Tokenizer) -> Path:
    """A GGUF file or an ONNX folder of a random checkpoint that has a chat template."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    checkpoint = make_checkpoint(directory / "ckpt", tokenizer)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    if kind == "gguf":
        return export_gguf(checkpoint, directory / "model.gguf", "q8_0")
    return export_onnx(checkpoint, directory / "onnx", "int8")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "runtime"), [("gguf", "llamacpp"), ("onnx", "onnxruntime")])
def test_serve_command_on_an_exported_artifact(
    tmp_path: Path, small_tokenizer: Tokenizer, kind: str, runtime: str
) -> None:
    """`edgelm serve --slots 2` in its own process says each slot's memory, answers with the text the
    artifact's runtime generates in this one, and stops on Ctrl-C with a line and the shell's code for it."""
    artifact = exported_artifact(kind, tmp_path, small_tokenizer)
    messages = [{"role": "user", "content": "def"}]
    with edgelm.load(artifact) as model:
        assert model.runtime.name == runtime
        completion = model.generate("def", max_new_tokens=10, temperature=0)
        chat = model.chat(messages, max_new_tokens=10, temperature=0)
    command = [sys.executable, "-m", "edgelm", "serve", str(artifact), "--port", "0", "--slots", "2"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        lines = []  # llama.cpp may write its own lines first
        while not (
            match := re.search(
                r"serving .* \((\S+) on cpu\) at http://127\.0\.0\.1:(\d+)/v1",
                line := server.stderr.readline(),
            )
        ):
            assert line, "".join(lines)  # the server ended without saying where it listens
            lines.append(line)
        assert match[1] == runtime, line
        assert any(re.match(r"edgelm: slot 2 of 2: -?\d+ MiB", line) for line in lines), lines
        port = int(match[2])
        body = {"prompt": "def", "max_tokens": 10, "temperature": 0}
        status, payload, _ = request(port, "POST", "/v1/completions", body)
        assert status == 200 and payload["choices"][0]["text"] == completion
        body = {"messages": messages, "max_tokens": 10, "temperature": 0}
        status, payload, _ = request(port, "POST", "/v1/chat/completions", body)
        assert status == 200 and payload["choices"][0]["message"]["content"] == chat
        server.send_signal(signal.SIGINT)
        rest = server.communicate(timeout=30)[1]
        assert server.returncode == 130 and rest.endswith("edgelm: interrupted\n"), rest  # Ctrl-C's code
        assert "Traceback" not in rest
    finally:
        server.kill()
        server.wait()
