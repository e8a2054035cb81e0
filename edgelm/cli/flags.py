"""Flags that several subcommands share, each written once: the model argument, --runtime and --device,
the sampling flags (their defaults are `SamplingParams`'), and the evaluation flags of compare and check."""

from __future__ import annotations

import argparse
from typing import Any

from edgelm.generation.generate import MAX_NEW_TOKENS
from edgelm.generation.sampling import SamplingParams

MODEL_HELP = "checkpoint directory, ONNX folder or .gguf file"
RUNTIME_HELP = "auto (torch for checkpoints, onnxruntime for ONNX folders, llamacpp for GGUF), or a plugin"
DEVICE_HELP = "auto, cpu, cuda, cuda:N, mps (torch), coreml or dml (onnxruntime), metal (llama.cpp)"


def add_runtime_and_device(parser: argparse.ArgumentParser) -> None:
    """--runtime, --device, --context and --threads, as generate and serve take them."""
    parser.add_argument("--runtime", default="auto", help=RUNTIME_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens of context (default: 4096 for llama.cpp and ONNX Runtime, which reserve their KV cache "
        "up front, at most the model's; torch: the model's)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: llama.cpp runs on the cores other processes leave free, measured as it "
        "runs; ONNX Runtime and torch take their own default)",
    )


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime options the flags of `add_runtime_and_device` ask for (none when left at the default)."""
    given = {"context": args.context, "threads": args.threads}
    return {k: v for k, v in given.items() if v is not None}


def add_sampling(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed and --stop."""
    defaults = SamplingParams()
    parser.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="at most this many new tokens"
    )
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="sample among the k likeliest (0 = all)"
    )
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    parser.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")


def add_evaluation(parser: argparse.ArgumentParser) -> None:
    """The flags `compare` and `check` share: the text, the windows, the repetitions, where it runs."""
    parser.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="UTF-8 evaluation text (default: the held-out split of the built-in corpus)",
    )
    parser.add_argument(
        "--ctx", type=int, default=None, help="window length in tokens (default: the context)"
    )
    parser.add_argument(
        "--windows", type=int, default=None, help="evaluation windows (default: about 4096 tokens' worth)"
    )
    parser.add_argument(
        "--repetitions", type=int, default=5, help="latency runs, mean ± std (default: 5; 0: accuracy only)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps, metal")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every runtime (default: compare gives every runtime os.cpu_count(); "
        "check leaves each runtime its own default)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="folder for the reference's cached log-probs (default: REFERENCE/.edgelm-cache)",
    )
