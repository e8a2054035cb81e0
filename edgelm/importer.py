"""Bring your own model: a Hugging Face Llama-family folder or a GGUF file → an edgelm checkpoint directory.

    HF folder  ──config.json, tokenizer files, (sharded) safetensors of any float dtype──▶ checkpoint
    GGUF file  ──llama.* metadata → config, tokenizer.ggml.* → tokenizer.json,
                 each tensor dequantized and its q/k rows un-permuted──────────────────▶ checkpoint

Tensors stream one at a time into the new model.safetensors (sharded above 5 GB, as the hub ships them), so
an import holds one tensor in memory, never the whole model. A Hugging Face model keeps the dtype of each
of its tensors, bit for bit (a bf16 model stays bf16, the same size on disk); from GGUF, F16 and BF16
tensors stay so and quantized ones become float32.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgelm.checkpoint import (
    check_finite,
    check_shapes,
    model_order,
    read_entries,
    weight_entries,
    weights_dtype,
    write_generation_config,
    write_weights,
)
from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling
from edgelm.formats.artifact import artifact_kind
from edgelm.formats.gguf import (
    LONGROPE_TENSORS,
    NORM_PLUS_ONE_ARCHITECTURES,
    ROTATE_HALF_ARCHITECTURES,
    hf_name,
    unpermute_from_gguf,
)
from edgelm.formats.gguf_config import config_from_gguf, llama3_scaling, longrope_scaling
from edgelm.formats.gguf_reader import GGUFFile, ggml_type_name, read_gguf
from edgelm.formats.gguf_tokenizer import tokenizer_from_gguf
from edgelm.model.config import ModelConfig
from edgelm.progress import progress_bar
from edgelm.tokenizer import Tokenizer
from edgelm.values import is_int, is_number

# RoPE scalings a GGUF file keeps as tensors (`_with_rope_tensors`): not checkpoint tensors
ROPE_TENSORS = ("rope_freqs.weight", *LONGROPE_TENSORS)
# tokenizer and generation files of a Hugging Face folder, copied as they are
HF_TEXT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def import_model(source: Path, out: Path, show_progress: bool = False) -> Path:
    """Import a Hugging Face folder or a GGUF file into the checkpoint directory `out`; return `out`.
    `show_progress` draws a bar per tensor on a terminal."""
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
        (import_gguf if kind == "gguf" else import_hf)(source, building, show_progress)
        if out.exists():
            out.rmdir()  # empty, as checked above
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def import_hf(source: Path, out: Path, show_progress: bool = False) -> None:
    """Copy a Hugging Face Llama-family folder as an edgelm checkpoint, each weight in its own dtype."""
    config = ModelConfig.load(source)
    generation = source / "generation_config.json"
    if generation.is_file() and read_json(generation).get("eos_token_id") is not None:
        eos = read_json(generation)["eos_token_id"]  # may list several ids, e.g. Llama 3's end of turn
        config = ModelConfig.from_hf_dict({**config.to_hf_dict(), "eos_token_id": eos}, str(generation))
    Tokenizer.load(source)  # refuse a tokenizer edgelm cannot run before writing anything
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()  # a tied head some writers store twice
    entries = model_order(e for e in weight_entries(source) if e.name not in skip)
    shapes = {e.name: e.shape for e in entries}
    dtypes = {e.name: e.dtype for e in entries}  # kept: a bf16 model stays bf16, bit for bit
    with progress_bar(f"import {source.name}", len(entries), show_progress) as advance:
        tensors = _advancing(read_entries(entries), advance)
        write_weights(out, config, shapes, tensors, {"source": source.name}, dtypes)
    for name in HF_TEXT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    config.save(out, weights_dtype(shapes, dtypes))


def import_gguf(source: Path, out: Path, show_progress: bool = False) -> None:
    """A GGUF file (llama, qwen2, qwen3, gemma2, gemma3, phi3) → checkpoint: tensors dequantized to HF
    layout, tokenizer rebuilt."""
    gguf, config, tokenizer, names = read_gguf_model(source)
    arch = gguf.metadata["general.architecture"]
    shapes = {name: tuple(reversed(gguf.tensors[stored].shape)) for name, stored in names.items()}
    types = {name: ggml_type_name(gguf.tensors[stored].type) for name, stored in names.items()}
    # F16 and BF16 tensors keep their dtype (ggml and safetensors name them alike); the rest become F32
    dtypes = {name: kind if kind in ("F16", "BF16") else "F32" for name, kind in types.items()}

    # llama's q/k rows are in adjacent-pair order; rotate-half architectures store HF's own
    paired = arch not in ROTATE_HALF_ARCHITECTURES
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name, stored in names.items():
            w = gguf.tensor_array(stored)
            check_finite(w, stored, str(source))  # a safetensors source is checked as it is read
            projection = name.split(".")[-2]
            if paired and projection in heads:
                w = unpermute_from_gguf(w, heads[projection])
            elif arch in NORM_PLUS_ONE_ARCHITECTURES and name.endswith("norm.weight"):
                w = w.astype(np.float32) - np.float32(1.0)  # llama.cpp's Gemma stores 1 + w
            yield name, w

    with progress_bar(f"import {source.name}", len(names), show_progress) as advance:
        write_weights(out, config, shapes, _advancing(tensors(), advance), {"source": source.name}, dtypes)
    tokenizer.save(out, context_length=config.max_position_embeddings)
    config.save(out, weights_dtype(shapes, dtypes))
    write_generation_config(out, config)


def read_gguf_model(source: Path) -> tuple[GGUFFile, ModelConfig, Tokenizer, dict[str, str]]:
    """A GGUF file read and checked as a model, from its header and its small RoPE tensors: its config,
    its tokenizer, and each checkpoint tensor's GGUF name by HF name, their shapes checked against the
    config."""
    gguf = read_gguf(source)
    config = config_from_gguf(gguf.metadata, gguf.tensors, str(source))
    arch = gguf.metadata["general.architecture"]
    config = _with_rope_tensors(gguf, config, str(source))
    tokenizer = tokenizer_from_gguf(gguf.metadata, str(source))
    names = {hf_name(name, arch): name for name in gguf.tensors if name not in ROPE_TENSORS}
    shapes = {name: tuple(reversed(gguf.tensors[stored].shape)) for name, stored in names.items()}
    check_shapes(config, shapes, str(source))
    return gguf, config, tokenizer, names


def _with_rope_tensors(gguf: GGUFFile, config: ModelConfig, where: str) -> ModelConfig:
    """The config with the RoPE scaling a file keeps as tensors rather than metadata: Llama 3.1's
    `rope_freqs`, Phi-3's LongRoPE factors."""
    arch = gguf.metadata["general.architecture"]
    given = gguf.metadata.get(f"{arch}.rope.scaling.original_context_length")
    attention = gguf.metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0)
    if not (given is None or is_int(given)) or not is_number(attention):
        raise EdgelmError(f"{where}: rope.scaling.original_context_length or attn_factor is not a number")
    original = None if given is None else int(given)
    if "rope_freqs.weight" in gguf.tensors:
        factors = gguf.tensor_array("rope_freqs.weight")
        return dataclasses.replace(config, rope_scaling=llama3_scaling(factors, config, original, where))
    if all(name in gguf.tensors for name in LONGROPE_TENSORS):
        short, long = (gguf.tensor_array(name) for name in LONGROPE_TENSORS)
        scaling = longrope_scaling(short, long, original or config.max_position_embeddings, float(attention))
        return dataclasses.replace(config, rope_scaling=scaling)
    return config


def _advancing(
    tensors: Iterator[tuple[str, np.ndarray]], advance: Callable[[str], None]
) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors, calling `advance` with each one's name once the writer has taken it."""
    for name, w in tensors:
        yield name, w
        advance(name)
