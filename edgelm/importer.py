"""Bring your own model: a Hugging Face Llama-family folder or a GGUF file → an edgelm checkpoint directory.

    HF folder  ──config.json, tokenizer files, (sharded) safetensors of any float dtype──▶ checkpoint
    GGUF file  ──llama.* metadata → config, tokenizer.ggml.* → tokenizer.json,
                 each tensor dequantized and its q/k rows un-permuted──────────────────▶ checkpoint

Tensors stream one at a time into the new model.safetensors (float32), so an import holds one tensor in
memory beside the output file, never the whole model twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgelm.checkpoint import iter_weights, weight_shapes, write_generation_config, write_weights
from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling
from edgelm.formats.artifact import artifact_kind
from edgelm.formats.gguf import hf_name, unpermute_from_gguf
from edgelm.formats.gguf_config import config_from_gguf
from edgelm.formats.gguf_reader import read_gguf
from edgelm.formats.gguf_tokenizer import tokenizer_from_gguf
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import Tokenizer

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
    write_weights(out, config, shapes, tensors, {"source": source.name})
    for name in HF_TEXT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    config.save(out)


def import_gguf(source: Path, out: Path) -> None:
    """A GGUF file of architecture llama → checkpoint: tensors dequantized to HF layout, tokenizer rebuilt."""
    gguf = read_gguf(source)
    if "rope_freqs.weight" in gguf.tensors:
        raise EdgelmError(
            f"{source}: per-frequency RoPE factors (rope_freqs, e.g. Llama 3.1+) cannot be imported "
            "from GGUF yet; import the model's Hugging Face folder instead"
        )
    config = config_from_gguf(gguf.metadata, gguf.tensors, str(source))
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

    write_weights(out, config, shapes, tensors(), {"source": source.name})
    tokenizer.save(out, context_length=config.max_position_embeddings)
    config.save(out)
    write_generation_config(out, config)
