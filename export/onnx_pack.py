"""Quantized blocks → the byte layouts of ONNX Runtime's MatMulNBits and GatherBlockQuantized.

`edgelm.quant.blocks` chooses the codes and scales; this module only packs them.
"""

from __future__ import annotations

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.blocks import QuantizedBlocks


def matmul_nbits_parts(q: QuantizedBlocks) -> list[QuantizedBlocks]:
    """The matrices MatMulNBits (and GatherBlockQuantized) multiply by for q, whose sum is q's matrix: q
    itself at 2, 4 or 8 bits; at 6 bits, which ONNX Runtime's kernels do not take, a 4-bit matrix of each
    code's high bits at 4 times the scale plus a 2-bit one of its low bits with integer zero points.

    With c = 4h + l and zero point z = 4 zh + zl (32 when symmetric: zh = 8, ORT's default, and zl = 0):
    s (c - z) = 4s (h - zh) + s (l - zl), exact in float32 for the float16-exact s.
    """
    if q.bits in (2, 4, 8):
        return [q]
    if q.bits != 6:
        raise EdgelmError(f"MatMulNBits takes 2, 4, 8 (or 6, as 4 + 2) bits, not {q.bits}")
    zero = _zero_points(q) if q.zeros is not None else np.full(q.scales.shape, 32, np.uint8)
    high_zero, low_zero = (zero >> 2).astype(np.float32), (zero & 3).astype(np.float32)
    high_scales = q.scales * np.float32(4)
    high = QuantizedBlocks(
        q.codes >> 2, high_scales, None if q.zeros is None else -high_scales * high_zero, 4, q.block
    )
    low = QuantizedBlocks(q.codes & 3, q.scales, -q.scales * low_zero, 2, q.block)
    return [high, low]


def pack_matmul_nbits(q: QuantizedBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' B (N, blocks, block*bits/8) uint8, scales (N, blocks) and packed uint8 zero points
    (N, ceil(blocks*bits/8)) or None for symmetric codes (whose zero point is the default 2**(bits-1)),
    for 2, 4 or 8 bits (see `matmul_nbits_parts`).

    Codes are packed along K low bits first: for 4 bits, value 2j in the low nibble of byte j, 2j+1 in the
    high nibble (for 2 bits, value 4j + i in bits 2i, 2i+1 of byte j); the zero points of a row likewise,
    the last byte's unused bits zero.
    """
    rows, cols = q.codes.shape
    blocks = cols // q.block
    packed = _pack_low_first(q.codes, q.bits).reshape(rows, blocks, -1)
    if q.zeros is None:
        return packed, q.scales, None
    zero_points = _zero_points(q)
    spare = -blocks % (8 // q.bits)
    if spare:
        zero_points = np.pad(zero_points, ((0, 0), (0, spare)))
    return packed, q.scales, _pack_low_first(zero_points, q.bits)


def _zero_points(q: QuantizedBlocks) -> np.ndarray:
    """The integer zero point of each block of asymmetric codes with integer zeros (zeros = -scales * z)."""
    assert q.zeros is not None
    return np.rint(-q.zeros / np.where(q.scales == 0, 1, q.scales)).astype(np.uint8)


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (rows, n) → bytes (rows, n*bits/8), the earlier value in the lower bits."""
    if bits not in (2, 4, 8):
        raise EdgelmError(f"MatMulNBits packing supports 2, 4 and 8 bits, not {bits}")
    per_byte = 8 // bits
    grouped = codes.reshape(codes.shape[0], -1, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:2], np.uint8)
    for i in range(per_byte):
        packed |= grouped[..., i] << np.uint8(i * bits)
    return packed
