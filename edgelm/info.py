"""What `edgelm info` reports about a checkpoint: shape, parameters, context, and the size of each export;
with --load, what loading it costs an app: time, resident memory, and time to first token."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from edgelm.checkpoint import WEIGHTS, checked_entries, tensor_shapes
from edgelm.evaluation.memory import resident_memory
from edgelm.files import human_size
from edgelm.formats.gguf_reader import GGUFFile, ggml_type_name
from edgelm.formats.onnx import check_genai_config, read_onnx_folder, read_provenance
from edgelm.importer import read_gguf_model
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import Tokenizer

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
    """A summary of a checkpoint directory, from config.json, once the weights' headers are checked
    against it and the tokenizer loads (the weights themselves are not read)."""
    config, _ = checked_entries(directory)
    Tokenizer.load(directory)
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
    the operators of its graph and its size on disk. Reads model.onnx without its weights, once the
    folder is checked (`read_onnx_folder`, `check_genai_config`) and its tokenizer loads."""
    from collections import Counter

    folder = Path(folder)
    config, model = read_onnx_folder(folder)
    check_genai_config(folder, config, model)
    Tokenizer.load(folder)
    provenance = read_provenance(folder)
    graph = model.graph
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
        "source": str(provenance.get("source", {}).get("sha256") or "unknown")[:16],
        "file_size": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
    }


FIRST_TOKEN_PROMPT = "Hello, world"


def measure_load(path: Path, runtime: str = "auto", device: str = "auto") -> dict[str, Any]:
    """Load the artifact at `path` as an app would and measure, in this process: the time to import the
    runtime's engine and to load the model, the resident memory each adds (bytes; None where it cannot be
    read), and the time to first token (prefill of a short prompt and one sampled token, the first call)."""
    from edgelm.generation.api import load
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


def _difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """A summary of a GGUF file, read from its header without touching the tensor data, once its
    hyperparameters, tokenizer and tensor shapes are checked as a model (`read_gguf_model`)."""
    return gguf_summary(read_gguf_model(Path(path))[0])


def gguf_summary(gguf: GGUFFile) -> dict[str, Any]:
    """What a GGUF file's header says: format, architecture, hyperparameters, tensor types, tokenizer."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")

    def of_arch(suffix: str) -> Any:
        return meta.get(f"{arch}.{suffix}") if isinstance(arch, str) else None

    types: dict[str, int] = {}
    for tensor in gguf.tensors.values():
        name = ggml_type_name(tensor.type)
        types[name] = types.get(name, 0) + 1
    tokens = meta.get("tokenizer.ggml.tokens")
    template = meta.get("tokenizer.chat_template")
    return {
        "path": str(gguf.path),
        "format": f"gguf v{gguf.version}",
        "architecture": arch,
        "name": meta.get("general.name"),
        "parameters": sum(math.prod(t.shape) for t in gguf.tensors.values()),
        "tensors": len(gguf.tensors),
        "context_length": of_arch("context_length"),
        "layers": of_arch("block_count"),
        "embedding_length": of_arch("embedding_length"),
        "heads": of_arch("attention.head_count"),
        "kv_heads": of_arch("attention.head_count_kv"),
        "file_size": gguf.path.stat().st_size,
        "tensor_types": types,
        "file_type": meta.get("general.file_type"),
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if isinstance(tokens, list) else None,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "chat_template": isinstance(template, str) and bool(template),
    }
