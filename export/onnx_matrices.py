"""The matrices of the ONNX graph: which they are (q/k/v and gate/up fused, then the head), how each is read
from the checkpoint, and int4_mixed's choice of a format for each. `onnx_graph` multiplies by them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edgelm.export.onnx_quant import MIXED_FORMATS, BlockFormat, Matrix, QuantOptions, allocate, output_error
from edgelm.model.config import ModelConfig
from edgelm.quant.calibration import HEAD
from edgelm.quant.sensitivity import EMBEDDING

Weights = Callable[[str], np.ndarray]  # a checkpoint tensor by its HF name, read when asked for
# model.onnx's bytes for a 6-bit matrix's second MatMulNBits, its Add and three initializers (measured ~910)
SPLIT_GRAPH_BYTES = 1024


def matrix_names(config: ModelConfig) -> list[str]:
    """Every matrix of the graph in its order: per layer qkv_proj, o_proj, gate_up_proj, down_proj; then
    lm_head (the embedding matrix when tied)."""
    layers = [f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers) for part in _FUSED]
    return [*layers, "lm_head"]


_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def fused_weights(config: ModelConfig, matrix: str) -> list[str]:
    """The checkpoint weights a layer's graph matrix ("model.layers.0.self_attn.qkv_proj") stacks, by HF
    name: q, k and v ("model.layers.0.self_attn.q_proj.weight", ...), or the matrix itself in a checkpoint
    that stores it fused (Phi-3)."""
    *layer_path, fused = matrix.split(".", 3)  # model.layers.N, self_attn.qkv_proj
    parts = (fused,) if config.fused_projections else _FUSED[fused]
    return [f"{'.'.join(layer_path)}.{part}.weight" for part in parts]


def fused_matrix(config: ModelConfig, weights: Weights, name: str) -> Matrix:
    """One matrix of `matrix_names`, read from the checkpoint: the HF weights it fuses stacked along the
    output rows."""
    if name == "lm_head":
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        return Matrix(weights(head), "lm_head.weight")
    names = fused_weights(config, name)
    return Matrix(np.concatenate([weights(n) for n in names]), names[0])


def mixed_formats(
    config: ModelConfig,
    weights: Weights,
    options: QuantOptions,
    hessians: Mapping[str, np.ndarray],
    sensitivity: Mapping[str, np.ndarray],
    budget: int,
    scale_bytes: int,
    threads: int | None,
    advance: Callable[[str], None],
) -> dict[str, BlockFormat]:
    """int4_mixed's format of every quantized matrix (the untied embedding table included, as
    "model.embed_tokens"): each matrix's `output_error` in each of MIXED_FORMATS, weighed by its outputs'
    `sensitivity` (`edgelm.quant.sensitivity.output_sensitivity`), measured one matrix at a time (the build
    quantizes them again), then `allocate`'s choice within `budget` bytes, each scale taking `scale_bytes`
    and a 6-bit matrix's second node SPLIT_GRAPH_BYTES more. The table the embedding gathers from (the
    head's, when tied) takes only blocks that divide its rows."""
    table = "lm_head" if config.tie_word_embeddings else "model.embed_tokens"
    names = matrix_names(config) + ([] if config.tie_word_embeddings else ["model.embed_tokens"])
    choices = {}
    for name in names:
        if name == "model.embed_tokens":
            m = Matrix(weights("model.embed_tokens.weight"), "")
        else:
            m = fused_matrix(config, weights, name)
        hessian = hessians.get(m.hessian_key)
        output_weights = _output_sensitivity(config, sensitivity, name)
        table_weights = sensitivity.get(EMBEDDING) if name == table else None
        rows, cols = m.w.shape
        usable = [f for f in MIXED_FORMATS if name != table or cols % f.block == 0]
        choices[name] = {
            f: (
                f.packed_bytes(rows, cols, options.symmetric, scale_bytes)
                + (SPLIT_GRAPH_BYTES if f.bits == 6 else 0),
                output_error(m.w, f, options, threads, hessian, output_weights, table_weights),
            )
            for f in usable or [BlockFormat(4, options.block_size)]
        }
        if name.endswith("down_proj"):  # the last matrix of a layer
            advance(f"ranked {name.removesuffix('.mlp.down_proj')}")
    return allocate(choices, budget)


def _output_sensitivity(
    config: ModelConfig, sensitivity: Mapping[str, np.ndarray], name: str
) -> np.ndarray | None:
    """The E[g²] of each output row of a graph matrix (the HF weights it fuses, in its order), or None when
    not measured (or for the untied embedding table, which has no output rows of its own)."""
    if name == "lm_head":
        return sensitivity.get(HEAD)
    if name == "model.embed_tokens":
        return None
    names = fused_weights(config, name)
    return np.concatenate([sensitivity[n] for n in names]) if all(n in sensitivity for n in names) else None
