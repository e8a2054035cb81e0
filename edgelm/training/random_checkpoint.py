"""A checkpoint with random weights, for tests and benchmarks: numpy only, reproducible from a seed.

Training initialises its own model (`Transformer.init_weights`); this is the one place that writes a random
checkpoint without training, so that tests and benchmarks draw their weights the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgelm.checkpoint import save_checkpoint, tensor_shapes
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import Tokenizer

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def random_weights(
    config: ModelConfig,
    seed: int = 0,
    std: float = 0.1,
    embedding_std: float | None = None,
    vector_range: tuple[float, float] = (0.5, 1.5),
) -> dict[str, np.ndarray]:
    """Every tensor of `config` by its HF name, float32: matrices normal(0, std) (the embeddings and the head
    normal(0, embedding_std), default std), vectors (norms, biases) uniform in `vector_range`.

    The defaults keep the logits far from uniform, so that a wrong kernel changes the top token.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = rng.uniform(*vector_range, shape).astype(np.float32)
        else:
            scale = embedding_std if embedding_std is not None and name in EMBEDDINGS else std
            tensors[name] = rng.standard_normal(shape, np.float32) * np.float32(scale)
    return tensors


def random_checkpoint(
    directory: Path,
    config: ModelConfig,
    tokenizer: Tokenizer,
    seed: int = 0,
    std: float = 0.1,
    embedding_std: float | None = None,
    vector_range: tuple[float, float] = (0.5, 1.5),
) -> Path:
    """Write a checkpoint of `config` with `random_weights(config, ...)` and `tokenizer` to `directory`."""
    weights = random_weights(config, seed, std, embedding_std, vector_range)
    save_checkpoint(directory, config, weights, tokenizer)
    return directory
