"""What `edgelm serve` lets in, as local LLM servers are attacked from browsers: a web page can make a
browser send requests to 127.0.0.1 (simple cross-site POSTs, DNS rebinding). The server answers only
requests whose Host names it, from Origins it was told to allow (with CORS headers for those), carrying JSON
bodies of a bounded size."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY = "*"  # in `hosts` or `origins`: every one
BODY_BYTES_BASE = 1 << 20  # a request body may hold this much, plus BODY_BYTES_PER_TOKEN per context token
BODY_BYTES_PER_TOKEN = 16  # more than any tokenizer's longest piece in practice: a prompt past it is too long

Answer = Callable[[int, str], Response]  # (status, message) → the error response


@dataclass(frozen=True)
class Guard:
    """The Host names served (loopback names, or ANY where the server listens on the network), the Origins
    allowed (none unless asked: tools that are not browsers send no Origin), and the body limit."""

    hosts: Collection[str] = LOOPBACK_NAMES
    origins: Collection[str] = ()
    max_body_bytes: int = BODY_BYTES_BASE

    def refusal(self, request: Request) -> tuple[int, str] | None:
        """Why the request is refused (its status and message), or None."""
        host = host_name(request.headers.get("host", "")).lower()
        if ANY not in self.hosts and host not in self.hosts:
            return 403, (
                f"Host {host!r} is not served here (the server answers {', '.join(sorted(self.hosts))}); "
                "a web page that renamed itself to this address is refused"
            )
        origin = request.headers.get("origin")
        if origin is not None and not self.allows(origin):
            return 403, f"Origin {origin!r} is not allowed; start the server with --allow-origin {origin}"
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and media != "application/json":
            return 415, f"the body must be sent as Content-Type: application/json, not {media or 'none'!r}"
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413, f"the body is {declared} bytes, more than the {self.max_body_bytes} this server takes"
        return None

    def allows(self, origin: str) -> bool:
        """Whether a browser page from `origin` may call the server."""
        return ANY in self.origins or origin in self.origins


def host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8080" → "::1", "localhost:80" → "localhost"."""
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cors_headers(origin: str) -> dict[str, str]:
    """The CORS headers of an answer to an allowed Origin (preflights included)."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization",
        "Vary": "Origin",
    }


async def guarded(
    guard: Guard, request: Request, call_next: Callable[[Request], Awaitable[Response]], answer: Answer
) -> Response:
    """The middleware: a refused request gets `answer`'s error; an allowed Origin's preflight is answered
    here, its other requests get the CORS headers."""
    if (refused := guard.refusal(request)) is not None:
        return answer(*refused)
    origin = request.headers.get("origin")
    if request.method == "OPTIONS" and origin is not None:  # an allowed page's preflight
        return Response(status_code=204, headers=cors_headers(origin))
    response = await call_next(request)
    if origin is not None:
        response.headers.update(cors_headers(origin))
    return response
