"""Shared fixtures: small random checkpoints, and one tiny model trained on the built-in corpus."""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgelm.model.config import ModelConfig
from edgelm.model.rope_scaling import LinearRopeScaling, LongRopeScaling
from edgelm.runtimes.base import Runtime
from edgelm.tokenizer import Tokenizer, train_tokenizer
from edgelm.training.random_checkpoint import random_checkpoint

SAMPLE_TEXT = """\
def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []   # 中文注释 and an emoji 🚀

    def push(self, item):
        self.items.append(item)
"""

# GQA, a non-default rope_theta, untied head
SMALL = ModelConfig(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=96,
    rope_theta=50000.0,
    tie_word_embeddings=False,
)


def random_hf_model(model_type: str, settings: dict[str, Any], vocab_size: int, seed: int) -> Any:
    """A transformers model of `model_type` (2 layers, a context of 64) with random weights far from
    transformers' tiny init, so that logits differ clearly and a missed norm shows: matrices normal(0, 0.1),
    biases normal(0, 0.5), norms multiplying by uniform (0.5, 1.5) (Gemma's weights w in (-0.5, 0.5), as
    its norms multiply by 1 + w)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        **{
            "vocab_size": vocab_size,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
            "bos_token_id": 0,
            "eos_token_id": 1,
            **settings,
        },
    )
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    low = -0.5 if model_type.startswith("gemma") else 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5, generator=generator)
            elif p.dim() > 1:
                p.normal_(0.0, 0.1, generator=generator)
            else:
                p.uniform_(low, low + 1.0, generator=generator)
    return model


# Gemma 2 with soft-capping, an attention scale of its own and a window shorter than the test sequences;
# Gemma 3 with a local and a global layer, the global one with linear RoPE scaling
GEMMA2 = dataclasses.replace(
    SMALL,
    architecture="Gemma2ForCausalLM",
    query_pre_attn_scalar=24,
    attn_logit_softcapping=1.5,
    final_logit_softcapping=2.0,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=16,
    tie_word_embeddings=True,
)
GEMMA3 = dataclasses.replace(
    SMALL,
    architecture="Gemma3ForCausalLM",
    query_pre_attn_scalar=16,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=16,
    rope_local_theta=10000.0,
    rope_scaling=LinearRopeScaling(2.0),
)

# Phi-3 with partial rotary (8 of 16 dimensions) and LongRoPE within its original context
PHI3 = dataclasses.replace(
    SMALL,
    architecture="Phi3ForCausalLM",
    partial_rotary_factor=0.5,
    rope_scaling=LongRopeScaling((1.0, 1.5, 2.5, 4.0), (1.0, 4.0, 8.0, 16.0), 96, 1.2),
)


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    return train_tokenizer([SAMPLE_TEXT * 3, "hello world " * 50], vocab_size=400)


def make_checkpoint(
    directory: Path, tokenizer: Tokenizer, config: ModelConfig = SMALL, seed: int = 0
) -> Path:
    """A checkpoint with random weights (std 0.1, so that the logits are far from uniform) and the
    tokenizer's vocabulary size."""
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    return random_checkpoint(directory, config, tokenizer, seed=seed)


@pytest.fixture
def checkpoint(tmp_path: Path, small_tokenizer: Tokenizer) -> Path:
    return make_checkpoint(tmp_path / "ckpt", small_tokenizer)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset trained briefly on the built-in corpus (the Python standard library)."""
    from edgelm.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(out=str(out), steps=250, batch_size=16, context=128, eval_every=125, warmup=20))
    return out


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the tokens' own frequency distribution."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def saved_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder's model.safetensors (or of that file), read by safetensors itself
    and widened to float32."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    return {name: tensor.float().numpy() for name, tensor in load_file(file).items()}


def logits_on_windows(runtime: Runtime, windows: np.ndarray) -> np.ndarray:
    """Float32 logits at every position of every window (each from a fresh sequence), concatenated."""
    rows = []
    for window in windows:
        runtime.reset()
        rows.append(runtime.forward(np.asarray(window).tolist(), all_logits=True))
    return np.concatenate(rows)


def kept_prefix_error(runtime: Runtime, ids: list[int], kept: int, detour: list[int]) -> float:
    """The largest difference between a fresh prefill's logits over `ids` and those of the same ids after
    the sequence ran on into `detour` and was cut back to its first `kept` tokens (`Runtime.keep`), which
    then prefills only the rest."""
    runtime.reset()
    fresh = runtime.forward(ids, all_logits=True)
    runtime.forward(detour)
    assert runtime.keep(kept) == kept
    again = runtime.forward(ids[kept:], all_logits=True)
    return float(np.abs(again - fresh[kept:]).max())


class LiveTensors:
    """Counts the bytes of checkpoint tensors alive at once: each array `read_tensor` hands out is counted
    until it is freed; `peak` is the most seen together."""

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0
        self.largest = 0

    def track(self, array: np.ndarray) -> np.ndarray:
        self.alive += array.nbytes
        self.peak = max(self.peak, self.alive)
        self.largest = max(self.largest, array.nbytes)
        weakref.finalize(array, self._freed, array.nbytes)
        return array

    def _freed(self, nbytes: int) -> None:
        self.alive -= nbytes


@pytest.fixture
def live_tensors(monkeypatch: pytest.MonkeyPatch) -> LiveTensors:
    """Every checkpoint tensor read during the test, counted while it lives."""
    import edgelm.checkpoint

    live = LiveTensors()
    read = edgelm.checkpoint.read_tensor
    monkeypatch.setattr(edgelm.checkpoint, "read_tensor", lambda f, entry: live.track(read(f, entry)))
    return live
