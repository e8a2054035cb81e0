"""Output sensitivity (the Fisher information's diagonal at every linear output) against transformers' own
model: the same tokens drawn, -log p of them backpropagated through the whole model at once by autograd."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEMMA2, SAMPLE_TEXT, SMALL, make_checkpoint
from transformers import AutoModelForCausalLM

from edgelm.errors import EdgelmError
from edgelm.model.config import ModelConfig
from edgelm.quant import sensitivity
from edgelm.quant.calibration import DEFAULT_CONTEXT, calibration_windows
from edgelm.quant.sensitivity import EMBEDDING, HEAD, drawn_tokens
from edgelm.tokenizer import Tokenizer

TIED = dataclasses.replace(SMALL, tie_word_embeddings=True, qkv_bias=True, o_bias=True)


def transformers_sensitivity(
    checkpoint: Path, text: str, max_tokens: int, seed: int
) -> dict[str, np.ndarray]:
    """E[g²] per output of every nn.Linear and of the embedding, over the same windows and draws, by
    transformers' model backpropagating each whole window at once."""
    tokenizer = Tokenizer.load(checkpoint)
    config = ModelConfig.load(checkpoint)
    context = min(config.max_position_embeddings, DEFAULT_CONTEXT)
    windows = calibration_windows(tokenizer.encode(text), tokenizer.bos_id, context, max_tokens)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # so that every output after it has a grad
    outputs: dict[str, torch.Tensor] = {}

    def keeping(name: str) -> Callable[[torch.nn.Module, object, torch.Tensor], None]:
        def keep(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> None:
            output.retain_grad()
            outputs[name] = output

        return keep

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(keeping(f"{name}.weight"))
    model.get_input_embeddings().register_forward_hook(keeping(EMBEDDING))
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, np.ndarray] = {}
    for window in windows:
        logits = model(torch.tensor([window])).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        drawn = drawn_tokens(log_probs.detach(), torch.rand(len(window), generator=generator))
        (-log_probs.gather(1, drawn).sum()).backward()
        for name, output in outputs.items():
            assert output.grad is not None
            squares = (output.grad.reshape(-1, output.shape[-1]).double() ** 2).sum(0).numpy()
            sums[name] = sums.get(name, 0) + squares
    tokens = sum(len(w) for w in windows)
    return {name: total / tokens for name, total in sums.items()}


@pytest.mark.parametrize("config", [SMALL, TIED, GEMMA2], ids=["llama", "tied-biases", "gemma2-softcaps"])
def test_sensitivity_is_transformers_whole_model_gradient(
    config: ModelConfig, tmp_path: Path, small_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer by layer, one layer in memory, equals autograd through transformers' whole model: each
    output's E[g²] for every linear weight, the head's logits (before Gemma's soft-cap, which transformers
    applies after its lm_head), and the embedding table's rows."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", small_tokenizer, config)
    text = SAMPLE_TEXT * 4
    monkeypatch.setattr(sensitivity, "HEAD_CHUNK", 40)  # each window's logits in chunks
    ours = sensitivity.output_sensitivity(checkpoint, text, max_tokens=300, seed=3)
    theirs = transformers_sensitivity(checkpoint, text, max_tokens=300, seed=3)
    assert ours.keys() == theirs.keys() and {HEAD, EMBEDDING} <= ours.keys()
    # transformers' Gemma embedding multiplies by √hidden itself: a row's error reaches its output scaled
    theirs[EMBEDDING] = theirs[EMBEDDING] * config.embedding_multiplier**2
    for name, want in theirs.items():
        np.testing.assert_allclose(ours[name], want, rtol=2e-3, atol=1e-6 * want.max(), err_msg=name)
        assert want.max() > 0, name


def test_drawn_tokens_follow_the_distribution() -> None:
    """Drawn at n evenly spread uniform numbers, each token comes up n × its probability times, to within one
    draw (a token of probability 0 never)."""
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4])
    n = 1000
    drawn = drawn_tokens(probs.log().expand(n, -1), (torch.arange(n) + 0.5) / n)
    counts = torch.bincount(drawn[:, 0], minlength=len(probs))
    assert (counts - probs * n).abs().max() <= 1 and counts[1] == 0


def test_sensitivity_refuses_what_it_cannot_measure(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """Its text and token count are checked as calibration's are, with a clear error before any work."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", small_tokenizer, SMALL)
    for text, tokens, message in (("  ", 100, "calibration text is empty"), (SAMPLE_TEXT, 1, "max_tokens")):
        with pytest.raises(EdgelmError, match=message):
            sensitivity.output_sensitivity(checkpoint, text, max_tokens=tokens)
