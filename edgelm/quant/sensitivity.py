"""How much each output of each weight matters to the model's prediction: the diagonal of the Fisher
information of its output, for choosing where a byte budget buys the most accuracy (int4_mixed).

A quantized weight W + E adds δ = E x to its output y = W x. To second order, the expected KL divergence of
the next-token distribution from the float model's is ½ E[δᵀ F δ], with F = E[g gᵀ] the Fisher information of
y: g = ∂ log p(ŷ) / ∂y for a token ŷ drawn from the model's own prediction. Keeping F's diagonal, the cost of
E is ½ Σ_c E[g_c²] (E H Eᵀ)_cc, H = E[x xᵀ] the input's second moment (`edgelm.quant.calibration`): what
`output_sensitivity` measures is E[g_c²] for every output c of every weight, so that an error in a value
that the next layers damp (q, k; an attention that averages v over many positions) weighs less than one
that reaches the logits whole.

    windows ─ embed ─ layer 0 ─ … ─ layer L-1 ─ norm ─ head ─ logits ─ ŷ ~ softmax ─ -log p(ŷ)
                 ▲ each layer's input kept                                         │ backward
                 └── layer L-1 … 0, read again one at a time, run with gradients ◀─┘

Memory holds the activations of every layer's input (layers × tokens × hidden float32: SENSITIVITY_TOKENS
tokens of a 4096-wide, 32-layer model take 0.5 GB), one layer (or the head) and the logits of HEAD_CHUNK
positions, never the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgelm.checkpoint import row_reader, tensor_reader
from edgelm.model.config import ModelConfig
from edgelm.quant.calibration import (
    HEAD,
    calibration_input,
    final_norm,
    forward_windows,
    layer_module,
    window_embeddings,
)

if TYPE_CHECKING:
    import torch

SENSITIVITY_TOKENS = 1024  # a mean of squared gradients per output: far fewer tokens than a hessian needs
HEAD_CHUNK = 128  # positions whose logits (and their gradients) are held at once
EMBEDDING = "model.embed_tokens.weight"


def output_sensitivity(
    checkpoint: Path,
    text: str,
    max_tokens: int = SENSITIVITY_TOKENS,
    seed: int = 0,
    advance: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """E[g_c²] per output c (module docstring) of every linear weight by HF name ("model.layers.0.self_attn
    .q_proj.weight" → (out_features,) float32; "lm_head.weight" → (vocab,)), and of the embedding's output
    (EMBEDDING → (hidden,), Gemma's multiplier folded in, so that it weighs an error of the table's rows),
    over windows of `text` (as `calibration_windows` cuts them, at most `max_tokens` tokens). The tokens
    ŷ are drawn by `drawn_tokens` from torch.rand(window length) per window, seeded with `seed`: the result
    depends on nothing else. `advance` (a progress bar's) is called after each layer's forward and backward
    pass: 2 × layers calls."""
    import torch

    config, entries, windows = calibration_input(checkpoint, text, None, max_tokens)
    weights = tensor_reader(entries)
    tokens = sum(len(w) for w in windows)
    sums: dict[str, torch.Tensor] = {}
    xs = window_embeddings(config, row_reader(entries), windows)
    inputs = []
    for i in range(config.num_hidden_layers):
        inputs.append(xs)
        xs = forward_windows(layer_module(config, weights, i), config, xs)
        if advance:
            advance(f"sensitivity: forward through layer {i}")
    grads = _head_gradients(config, weights, xs, sums, torch.Generator().manual_seed(seed))
    for i in reversed(range(config.num_hidden_layers)):
        grads = _layer_gradients(config, weights, i, inputs.pop(), grads, sums)
        if advance:
            advance(f"sensitivity: backward through layer {i}")
    for grad in grads:  # an error of a table row reaches the embedding's output times the multiplier
        _add(sums, EMBEDDING, grad * config.embedding_multiplier)
    return {name: (total / tokens).float().numpy() for name, total in sums.items()}


def _head_gradients(
    config: ModelConfig,
    weights: Callable[[str], np.ndarray],
    xs: list[torch.Tensor],
    sums: dict[str, torch.Tensor],
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """∂(-log p(ŷ)) / ∂(last layer's output) per window, ŷ drawn from each position's prediction; the head's
    E[g²] (of its logits before any soft-cap) added to sums[HEAD]."""
    import torch

    norm = final_norm(config, weights)
    head = torch.from_numpy(weights(EMBEDDING if config.tie_word_embeddings else HEAD))
    cap = config.final_logit_softcapping
    grads = []
    for x in xs:
        parts = []
        uniforms = torch.rand(x.shape[1], generator=generator).split(HEAD_CHUNK)
        for chunk, u in zip(x.split(HEAD_CHUNK, dim=1), uniforms, strict=True):  # HEAD_CHUNK logits at once
            chunk = chunk.clone().requires_grad_(True)
            logits = norm(chunk) @ head.T
            logits.retain_grad()
            capped = logits if cap is None else cap * torch.tanh(logits / cap)
            log_probs = torch.log_softmax(capped[0], dim=-1)
            drawn = drawn_tokens(log_probs.detach(), u)
            (-log_probs.gather(1, drawn).sum()).backward()
            assert logits.grad is not None and chunk.grad is not None
            _add(sums, HEAD, logits.grad)
            parts.append(chunk.grad)
        grads.append(torch.cat(parts, dim=1))
    return grads


def drawn_tokens(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """A token per position (T, 1) drawn from its distribution (T, vocab) by the inverse of its cumulative
    distribution at a uniform number (T,): each position's draw its own, however positions are chunked."""
    import torch

    cumulative = log_probs.exp().cumsum(-1)
    return torch.searchsorted(cumulative, uniforms[:, None]).clamp(max=log_probs.shape[-1] - 1)


def _layer_gradients(
    config: ModelConfig,
    weights: Callable[[str], np.ndarray],
    i: int,
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    sums: dict[str, torch.Tensor],
) -> list[torch.Tensor]:
    """Layer i run again on its inputs with gradients: the gradient at its input per window, given the one
    at its output; each linear weight's E[g²] added to sums."""
    import torch

    from edgelm.model.transformer import rope_tables

    block = layer_module(config, weights, i)
    block.requires_grad_(False)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(_keeping(outputs, f"model.layers.{i}.{name}.weight"))
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    before = []
    try:
        for x, grad in zip(inputs, grads, strict=True):
            x = x.clone().requires_grad_(True)
            y = block(x, rope_tables(config, 0, x.shape[1], x.device), 0)
            y.backward(grad)
            for name, output in outputs.items():
                assert output.grad is not None
                _add(sums, name, output.grad)
            assert x.grad is not None
            before.append(x.grad)
    finally:
        for handle in handles:
            handle.remove()
    return before


def _keeping(
    outputs: dict[str, torch.Tensor], name: str
) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    """A forward hook that keeps its module's output, its gradient retained, as outputs[name]."""

    def keep(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        output.retain_grad()
        outputs[name] = output

    return keep


def _add(sums: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> None:
    """Add the sum over tokens of grad² (float64, per output) to sums[name]."""
    squares = (grad.reshape(-1, grad.shape[-1]).double() ** 2).sum(0)
    sums[name] = sums[name] + squares if name in sums else squares
