"""`edgelm info`: describe a checkpoint, ONNX folder or GGUF file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgelm.cli.flags import MODEL_HELP


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `info` subcommand and its flags."""
    info = commands.add_parser(
        "info",
        help="describe a model",
        description="Architecture, parameter count, context length and the size each export type (fp32, "
        "fp16, int8, int4) would take; for an ONNX folder, its export, operators and size; for a GGUF file, "
        "its tensor types, size and tokenizer.",
    )
    info.add_argument("model", help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument(
        "--load",
        action="store_true",
        help="also load the model as an app would: time to import the runtime's engine and to load, the "
        "resident memory each adds, and the time to first token for a short prompt",
    )
    info.add_argument("--runtime", default="auto", help="with --load: the runtime (auto: the usual one)")
    info.add_argument("--device", default="auto", help="with --load: auto, cpu, cuda, cuda:N, mps, metal")
    info.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Print the artifact's summary as a table or JSON, with --load's measurements."""
    from edgelm.files import human_size
    from edgelm.formats.artifact import artifact_kind
    from edgelm.info import describe_checkpoint, describe_gguf, describe_onnx, load_rows

    describe = {"checkpoint": describe_checkpoint, "gguf": describe_gguf, "onnx": describe_onnx}
    summary = describe[artifact_kind(Path(args.model))](Path(args.model))
    if args.load:
        from edgelm.info import measure_load

        summary["load"] = measure_load(Path(args.model), args.runtime, args.device)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=summary["path"], show_header=False)
    for key, value in summary.items():
        if key in ("path", "export_sizes", "load"):
            continue
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.2f} M)"
        elif key == "file_size" and value is not None:
            value = human_size(value)
        table.add_row(key.replace("_", " "), str(value))
    for export, size in summary.get("export_sizes", {}).items():
        table.add_row(f"{export} export", f"≈ {human_size(size)}")
    if "load" in summary:
        for key, value in load_rows(summary["load"]):
            table.add_row(key, value)
    Console().print(table)
