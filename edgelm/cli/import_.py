"""`edgelm import`: a Hugging Face folder or a GGUF file into an edgelm checkpoint. (`import` is a keyword,
hence the underscore.)"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `import` subcommand and its flags."""
    importer = commands.add_parser(
        "import",
        help="import a Hugging Face folder or a GGUF file",
        description="Convert a model into an edgelm checkpoint that every command accepts: a "
        "Hugging Face folder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM; safetensors, "
        "sharded or not, in float32, float16 or bfloat16, each tensor kept in its dtype) or a GGUF "
        "file of architecture llama, qwen2, qwen3, gemma2, gemma3 or phi3 (any tensor type gguf-py "
        "dequantizes, to float32 unless it is F16 or BF16; its tokenizer is rebuilt from the GGUF "
        "metadata). Weights over 5 GB are written in shards.",
    )
    importer.add_argument("source", help="Hugging Face model folder or .gguf file")
    importer.add_argument("--out", required=True, help="new checkpoint folder")
    importer.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Import the model and say where it went."""
    from edgelm.importer import import_model

    out = import_model(Path(args.source), Path(args.out), show_progress=True)
    print(f"imported {args.source} into {out}")
