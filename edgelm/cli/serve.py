"""`edgelm serve`: one model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgelm.cli.flags import MODEL_HELP, add_runtime_and_device, runtime_options


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `serve` subcommand and its flags."""
    server = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve one model with OpenAI's HTTP API: POST /v1/completions and "
        '/v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models. '
        "Requests queue and run one at a time per slot (--slots); a client that disconnects cancels its "
        "generation. Only "
        "this machine can connect unless --host says otherwise. Needs: pip install 'edgelm[serve]'.",
    )
    server.add_argument("model", help=MODEL_HELP)
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, the network too)"
    )
    server.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    server.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000; * for any) call the server, with CORS "
        "headers (repeatable; default: none, as requests from browsers are refused)",
    )
    server.add_argument(
        "--slots",
        type=int,
        default=1,
        help="conversations kept at once, each with its own KV cache and run concurrently: the model is "
        "loaded once per slot (llama.cpp's memory-mapped weights are shared; each slot's memory is printed "
        "at start); a request goes to the slot holding the longest prefix of its prompt",
    )
    server.add_argument("--docs", action="store_true", help="serve FastAPI's /docs pages")
    add_runtime_and_device(server)
    server.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Serve the model until interrupted."""
    from edgelm.serve import serve

    where = {"host": args.host, "port": args.port, "runtime": args.runtime, "device": args.device}
    guard = {"origins": args.allow_origin, "docs": args.docs}
    serve(Path(args.model), **where, **guard, slots=args.slots, **runtime_options(args))
