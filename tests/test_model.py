"""edgelm's model against transformers' LlamaForCausalLM, the oracle, on the same weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GEMMA2, GEMMA3, PHI3, SMALL, make_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import edgelm
from edgelm.checkpoint import load_checkpoint
from edgelm.model.config import PRESETS, ModelConfig
from edgelm.model.transformer import Transformer, load_weights
from edgelm.tokenizer import Tokenizer
from edgelm.training.train import next_token_loss

CONFIGS = {
    "gqa-untied-theta": SMALL,
    "mha-tied": dataclasses.replace(
        SMALL, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0
    ),
    "mqa-headdim": dataclasses.replace(SMALL, num_key_value_heads=1, head_dim=24, rope_theta=1e6),
    "qwen3-qk-norm-biases": dataclasses.replace(
        SMALL, architecture="Qwen3ForCausalLM", qkv_bias=True, o_bias=True, head_dim=32
    ),
    "gemma2-softcap-window": GEMMA2,
    "gemma2-no-softcap-untied": dataclasses.replace(
        GEMMA2, attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=False
    ),
    "gemma3-local-global": GEMMA3,
    "phi3-partial-longrope": PHI3,
}


def hf_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(tmp_path: Path, small_tokenizer: Tokenizer, name: str) -> None:
    directory = make_checkpoint(tmp_path / name, small_tokenizer, CONFIGS[name])
    ids = np.random.default_rng(0).integers(0, small_tokenizer.vocab_size, size=40)
    with edgelm.load(directory, runtime="torch", device="cpu") as model:
        ours = model.runtime.forward(ids.tolist(), all_logits=True)
    theirs = hf_logits(directory, ids)
    assert ours.shape == theirs.shape == (40, small_tokenizer.vocab_size)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(theirs).max() > 1.0  # the weights are not trivially small


def test_transformers_loads_checkpoint_without_missing_keys(checkpoint: Path) -> None:
    # transformers types the result as the model alone, not the (model, info) of output_loading_info
    loaded: tuple[Any, dict[str, Any]] = AutoModelForCausalLM.from_pretrained(  # type: ignore[assignment]
        checkpoint, output_loading_info=True
    )
    info = loaded[1]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_saved_by_transformers_loads(
    tmp_path: Path, small_tokenizer: Tokenizer, tied: bool
) -> None:
    config = LlamaConfig(
        vocab_size=small_tokenizer.vocab_size,
        hidden_size=48,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0},
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(1)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)  # safetensors, transformers' own config.json
    small_tokenizer.save(tmp_path)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=30)
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    with edgelm.load(tmp_path, device="cpu") as model:
        assert model.config.head_dim == 8 and model.config.tie_word_embeddings == tied
        got = model.runtime.forward(ids.tolist(), all_logits=True)
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "name", ["gqa-untied-theta", "gemma2-softcap-window", "gemma3-local-global", "phi3-partial-longrope"]
)
def test_kv_cache_decoding_equals_full_forward(tmp_path: Path, small_tokenizer: Tokenizer, name: str) -> None:
    """Chunks after a prefill attend over the cache, windowed and soft-capped where the config says so."""
    checkpoint = make_checkpoint(tmp_path / name, small_tokenizer, CONFIGS[name])
    ids = np.random.default_rng(2).integers(0, 300, size=50).tolist()
    with edgelm.load(checkpoint, device="cpu") as model:
        rt = model.runtime
        full = rt.forward(ids, all_logits=True)
        rt.reset()
        pieces = [rt.forward(ids[:17], all_logits=True), rt.forward(ids[17:30], all_logits=True)]
        pieces += [rt.forward([t], all_logits=True) for t in ids[30:]]
        rt.reset()
        last_only = rt.forward(ids[:33])
    # Gemma's norms multiply by up to 2.5 here: its float32 rounding differences grow past 1e-5
    assert np.abs(np.concatenate(pieces) - full).max() <= 3e-5
    assert last_only.shape == (1, full.shape[1]) and np.abs(last_only[0] - full[32]).max() <= 3e-5


def test_training_model_matches_the_runtime(checkpoint: Path) -> None:
    """The batched training path (no cache, is_causal) and the cached inference path agree."""
    config, tensors, _ = load_checkpoint(checkpoint)
    model = Transformer(config)
    load_weights(model, tensors)
    ids = np.random.default_rng(3).integers(0, config.vocab_size, size=(3, 25))
    with torch.no_grad():
        batched = model(torch.from_numpy(ids)).numpy()
    with edgelm.load(checkpoint, device="cpu") as m:
        for row in range(3):
            m.runtime.reset()
            assert np.abs(m.runtime.forward(ids[row].tolist(), all_logits=True) - batched[row]).max() <= 1e-5


def test_forward_refuses_bad_ids_and_overflow(checkpoint: Path) -> None:
    with edgelm.load(checkpoint, device="cpu") as model:
        rt = model.runtime
        with pytest.raises(edgelm.EdgelmError, match=r"must lie in \[0, "):
            rt.forward([model.config.vocab_size])
        with pytest.raises(edgelm.EdgelmError, match="at least one"):
            rt.forward([])
        rt.forward([1] * 90)
        with pytest.raises(edgelm.EdgelmError, match="context"):
            rt.forward([1] * 10)


def test_kv_cache_grows_past_its_first_allocation(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """The cache starts at 512 positions and doubles: decoding across the boundaries changes nothing."""
    config = dataclasses.replace(SMALL, max_position_embeddings=1200, num_hidden_layers=1)
    directory = make_checkpoint(tmp_path / "long", small_tokenizer, config)
    ids = np.random.default_rng(4).integers(0, small_tokenizer.vocab_size, size=1100).tolist()
    with edgelm.load(directory, device="cpu") as model:
        rt = model.runtime
        full = rt.forward(ids, all_logits=True)
        rt.reset()
        pieces = [rt.forward(ids[:500], all_logits=True), rt.forward(ids[500:520], all_logits=True)]
        pieces += [rt.forward(ids[520:1030], all_logits=True)] + [
            rt.forward([t], all_logits=True) for t in ids[1030:]
        ]
    assert np.abs(np.concatenate(pieces) - full).max() <= 1e-4


PARAMETER_CONFIGS: dict[str, ModelConfig] = {
    **{f"preset-{name}": config for name, config in PRESETS.items()},
    "llama-biased-untied": dataclasses.replace(SMALL, qkv_bias=True, o_bias=True),
    "llama-biased-tied": dataclasses.replace(SMALL, qkv_bias=True, o_bias=True, tie_word_embeddings=True),
    "qwen2-qkv-bias-untied": dataclasses.replace(SMALL, architecture="Qwen2ForCausalLM", qkv_bias=True),
    "mistral-tied": dataclasses.replace(SMALL, architecture="MistralForCausalLM", tie_word_embeddings=True),
    "qwen3-untied": dataclasses.replace(SMALL, architecture="Qwen3ForCausalLM"),
    "gemma2": GEMMA2,
    "gemma3-untied": dataclasses.replace(GEMMA3, tie_word_embeddings=False),
    "phi3": PHI3,
    "qwen3-biased-tied": dataclasses.replace(
        SMALL, architecture="Qwen3ForCausalLM", qkv_bias=True, o_bias=True, tie_word_embeddings=True
    ),
}


@pytest.mark.parametrize("name", PARAMETER_CONFIGS)
def test_parameter_count_equals_transformers(name: str) -> None:
    """ModelConfig.num_parameters (the closed form) against both models' own parameters, tied weights once."""
    config = PARAMETER_CONFIGS[name]
    hf = config.to_hf_dict()
    with torch.device("meta"):  # shapes only: the base preset has ~100 M parameters
        ours = Transformer(config)
        theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    assert config.num_parameters == sum(p.numel() for p in ours.parameters()) == theirs.num_parameters()


def test_training_loss_equals_transformers(checkpoint: Path) -> None:
    """The loss that training minimises is transformers' causal-LM loss (labels shifted inside)."""
    config, tensors, _ = load_checkpoint(checkpoint)
    model = Transformer(config)
    load_weights(model, tensors)
    windows = torch.from_numpy(np.random.default_rng(5).integers(0, config.vocab_size, size=(3, 26)))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = next_token_loss(model, windows[:, :-1], windows[:, 1:]).item()
        theirs = hf(input_ids=windows, labels=windows).loss.item()
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours > 1.0  # random weights: far from a model that predicts these random ids
