"""The checkpoint directory, in the Hugging Face layout: config.json, model.safetensors (HF tensor names),
tokenizer.json, tokenizer_config.json, generation_config.json. Read and written with numpy, never pickled."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from edgelm.config import ModelConfig
from edgelm.errors import EdgelmError
from edgelm.files import temporary_sibling, write_json_atomic
from edgelm.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint by its Hugging Face name, with its shape."""
    h, hd = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, config.num_attention_heads * hd),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, h),
            p + "mlp.up_proj.weight": (config.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, config.intermediate_size),
        }
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def save_checkpoint(
    directory: Path,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a complete checkpoint directory; each file goes to a temporary name and is renamed into place."""
    directory = Path(directory)
    check_tensors(config, tensors, str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(directory / WEIGHTS)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(tmp),
        metadata={"format": "pt", **(metadata or {})},
    )
    tmp.replace(directory / WEIGHTS)
    tokenizer.save(directory, context_length=config.max_position_embeddings)
    config.save(directory)
    write_json_atomic(
        directory / "generation_config.json",
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id
            if isinstance(config.eos_token_id, int)
            else list(config.eos_token_id),
            "max_length": config.max_position_embeddings,
        },
    )


def load_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Read and validate a checkpoint directory: its config, float32 weights by HF name, and tokenizer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgelmError(f"{directory}: not a checkpoint directory")
    config = ModelConfig.load(directory)
    tensors = read_weights(directory / WEIGHTS)
    check_tensors(config, tensors, str(directory / WEIGHTS))
    return config, tensors, Tokenizer.load(directory)


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy arrays."""
    if not path.is_file():
        raise EdgelmError(f"{path}: not found (a checkpoint keeps its weights in {WEIGHTS})")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: f.get_tensor(name).astype(np.float32, copy=False) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise EdgelmError(
            f"{path}: cannot be read as safetensors ({e}); the file may be truncated or "
            "corrupt, re-create or re-download it"
        ) from None


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise EdgelmError(f"{path}: cannot be read as safetensors ({e})") from None


def check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """Refuse weights whose names or shapes do not match the config, naming the first few problems.

    A tied head stored beside the embeddings (some writers do) is dropped from `tensors`.
    """
    expected = tensor_shapes(config)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some writers store the tied head twice
    problems = [f"missing {n}" for n in expected if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [
        f"{n} has shape {tuple(t.shape)}, config.json implies {expected[n]}"
        for n, t in tensors.items()
        if n in expected and tuple(t.shape) != expected[n]
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise EdgelmError(f"{where}: weights do not match config.json: {'; '.join(problems[:3])}{more}")


def checkpoint_sha256(directory: Path) -> str:
    """A hash of what makes the model: config.json, the weights and tokenizer.json (for provenance)."""
    digest = hashlib.sha256()
    for name in ("config.json", WEIGHTS, "tokenizer.json"):
        with open(Path(directory) / name, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
