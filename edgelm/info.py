"""What `edgelm info` reports about a checkpoint: shape, parameters, context, and the size of each export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.checkpoint import WEIGHTS, tensor_shapes
from edgelm.config import ModelConfig

# bytes per weight of a 2-D matrix in each export type: a block of 32 weights carries one fp16 scale
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": (32 + 2) / 32, "int4": (16 + 2) / 32}


def export_sizes(config: ModelConfig) -> dict[str, int]:
    """Estimated file size of each export type: matrices at its precision (block 32), norms in float32."""
    sizes = {}
    for kind, per_weight in BYTES_PER_WEIGHT.items():
        total = 0.0
        for shape in tensor_shapes(config).values():
            count = shape[0] * (shape[1] if len(shape) > 1 else 1)
            total += count * (per_weight if len(shape) == 2 else 4)
        sizes[kind] = int(total)
    return sizes


def describe_checkpoint(directory: Path) -> dict[str, Any]:
    """A summary of a checkpoint directory, read from config.json without loading the weights."""
    config = ModelConfig.load(directory)
    weights = Path(directory) / WEIGHTS
    return {
        "path": str(directory),
        "format": "checkpoint (Hugging Face layout)",
        "architecture": config.architecture,
        "parameters": config.num_parameters,
        "context_length": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value, "
        f"head_dim {config.head_dim}",
        "tied_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "file_size": weights.stat().st_size if weights.is_file() else None,
        "export_sizes": export_sizes(config),
    }


def human_size(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units, as file managers show)."""
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
