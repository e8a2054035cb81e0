"""What a request to the OpenAI-compatible server asks for, checked: the fields each endpoint takes (a
field edgelm does not support is refused by name), the sampling, logprobs and response-format fields as
`Model.stream`'s arguments, and chat messages with text content. Refusals are `RequestError`s, which the
server answers in OpenAI's error shape."""

from __future__ import annotations

import json
from typing import Any

from edgelm.generation.logprobs import MAX_TOP_LOGPROBS
from edgelm.generation.sampling import SamplingParams
from edgelm.values import is_int, is_number

# the fields each endpoint takes (`user`, `metadata`, `store` and `stream_options` are taken and have no
# effect here: a stream's last chunk always carries `usage`)
_COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k"}
_COMMON_FIELDS |= {"seed", "stop", "n", "logprobs", "response_format", "user", "metadata", "store"}
COMPLETION_FIELDS = frozenset({*_COMMON_FIELDS, "prompt"})
CHAT_FIELDS = frozenset({*_COMMON_FIELDS, "messages", "max_completion_tokens", "top_logprobs"})
# OpenAI's fields edgelm does not support, and the values that mean they are off
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "prediction": (None,),
}
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def request_options(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The generation fields of a request (to /v1/chat/completions where `chat`, else /v1/completions) as
    Model.stream's arguments; null is the same as absent."""
    if not isinstance(body.get("stream", False), (bool, type(None))):
        raise RequestError("'stream' must be true or false", "stream")
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise RequestError("only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 0):
        raise RequestError(f"'{key}' must be an integer >= 0", key)
    temperature = _number(body, "temperature", SamplingParams.temperature)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(f"'temperature' must be between 0 and {MAX_TEMPERATURE}", "temperature")
    top_p = _number(body, "top_p", SamplingParams.top_p)
    if not 0 < top_p <= 1:
        raise RequestError("'top_p' must be in (0, 1]", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise RequestError("'top_k' must be an integer >= 0 (0 = no limit)", "top_k")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise RequestError("'seed' must be an integer >= 0", "seed")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    return {
        "logprobs": _logprobs(body, chat),
        "json_schema": _json_schema(body.get("response_format")),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": SamplingParams.top_k if top_k is None else top_k,
        "top_p": top_p,
        "seed": seed,
        "stop": stop or (),
    }


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """The alternatives a request asks for at each token, or None for no logprobs: chat's `logprobs`
    (true/false) with `top_logprobs`, or completions' `logprobs` (a count; 0: the chosen tokens' only)."""
    if chat:
        logprobs, top = body.get("logprobs"), body.get("top_logprobs")
        if not isinstance(logprobs, (bool, type(None))):
            raise RequestError("'logprobs' must be true or false", "logprobs")
        if top is not None and not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if not logprobs:
            return None
        key, count = "top_logprobs", top or 0
    else:
        key, count = "logprobs", body.get("logprobs")
        if count is None:
            return None
    if not is_int(count) or not 0 <= count <= MAX_TOP_LOGPROBS:
        raise RequestError(f"'{key}' must be an integer in [0, {MAX_TOP_LOGPROBS}]", key)
    return int(count)


def _json_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the text to follow: None for {"type": "text"}, any object
    for {"type": "json_object"}, and json_schema.schema for {"type": "json_schema", ...}."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        return spec["schema"]
    raise RequestError(
        """'response_format' must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", """
        """"json_schema": {"name": ..., "schema": {...}}}""",
        "response_format",
    )


def check_fields(body: dict[str, Any], supported: frozenset[str]) -> None:
    """Refuse, by name, a field this endpoint does not support; OpenAI's fields edgelm leaves out pass at
    the value that switches them off (OFF_VALUES), which some clients send always."""
    for key, value in body.items():
        if key in supported or (key in OFF_VALUES and value in OFF_VALUES[key]):
            continue
        raise RequestError(f"edgelm does not support '{key}' (at {json.dumps(value)[:60]})", key)


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages with text content; content given as OpenAI's list of text parts is joined."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content) or not all(
                isinstance(p.get("text"), str) for p in content
            ):
                raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
        checked.append({**message, "content": content})
    return checked


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not is_number(value):
        raise RequestError(f"'{key}' must be a number", key)
    return float(value)
