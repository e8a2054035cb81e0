"""`edgelm serve`: a model behind an OpenAI-compatible HTTP API, on FastAPI and uvicorn.

    POST /v1/completions        {"prompt": "...", "max_tokens": 16, "stream": false, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models

Generations run in worker threads, one per slot (`serve_slots`: models of the same artifact, each keeping
one conversation's cache; one by default), so the event loop never blocks; a slot runs one generation at
a time (its model's lock) and requests for a busy one queue. Pieces reach a streaming response through an
asyncio queue. A client that disconnects cancels its own generation, whether it is
running or still waiting for its turn (`TextStream.cancel`). Bad requests get a 4xx in OpenAI's error
shape, {"error": {"message", "type", "param", "code"}}; so does a field edgelm does not support (at a value
other than the one that means "off"), named, never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError, missing_dependency
from edgelm.evaluation.memory import proportional_memory
from edgelm.generation.api import Model, load
from edgelm.generation.generate import TextStream
from edgelm.generation.logprobs import TokenLogprob
from edgelm.values import is_int

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from edgelm.serve_guard import (
        ANY,
        BODY_BYTES_BASE,
        BODY_BYTES_PER_TOKEN,
        LOOPBACK_NAMES,
        Guard,
        guarded,
    )
    from edgelm.serve_requests import (
        CHAT_FIELDS,
        COMPLETION_FIELDS,
        RequestError,
        chat_messages,
        check_fields,
        request_options,
    )
    from edgelm.serve_slots import Slots
except ModuleNotFoundError as e:
    raise missing_dependency(e.name or "fastapi", "serve") from None

log = logging.getLogger("edgelm.serve")

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
_END = object()  # the worker's last item: the generation is over


def create_app(
    model: Model | Sequence[Model],
    model_name: str = "edgelm",
    hosts: Collection[str] = LOOPBACK_NAMES,
    origins: Collection[str] = (),
    docs: bool = False,
) -> FastAPI:
    """The OpenAI-compatible application serving `model` (or several models of one artifact, its slots)
    under the id `model_name` (see the module doc).

    Sampling defaults are `SamplingParams`' (llama.cpp's); `top_k` is an extension. `max_tokens` defaults
    to 16 for completions and to the rest of the context for chat. Generations run in worker threads, one
    per slot, shut down with the application. Requests pass `serve_guard.Guard` first: Host one of
    `hosts`, Origin (if any) one of `origins`, JSON bodies within a size that the context bounds. `docs`
    serves FastAPI's /docs pages.
    """
    slots = Slots([model] if isinstance(model, Model) else model)
    context = slots.first.config.max_position_embeddings
    guard = Guard(hosts, origins, BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * context)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        slots.shutdown()

    app = FastAPI(
        title="edgelm",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )

    def refused(status: int, message: str) -> Response:
        return _error(status, message, "invalid_request_error")

    @app.middleware("http")
    async def checked(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        return await guarded(guard, request, call_next, refused)

    app.state.guard = guard
    _add_error_handlers(app)
    _add_model_list(app, slots.first, model_name)
    _add_completions(app, slots, model_name)
    _add_chat_completions(app, slots, model_name)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error shape: 400s for bad requests, 500 for edgelm's own faults."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> Response:
        return _error(error.status, error.message, "invalid_request_error", error.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return _error(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error: {error}", "server_error")


def _add_model_list(app: FastAPI, model: Model, model_name: str) -> None:
    """GET /v1/models: the one model, with its context length."""
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        context = model.config.max_position_embeddings
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "edgelm"}
        return {"object": "list", "data": [{**entry, "context_length": context}]}


def _add_completions(app: FastAPI, slots: Slots, model_name: str) -> None:
    """POST /v1/completions: a text prompt continued, as JSON or server-sent events."""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json_body(request)
        check_fields(body, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        # tokenizing a long prompt takes a while: in a thread, so that other requests are answered meanwhile
        generation = await asyncio.to_thread(
            _open,
            slots,
            body,
            COMPLETION_MAX_TOKENS,
            lambda model: model.tokenize(prompt, add_bos=True),
            lambda model, **kw: model.stream(prompt, **kw),
        )
        head = _head(rid, "text_completion", body, model_name)
        if body.get("stream"):
            return _sse(_completion_events(head, generation, rid))
        text = await _complete(generation, rid, request)
        stream = generation.stream
        logprobs = _completion_logprobs(generation.model, stream.logprobs)
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": stream.finish_reason}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(stream)})


def _add_chat_completions(app: FastAPI, slots: Slots, model_name: str) -> None:
    """POST /v1/chat/completions: the messages rendered with the chat template and answered."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request)
        check_fields(body, CHAT_FIELDS)
        messages = chat_messages(body.get("messages"))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        generation = await asyncio.to_thread(
            _open,
            slots,
            body,
            slots.first.config.max_position_embeddings,
            lambda model: model.chat_ids(messages),
            lambda model, **kw: model.chat_stream(messages, **kw),
        )
        if body.get("stream"):
            head = _head(rid, "chat.completion.chunk", body, model_name)
            return _sse(_chat_events(head, generation, rid))
        head = _head(rid, "chat.completion", body, model_name)
        text = await _complete(generation, rid, request)
        stream = generation.stream
        message = {"role": "assistant", "content": text}
        logprobs = _chat_logprobs(generation.model, stream.logprobs)
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": stream.finish_reason}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(stream)})


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    runtime: str = "auto",
    device: str = "auto",
    log_level: str = "info",
    origins: Collection[str] = (),
    docs: bool = False,
    slots: int = 1,
    **options: Any,
) -> None:
    """Load the artifact at `path` (with the runtime's `options`, e.g. `context`), once per slot, and serve
    it on http://host:port/v1 until interrupted (Ctrl-C).

    Only this machine can connect unless `host` says otherwise (0.0.0.0: every interface, when any Host
    name is answered); browser pages only from `origins` ("*": any); `docs` serves /docs.
    """
    try:
        import uvicorn
    except ModuleNotFoundError as e:
        raise missing_dependency(e.name or "uvicorn", "serve") from None
    if not is_int(slots) or slots < 1:
        raise EdgelmError(f"slots={slots!r} must be a positive number of conversations")
    sock = listen(host, port)  # before loading, so that a taken port fails fast
    with sock, ExitStack() as models:
        loaded = [models.enter_context(model) for model in _load_slots(path, slots, runtime, device, options)]
        hosts = (ANY,) if host in ("0.0.0.0", "::") else (*LOOPBACK_NAMES, host)
        app = create_app(loaded, Path(path).name, hosts, origins, docs)
        runtime_used = loaded[0].runtime
        print(
            f"edgelm: serving {path} ({runtime_used.name} on {runtime_used.device}) "
            f"at http://{host}:{sock.getsockname()[1]}/v1",
            file=sys.stderr,
        )
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


def _load_slots(
    path: str | Path, slots: int, runtime: str, device: str, options: dict[str, Any]
) -> Iterator[Model]:
    """The artifact loaded once per slot, each load's memory said (this process's PSS before and after:
    pages a second load maps again, such as llama.cpp's memory-mapped weights, count once)."""
    for slot in range(slots):
        before = proportional_memory()
        model = load(path, runtime=runtime, device=device, **options)
        after = proportional_memory()
        if slots > 1 and before is not None and after is not None:
            print(f"edgelm: slot {slot + 1} of {slots}: {(after - before) / 2**20:.0f} MiB", file=sys.stderr)
        yield model


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: any free port), or a clear error. It listens from here
    on, so that a client that connects before the server has started waits instead of being refused."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise EdgelmError(f"port {port!r} must be an integer in [0, 65535]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise EdgelmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


# ---- requests --------------------------------------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to the guard's limit (a body without a Content-Length too)."""
    limit = request.app.state.guard.max_body_bytes
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestError(f"the body is more than the {limit} bytes this server takes", status=413)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body nests too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


@dataclass
class _Generation:
    """A request's stream, the model (slot) it runs on, that slot's worker thread, and the call that says
    the request has ended."""

    stream: TextStream
    model: Model
    worker: ThreadPoolExecutor
    ended: Callable[[], None]


def _open(
    slots: Slots,
    body: dict[str, Any],
    default_max_tokens: int,
    prompt_ids: Callable[[Model], list[int]],
    start: Callable[..., TextStream],
) -> _Generation:
    """Check the request's generation fields, choose its slot (by `prompt_ids`, where there are several)
    and make its (not yet started) stream there with `start(model, **options)`."""
    options = request_options(body, chat="messages" in body)  # check_fields let messages in chat only
    requested = options.pop("max_tokens")
    try:
        slot, ended = slots.choose(prompt_ids(slots.first) if len(slots) > 1 else ())
    except EdgelmError as e:
        raise RequestError(str(e)) from None
    try:
        stream = start(
            slot.model, max_new_tokens=default_max_tokens if requested is None else requested, **options
        )
    except EdgelmError as e:
        ended()
        raise RequestError(str(e)) from None
    context = slot.model.config.max_position_embeddings
    if requested is not None and stream.prompt_tokens + requested > context:
        stream.close()
        ended()
        raise RequestError(
            f"max_tokens={requested} and the prompt's {stream.prompt_tokens} tokens exceed the model's "
            f"context of {context} tokens; ask for at most {max(context - stream.prompt_tokens, 0)}",
            "max_tokens",
        )
    weakref.finalize(stream, ended)  # a stream that never runs (its client left first) ends here
    return _Generation(stream, slot.model, slot.worker, ended)


# ---- generation ------------------------------------------------------------------------------------------


async def _pieces(generation: _Generation, rid: str) -> AsyncIterator[tuple[str, int]]:
    """Run the generation's stream in its slot's worker thread and hand its pieces to the event loop as
    they come, each with the number of `stream.logprobs` entries there were when it came. Leaving early
    (the client went away, the task was cancelled) cancels the generation, running or queued."""
    stream = generation.stream
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody reads this generation any more
            stream.cancel()

    def work() -> None:
        try:
            for piece in stream:
                put((piece, len(stream.logprobs or ())))
        except Exception as e:  # handed to the response, which reports it
            put(e)
        else:
            put(_END)
        finally:
            stream.close()
            generation.ended()
        log.info(
            "%s: %d prompt + %d completion tokens, finish_reason %s",
            rid,
            stream.prompt_tokens,
            stream.completion_tokens,
            stream.finish_reason,
        )

    loop.run_in_executor(generation.worker, work)
    finished = False
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                finished = True
                raise item
            yield item
        finished = True
    finally:
        if not finished:
            stream.cancel()
            log.info("%s: the client went away; generation cancelled", rid)


async def _complete(generation: _Generation, rid: str, request: Request) -> str:
    """The generation's whole text; a client that disconnects meanwhile cancels it."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.stream.cancel()
        log.info("%s: the client went away; generation cancelled", rid)

    watcher = asyncio.ensure_future(watch())
    try:
        return "".join([piece async for piece, _ in _pieces(generation, rid)])
    finally:
        watcher.cancel()


# ---- responses -------------------------------------------------------------------------------------------


def _head(rid: str, kind: str, body: dict[str, Any], model_name: str) -> dict[str, Any]:
    name = body.get("model") if isinstance(body.get("model"), str) else model_name
    return {"id": rid, "object": kind, "created": int(time.time()), "model": name}


def _usage(stream: TextStream) -> dict[str, int]:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }


async def _completion_events(
    head: dict[str, Any], generation: _Generation, rid: str
) -> AsyncIterator[dict[str, Any]]:
    stream, sent, shown = generation.stream, 0, 0
    async for piece, count in _pieces(generation, rid):
        entries = stream.logprobs and stream.logprobs[sent:count]
        logprobs = _completion_logprobs(generation.model, entries, shown)
        sent, shown = count, shown + len(piece)
        yield {**head, "choices": [{"text": piece, "index": 0, "logprobs": logprobs, "finish_reason": None}]}
    last = {"text": "", "index": 0, "logprobs": None, "finish_reason": stream.finish_reason}
    yield {**head, "choices": [last], "usage": _usage(stream)}


async def _chat_events(
    head: dict[str, Any], generation: _Generation, rid: str
) -> AsyncIterator[dict[str, Any]]:
    def chunk(
        delta: dict[str, str], finish_reason: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    stream, sent = generation.stream, 0
    yield chunk({"role": "assistant", "content": ""})
    async for piece, count in _pieces(generation, rid):
        logprobs = _chat_logprobs(generation.model, stream.logprobs and stream.logprobs[sent:count])
        sent = count
        yield chunk({"content": piece}, logprobs=logprobs)
    yield {**chunk({}, stream.finish_reason), "usage": _usage(stream)}


def _chat_logprobs(model: Model, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    if entries is None:
        return None

    def token(token_id: int, logprob: float) -> dict[str, Any]:
        data = _token_bytes(model, token_id)
        return {"token": _text(data), "logprob": logprob, "bytes": list(data)}

    content = [
        {**token(e.token, e.logprob), "top_logprobs": [token(i, lp) for i, lp in e.top]} for e in entries
    ]
    return {"content": content}


def _completion_logprobs(
    model: Model, entries: list[TokenLogprob] | None, offset: int = 0
) -> dict[str, Any] | None:
    """Completions' logprobs object: tokens, token_logprobs, top_logprobs ({token: logprob} per step) and
    text_offset (each token's offset in the completion's text; the entries begin at `offset`)."""
    if entries is None:
        return None
    texts = [_text(_token_bytes(model, e.token)) for e in entries]
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_by_text(model, e.top) for e in entries],
        "text_offset": list(accumulate((len(t) for t in texts[:-1]), initial=offset)),
    }


def _by_text(model: Model, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """{text: logprob} of a step's alternatives, most likely first; where two tokens show the same text
    (say, both U+FFFD), the more likely one's."""
    shown: dict[str, float] = {}
    for token_id, logprob in top:
        shown.setdefault(_text(_token_bytes(model, token_id)), logprob)
    return shown


def _token_bytes(model: Model, token_id: int) -> bytes:
    """A token's bytes; none for the rows a model has past its tokenizer's vocabulary (padding)."""
    pieces = model.tokenizer.token_bytes
    return pieces[token_id] if token_id < len(pieces) else b""


def _text(data: bytes) -> str:
    """A token's text (bytes that are not whole UTF-8 characters become U+FFFD, as OpenAI shows them)."""
    return data.decode("utf-8", "replace")


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per event, then `data: [DONE]`; an error midway becomes an
    error event (the status line has gone out already)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:
            log.exception("error while streaming")
            error = {"message": f"internal error: {e}", "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _error(status: int, message: str, kind: str, param: str | None = None) -> Response:
    error = {"message": message, "type": kind, "param": param, "code": None}
    return JSONResponse({"error": error}, status_code=status)
