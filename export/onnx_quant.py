"""The precisions of an ONNX export and their weights: each matrix quantized by `edgelm.quant.blocks`
(round-to-nearest with a scale search, GPTQ with calibration) and int4_mixed's choice of each matrix's bits
and block size within a byte budget.
Nothing here packs bytes (`export/onnx_pack.py` does) or builds a graph (`export/onnx_graph.py` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.blocks import QuantizedBlocks, quantize_blocks


@dataclass(frozen=True)
class Precision:
    """How the matrices are stored: `float` dtype, or `bits`-bit MatMulNBits codes (the rest stays float)."""

    dtype: str  # "float32" or "float16": activations, norms, embeddings, KV cache
    bits: int | None = None  # None: plain MatMul on float weights
    mixed: bool = False  # each matrix's bits and block chosen within llama.cpp Q4_K_M's size, see `allocate`
    # MatMulNBits on float16 between Casts, so that its scales (float16-exact) take 2 bytes, not 4
    half_scales: bool = False
    dynamic: bool = False  # int8 per output channel in DynamicQuantizeMatMul (activations quantized per call)


PRECISIONS = {
    "fp32": Precision("float32"),
    "fp16": Precision("float16"),
    "int8": Precision("float32", 8),
    "int8_dynamic": Precision("float32", 8, dynamic=True),
    "int4": Precision("float32", 4),
    "int4_mixed": Precision("float32", 4, mixed=True, half_scales=True),
}
MIXED_SIZE_OF = "q4_k_m"  # int4_mixed's folder is no larger than this GGUF mixture's file of the checkpoint
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
class BlockFormat:
    """How one matrix is stored in MatMulNBits (or GatherBlockQuantized): bits per code, values per scale."""

    bits: int
    block: int

    def packed_bytes(self, rows: int, cols: int, symmetric: bool, scale_bytes: int) -> int:
        """The bytes of a (rows, cols) matrix in this format: codes of the rows padded to whole blocks, a
        scale of `scale_bytes` per block and, unless symmetric, zero points packed as the codes are; 6 bits
        as the 4-bit and the 2-bit matrix (with zero points) that stand for them (`matmul_nbits_parts`)."""
        if self.bits == 6:
            high = BlockFormat(4, self.block).packed_bytes(rows, cols, symmetric, scale_bytes)
            return high + BlockFormat(2, self.block).packed_bytes(rows, cols, False, scale_bytes)
        blocks = -(-cols // self.block)
        zero_points = 0 if symmetric else -(-blocks * self.bits // 8)
        return rows * (blocks * (self.block * self.bits // 8 + scale_bytes) + zero_points)


# int4_mixed's choices for a matrix. Bits per weight with float16 scales: 4 bits in blocks of 128 take 4.125,
# in blocks of 16 5; 6 bits (two MatMulNBits, 4 + 2 bits) in blocks of 128 6.27, of 32 7.06; 8 bits 8.125.
# For the same bytes, 6 bits everywhere errs several times less than a mix of 4 and 8 bits would.
MIXED_FORMATS = (
    BlockFormat(4, 128),
    BlockFormat(4, 64),
    BlockFormat(4, 32),
    BlockFormat(4, 16),
    BlockFormat(6, 128),
    BlockFormat(6, 64),
    BlockFormat(6, 32),
    BlockFormat(8, 128),
    BlockFormat(8, 64),
)


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
    chosen: BlockFormat | None = None,
    threads: int | None = None,
) -> QuantizedBlocks:
    """One matrix of the graph (or "model.embed_tokens", the untied embedding table) at the precision's
    bits: per output channel for int8_dynamic's matrices, in the `chosen` format (int4_mixed's choice), else
    in blocks of `options.block_size`. The embedding table is quantized without a hessian. threads: as
    for `quantize_blocks`."""
    bits = precision.bits
    assert bits is not None
    if chosen is not None:
        options = dataclasses.replace(options, block_size=chosen.block)
        bits = chosen.bits
    if name == "model.embed_tokens":
        return quantize_matrix(w, bits, options, threads=threads)  # blocks, for GatherBlockQuantized
    if precision.dynamic:  # one block spanning each row
        return quantize_blocks(
            w, DYNAMIC_BITS, w.shape[1], True, search=options.search, hessian=hessian, threads=threads
        )
    return quantize_matrix(w, bits, options, hessian, threads)


def output_error(
    w: np.ndarray,
    chosen: BlockFormat,
    options: QuantOptions,
    threads: int | None,
    hessian: np.ndarray | None = None,
    output_weights: np.ndarray | None = None,
    table_weights: np.ndarray | None = None,
) -> float:
    """What storing w (out, in) in a format costs, to second order twice the KL divergence it adds per token
    (`edgelm.quant.sensitivity`): with E = W - Q(W) and H = E[x xᵀ] of its input, Σ_r output_weights[r]
    (E H Eᵀ)_rr for a matrix (each output's E[g²]; all 1 when not given: the output's squared error); for
    a lookup table (`table_weights` given: the embedding output's E[g²]), Σ_c table_weights[c] Σ_r E_rc² /
    out, the mean over rows; a tied head takes both; with neither measured, Σ E² / out. Q rounds to
    nearest, without the scale search or GPTQ's error feedback: they cost far more and rank the formats
    alike (int4_mixed's KLD on the tiny and a random 256-wide model was the same to 2 %)."""
    options = dataclasses.replace(options, block_size=chosen.block, search=False)
    q = quantize_matrix(w, chosen.bits, options, threads=threads)
    error = w - q.dequantize()[:, : w.shape[1]]
    if hessian is None and table_weights is None:
        table_weights = np.ones(w.shape[1], np.float32)
    cost = 0.0
    if hessian is not None:
        per_output = np.einsum("ri,ri->r", error @ hessian, error)
        cost += float(per_output.sum() if output_weights is None else per_output @ output_weights)
    if table_weights is not None:
        cost += float(np.einsum("rc,rc->c", error, error) @ table_weights) / w.shape[0]
    return cost


def allocate(
    choices: Mapping[str, Mapping[BlockFormat, tuple[int, float]]], budget: int
) -> dict[str, BlockFormat]:
    """Each matrix's format, for the least error in all (`output_error`, summed over the matrices) within
    `budget` bytes: every matrix starts at its smallest format, then the move from a matrix's format to a
    larger one that removes the most error per added byte is taken while the bytes stay within the budget,
    until none fits. `choices`: per matrix, per format, (bytes, error)."""
    chosen = {name: min(formats, key=lambda f: formats[f][0]) for name, formats in choices.items()}
    spent = sum(choices[name][f][0] for name, f in chosen.items())
    while True:
        best, best_gain = None, 0.0
        for name, formats in choices.items():
            size, error = formats[chosen[name]]
            for fmt, (more, less) in formats.items():
                if more > size and less < error and spent + more - size <= budget:
                    gain = (error - less) / (more - size)
                    if gain > best_gain:
                        best, best_gain = (name, fmt), gain
        if best is None:
            return chosen
        name, fmt = best
        spent += choices[name][fmt][0] - choices[name][chosen[name]][0]
        chosen[name] = fmt


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
