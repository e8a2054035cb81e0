"""What `edgelm info` reports about a checkpoint: shape, parameters, context, and the size of each export;
with --load, what loading it costs an app: time, resident memory, and time to first token."""

from __future__ import annotations

import os
import time
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


def describe_onnx(folder: Path) -> dict[str, Any]:
    """A summary of an ONNX folder: its model's shape, how it was exported (edgelm.json, if edgelm made it),
    the operators of its graph and its size on disk. Reads model.onnx without its weights."""
    from collections import Counter

    from edgelm.files import read_json

    try:
        import onnx
    except ModuleNotFoundError as e:
        from edgelm.errors import missing_dependency

        raise missing_dependency("onnx", "onnx") from e
    folder = Path(folder)
    config = ModelConfig.load(folder)
    provenance = read_json(folder / "edgelm.json") if (folder / "edgelm.json").is_file() else {}
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    quantization = provenance.get("quantization", {})
    return {
        "path": str(folder),
        "format": f"ONNX {provenance.get('quant', '(not made by edgelm)')}",
        "architecture": config.architecture,
        "parameters": config.num_parameters,
        "context_length": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
        "quantization": ", ".join(
            f"{k} {len(v)} matrices" if isinstance(v, list) else f"{k} {v}"
            for k, v in quantization.items()
            if v is not None
        )
        or "none",
        "operators": ", ".join(f"{op} ×{n}" for op, n in ops.most_common(8)),
        "source": provenance.get("source", {}).get("sha256", "unknown")[:16],
        "file_size": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
    }


def human_size(n: float | None) -> str:
    """1234567 → '1.2 MB' (decimal units, as file managers show); None (unknown) → '—'."""
    if n is None:
        return "—"
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


FIRST_TOKEN_PROMPT = "Hello, world"


def measure_load(path: Path, runtime: str = "auto", device: str = "auto") -> dict[str, Any]:
    """Load the artifact at `path` as an app would and measure, in this process: the time to import the
    runtime's engine and to load the model, the resident memory each adds (bytes; None where it cannot be
    read), and the time to first token (prefill of a short prompt and one sampled token, the first call)."""
    from edgelm.api import load
    from edgelm.runtimes.base import DEFAULT_RUNTIME, artifact_kind, runtime_class

    name = DEFAULT_RUNTIME.get(artifact_kind(path)) if runtime == "auto" else runtime
    memory = [resident_memory()]
    start = time.perf_counter()
    if name is not None:
        runtime_class(name)  # imports the engine (torch, llama_cpp, ...)
    imported = time.perf_counter()
    memory.append(resident_memory())
    with load(path, runtime=runtime, device=device) as model:
        loaded = time.perf_counter()
        memory.append(resident_memory())
        with model.stream(FIRST_TOKEN_PROMPT, max_new_tokens=1, temperature=0) as stream:
            asked = time.perf_counter()
            "".join(stream)
            answered = time.perf_counter()
        return {
            "runtime": model.runtime.name,
            "device": model.runtime.device,
            "import_seconds": imported - start,
            "load_seconds": loaded - imported,
            "import_memory": _difference(memory[1], memory[0]),
            "load_memory": _difference(memory[2], memory[1]),
            "first_token_seconds": answered - asked,
            "first_token_prompt_tokens": stream.prompt_tokens,
        }


def load_rows(load: dict[str, Any]) -> list[tuple[str, str]]:
    """`measure_load`'s numbers as (label, text) rows for a table."""

    def memory(n: int | None) -> str:
        if n is None:
            return "resident memory unknown (pip install psutil)"
        return f"{'+' if n >= 0 else '-'}{human_size(abs(n))} resident"

    return [
        ("load runtime", f"{load['runtime']} on {load['device']}"),
        ("engine import", f"{load['import_seconds']:.2f} s, {memory(load['import_memory'])}"),
        ("model load", f"{load['load_seconds']:.2f} s, {memory(load['load_memory'])}"),
        (
            "time to first token",
            f"{load['first_token_seconds'] * 1000:.1f} ms ({load['first_token_prompt_tokens']}-token prompt)",
        ),
    ]


def resident_memory() -> int | None:
    """This process's resident set size in bytes: psutil where installed, else /proc/self/statm (Linux),
    else None."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None
    return int(psutil.Process().memory_info().rss)


def _difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before
