"""Quantized blocks → the byte layouts of ONNX Runtime's MatMulNBits and GatherBlockQuantized.

`edgelm.quant.blocks` chooses the codes and scales; this module only packs them.
"""

from __future__ import annotations

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.blocks import QuantizedBlocks


def pack_matmul_nbits(q: QuantizedBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' B (N, blocks, block*bits/8) uint8, scales (N, blocks) and packed uint8 zero points
    (N, ceil(blocks*bits/8)) or None for symmetric codes (whose zero point is the default 2**(bits-1)).

    Codes are packed along K low bits first: for 4 bits, value 2j in the low nibble of byte j, 2j+1 in the
    high nibble; the zero points of a row likewise, the last byte's high nibble zero when blocks is odd.
    """
    rows, cols = q.codes.shape
    blocks = cols // q.block
    packed = _pack_low_first(q.codes, q.bits).reshape(rows, blocks, -1)
    if q.zeros is None:
        return packed, q.scales, None
    zero_points = np.rint(-q.zeros / np.where(q.scales == 0, 1, q.scales)).astype(np.uint8)
    if q.bits == 4 and blocks % 2:
        zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
    return packed, q.scales, _pack_low_first(zero_points, q.bits)


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (rows, n) → bytes (rows, n*bits/8), the earlier value in the lower bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    if bits != 4:
        raise EdgelmError(f"MatMulNBits packing supports 4 and 8 bits, not {bits}")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
