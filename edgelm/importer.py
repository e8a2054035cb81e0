"""Bring your own model: a Hugging Face Llama-family folder or a GGUF file → an edgelm checkpoint directory.

    HF folder  ──config.json, tokenizer files, (sharded) safetensors of any float dtype──▶ checkpoint
    GGUF file  ──llama.* metadata → config, tokenizer.ggml.* → tokenizer.json,
                 each tensor dequantized and its q/k rows un-permuted──────────────────▶ checkpoint

Tensors stream one at a time into the new model.safetensors (float32), so an import holds one tensor in
memory beside the output file, never the whole model twice.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgelm.checkpoint import WEIGHTS, iter_weights, tensor_shapes, weight_shapes
from edgelm.config import ModelConfig
from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling, write_json_atomic
from edgelm.gguf_reader import read_gguf
from edgelm.runtimes.base import artifact_kind
from edgelm.tokenizer import Tokenizer, tokenizer_from_gguf

# tokenizer and generation files of a Hugging Face folder, copied as they are
HF_TEXT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def import_model(source: Path, out: Path) -> Path:
    """Import a Hugging Face folder or a GGUF file into the checkpoint directory `out`; return `out`."""
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgelmError(f"{out} exists and is not empty; choose a new folder for the checkpoint")
    kind = artifact_kind(source)
    if kind == "onnx":
        raise EdgelmError(
            f"{source}: an ONNX folder cannot be imported; give a Hugging Face folder or a GGUF file"
        )
    building = temporary_sibling(out)  # renamed to `out` only when the checkpoint is complete
    shutil.rmtree(building, ignore_errors=True)
    try:
        (import_gguf if kind == "gguf" else import_hf)(source, building)
        if out.exists():
            out.rmdir()  # empty, as checked above
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def import_hf(source: Path, out: Path) -> None:
    """Copy a Hugging Face Llama-family folder as an edgelm checkpoint, its weights widened to float32."""
    config = ModelConfig.load(source)
    generation = source / "generation_config.json"
    if generation.is_file() and read_json(generation).get("eos_token_id") is not None:
        eos = read_json(generation)["eos_token_id"]  # may list several ids, e.g. Llama 3's end of turn
        config = ModelConfig.from_hf_dict({**config.to_hf_dict(), "eos_token_id": eos}, str(generation))
    Tokenizer.load(source)  # refuse a tokenizer edgelm cannot run before writing anything
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()  # a tied head some writers store twice
    shapes = {name: shape for name, shape in weight_shapes(source).items() if name not in skip}
    tensors = ((name, w) for name, w in iter_weights(source) if name not in skip)
    _write_checkpoint(out, config, shapes, tensors, source)
    for name in HF_TEXT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    config.save(out)


def import_gguf(source: Path, out: Path) -> None:
    """A GGUF file of architecture llama → checkpoint: tensors dequantized to HF layout, tokenizer rebuilt."""
    from edgelm.export.gguf import hf_name, unpermute_from_gguf

    gguf = read_gguf(source)
    if "rope_freqs.weight" in gguf.tensors:
        raise EdgelmError(
            f"{source}: per-frequency RoPE factors (rope_freqs, e.g. Llama 3.1+) cannot be imported "
            "from GGUF yet; import the model's Hugging Face folder instead"
        )
    config = ModelConfig.from_gguf(gguf.metadata, gguf.tensors, str(source))
    tokenizer = tokenizer_from_gguf(gguf.metadata, str(source))
    names = {hf_name(name): name for name in gguf.tensors}
    shapes = {name: tuple(reversed(gguf.tensors[stored].shape)) for name, stored in names.items()}

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name, stored in names.items():
            w = gguf.tensor_array(stored)
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                w = unpermute_from_gguf(w, config.num_attention_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                w = unpermute_from_gguf(w, config.num_key_value_heads)
            yield name, w

    _write_checkpoint(out, config, shapes, tensors(), source)
    tokenizer.save(out, context_length=config.max_position_embeddings)
    config.save(out)
    write_json_atomic(
        out / "generation_config.json",
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": list(config.eos_token_ids)
            if len(config.eos_token_ids) > 1
            else config.eos_token_ids[0],
        },
    )


def _write_checkpoint(
    out: Path,
    config: ModelConfig,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, np.ndarray]],
    source: Path,
) -> None:
    """Stream float32 tensors, in the order `shapes` lists them, into out/model.safetensors (written to a
    temporary name, then renamed)."""
    expected = tensor_shapes(config)
    problems = [f"missing {n}" for n in expected if n not in shapes]
    problems += [f"unexpected {n}" for n in shapes if n not in expected]
    problems += [
        f"{n} has shape {s}, the config implies {expected[n]}"
        for n, s in shapes.items()
        if n in expected and tuple(s) != expected[n]
    ]
    if problems:
        raise EdgelmError(f"{source}: the weights do not match the config: {'; '.join(problems[:3])}")
    header: dict[str, object] = {"__metadata__": {"format": "pt", "source": source.name}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for (name, w), expected_name in zip(tensors, shapes, strict=True):
                assert name == expected_name, (name, expected_name)  # the caller yields in `shapes` order
                f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
