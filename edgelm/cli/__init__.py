"""The `edgelm` command. Each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edgelm.cli import chat, check, compare, export, generate, import_, info, serve, train
from edgelm.errors import EdgelmError

# each subcommand's module, in the order `edgelm --help` lists them
SUBCOMMANDS = (train, generate, chat, import_, export, info, serve, compare, check)

DESCRIPTION = """\
edgelm: train a small Llama-style model or bring one, export it to ONNX or GGUF, and run it.

  edgelm train --out runs/tiny                       train the tiny preset on the built-in corpus
  edgelm generate runs/tiny --prompt "def "          continue a prompt
  edgelm chat ck/smollm2-instruct                    chat in the terminal (the model's chat template)
  edgelm info runs/tiny                              parameters, context and export sizes
  edgelm export gguf runs/tiny --quant q4_k_m        a GGUF file for llama.cpp
  edgelm export onnx runs/tiny --quant int4          an ONNX folder for ONNX Runtime
  edgelm generate runs/tiny-Q4_K_M.gguf --prompt "x"  run it in llama.cpp
  edgelm import ~/models/SmolLM2-135M --out ck/sm    bring a Hugging Face folder or a GGUF file
  edgelm compare runs/tiny --out runs/tiny-report    export to every format, check each: report.md
  edgelm check runs/tiny-Q4_0.gguf --reference runs/tiny --max-kld 0.05
                                                     one artifact against it; exit 1 when a gate fails
  edgelm serve runs/tiny --port 8080                 an OpenAI-compatible server on 127.0.0.1
"""


def build_parser() -> argparse.ArgumentParser:
    """The `edgelm` argument parser with every subcommand (each module adds its own)."""
    parser = argparse.ArgumentParser(
        prog="edgelm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edgelm {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands)
    return parser


def _version() -> str:
    from edgelm._version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; an EdgelmError becomes one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EdgelmError as e:
        print(f"edgelm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a disk that is full, a folder that is not writable, ...
        print(f"edgelm: error: {e.filename or ''}: {e.strerror or e}".replace(": : ", ": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgelm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
