"""`edgelm generate`: continue a prompt, streamed to standard output."""

from __future__ import annotations

import argparse
import sys

from edgelm.cli.flags import MODEL_HELP, add_runtime_and_device, add_sampling, runtime_options


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `generate` subcommand and its flags."""
    generate = commands.add_parser(
        "generate",
        help="continue a prompt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate text from a checkpoint directory (PyTorch), an ONNX folder (ONNX Runtime) or "
        "a GGUF file (llama.cpp), streamed to standard output.",
    )
    generate.add_argument("model", help=MODEL_HELP)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    add_sampling(generate)
    add_runtime_and_device(generate)
    generate.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Write the prompt, then each generated piece as it comes, then a newline."""
    from edgelm.generation.api import load

    with load(args.model, runtime=args.runtime, device=args.device, **runtime_options(args)) as model:
        pieces = model.stream(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
