"""The precisions of an ONNX export and their weights: each matrix quantized by `edgelm.quant.blocks`
(round-to-nearest with a scale search, GPTQ with calibration) and the int4_mixed choice of 8-bit matrices.
Nothing here packs bytes (`export/onnx_pack.py` does) or builds a graph (`export/onnx_graph.py` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.blocks import QuantizedBlocks, quantize_blocks


@dataclass(frozen=True)
class Precision:
    """How the matrices are stored: `float` dtype, or `bits`-bit MatMulNBits codes (the rest stays float)."""

    dtype: str  # "float32" or "float16": activations, norms, embeddings, KV cache
    bits: int | None = None  # None: plain MatMul on float weights
    mixed: bool = False  # the head and the most sensitive matrices at 8 bits, see `sensitive_matrices`
    dynamic: bool = False  # int8 per output channel in DynamicQuantizeMatMul (activations quantized per call)


PRECISIONS = {
    "fp32": Precision("float32"),
    "fp16": Precision("float16"),
    "int8": Precision("float32", 8),
    "int8_dynamic": Precision("float32", 8, dynamic=True),
    "int4": Precision("float32", 4),
    "int4_mixed": Precision("float32", 4, mixed=True),
}
MIXED_EIGHT_BIT_SHARE = 0.25  # int4_mixed: at most this share of the layers' weights is promoted to 8 bits
# int8_dynamic: weights in [-64, 63]. On AVX2, ONNX Runtime multiplies uint8 activations by int8 weights with
# instructions that add pairs of products in int16, which full-range weights overflow (ORT's reduce_range).
DYNAMIC_BITS = 7


@dataclass(frozen=True)
class QuantOptions:
    """Parameters of the int8/int4 MatMulNBits weights.

    block_size: values per scale along the input dimension (a power of two >= 16).
    symmetric: codes centred on 2**(bits-1), no zero points; else a uint8 zero point per block.
    accuracy_level: MatMulNBits' compute type on CPU: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
    search: refine each block's scale by an error-minimizing search (else plain round-to-nearest).
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    search: bool = True

    def check(self) -> None:
        """Raise an EdgelmError for values MatMulNBits does not accept."""
        b = self.block_size
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise EdgelmError(f"block size {b!r}: MatMulNBits needs a power of two >= 16 (e.g. 32, 64, 128)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgelmError(f"accuracy level {self.accuracy_level!r} must be 0, 1, 2, 3 or 4")


@dataclass(frozen=True)
class Matrix:
    """A weight matrix as the graph multiplies by it: HF weights stacked along the output rows (q, k, v;
    gate, up), (out, in), with the key of the calibration hessian of its input."""

    w: np.ndarray
    hessian_key: str


def quantized_blocks(
    name: str,
    w: np.ndarray,
    precision: Precision,
    options: QuantOptions,
    hessian: np.ndarray | None,
    eight_bit: frozenset[str] = frozenset(),
    threads: int | None = None,
) -> QuantizedBlocks:
    """One matrix of the graph (or "model.embed_tokens", the untied embedding table) at the precision's
    bits: per output channel for int8_dynamic's matrices, 8 bits for the names in `eight_bit` (int4_mixed),
    else in blocks of `options.block_size`. The embedding table is quantized without a hessian. threads: as
    for `quantize_blocks`."""
    bits = precision.bits
    assert bits is not None
    if name == "model.embed_tokens":
        return quantize_matrix(w, bits, options, threads=threads)  # blocks, for GatherBlockQuantized
    if precision.dynamic:  # one block spanning each row
        return quantize_blocks(
            w, DYNAMIC_BITS, w.shape[1], True, search=options.search, hessian=hessian, threads=threads
        )
    return quantize_matrix(w, 8 if name in eight_bit else bits, options, hessian, threads)


def quantization_cost(w: np.ndarray, q: QuantizedBlocks, hessian: np.ndarray | None) -> float:
    """What quantizing w to q costs per weight: with calibration, the expected squared error of the
    matrix's output, tr(E H Eᵀ) for E = W - Q(W) and H = E[x xᵀ]; without, the squared weight error ||E||²
    (the output error for inputs of unit variance, which the RMS-normalized inputs of qkv and gate/up are
    near)."""
    error = w - q.dequantize()[:, : w.shape[1]]
    total = float(np.sum((error @ hessian) * error)) if hessian is not None else float(np.sum(error * error))
    return total / w.size


def sensitive_matrices(costs: dict[str, float], sizes: dict[str, int], share: float) -> list[str]:
    """The head, then the layer matrices whose quantization costs most per weight (`quantization_cost` at
    4 bits), up to `share` of the layers' weights (`sizes`: values per matrix)."""
    layers = [name for name in costs if name != "lm_head"]
    budget = share * sum(sizes[name] for name in layers)
    chosen = ["lm_head"]
    for name in sorted(layers, key=costs.__getitem__, reverse=True):
        if sizes[name] <= budget:
            chosen.append(name)
            budget -= sizes[name]
    return chosen


def quantize_matrix(
    w: np.ndarray,
    bits: int,
    options: QuantOptions,
    hessian: np.ndarray | None = None,
    threads: int | None = None,
) -> QuantizedBlocks:
    """w (out, in) quantized along its rows in blocks of `options.block_size`, the rows zero-padded to a
    whole number of blocks as MatMulNBits pads them (the padding's codes are never used)."""
    cols = w.shape[1]
    padded = -cols % options.block_size
    if padded:
        w = np.pad(w, ((0, 0), (0, padded)))
        if hessian is not None:
            hessian = np.pad(hessian, ((0, padded), (0, padded)))
    importance = None
    if padded and hessian is None:
        importance = np.concatenate([np.ones(cols), np.zeros(padded)])
    return quantize_blocks(
        w,
        bits,
        options.block_size,
        options.symmetric,
        importance=importance,
        search=options.search,
        hessian=hessian,
        integer_zeros=not options.symmetric,
        threads=threads,
    )
