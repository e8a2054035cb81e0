"""Pack quant.py's codes and scales into GGUF's block bytes (block_q8_0, block_q4_K, ... of ggml-common.h).

Each packer takes a quantization result for a (rows, cols) matrix and returns uint8 (rows, bytes per row).
"""

from __future__ import annotations

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.blocks import Q4KBlocks, Q6KBlocks, QuantizedBlocks


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float16-exact float32 (rows, n) → little-endian float16 bytes (rows, n, 2)."""
    return v.astype("<f2").view(np.uint8).reshape(*v.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (..., 32) → 16 bytes: byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def pack_q8_0(qb: QuantizedBlocks) -> np.ndarray:
    """block_q8_0: fp16 d, then 32 int8 codes."""
    rows = qb.codes.shape[0]
    signed = (qb.codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(rows, -1, 32)
    return np.concatenate([_f16_bytes(qb.scales), signed], axis=-1).reshape(rows, -1)


def pack_q4_0(qb: QuantizedBlocks) -> np.ndarray:
    """block_q4_0: fp16 d, then 16 bytes of nibbles."""
    rows = qb.codes.shape[0]
    parts = [_f16_bytes(qb.scales), _nibbles(qb.codes.reshape(rows, -1, 32))]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_q4_1(qb: QuantizedBlocks) -> np.ndarray:
    """block_q4_1: fp16 d, fp16 m, then 16 bytes of nibbles."""
    if qb.zeros is None:
        raise EdgelmError("pack_q4_1 needs asymmetric blocks (quantize_blocks with symmetric=False)")
    rows = qb.codes.shape[0]
    parts = [_f16_bytes(qb.scales), _f16_bytes(qb.zeros), _nibbles(qb.codes.reshape(rows, -1, 32))]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_q5_0(qb: QuantizedBlocks) -> np.ndarray:
    """block_q5_0: fp16 d, 4 bytes of the codes' fifth bits (bit j of code j), 16 bytes of nibbles."""
    rows = qb.codes.shape[0]
    codes = qb.codes.reshape(rows, -1, 32)
    high = ((codes >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qh = high.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, -1, 4)
    parts = [_f16_bytes(qb.scales), qh, _nibbles(codes & 0xF)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_q4_k(r: Q4KBlocks) -> np.ndarray:
    """block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles."""
    rows = r.codes.shape[0]
    sc, mn = r.scales.reshape(rows, -1, 8), r.mins.reshape(rows, -1, 8)
    scale_bytes = np.concatenate(
        [
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),  # bytes 0-3: scales 0-3, top bits of scales 4-7
            mn[..., :4] | ((mn[..., 4:] >> 4) << 6),  # bytes 4-7: mins 0-3, top bits of mins 4-7
            (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4),  # bytes 8-11: low bits of scales/mins 4-7
        ],
        axis=-1,
    )
    q = r.codes.reshape(rows, -1, 4, 2, 32)  # byte 32*j + l holds codes 64*j + l and 64*j + 32 + l
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, -1, 128)
    parts = [_f16_bytes(r.d), _f16_bytes(r.dmin), scale_bytes, qs]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_q6_k(r: Q6KBlocks) -> np.ndarray:
    """block_q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, fp16 d."""
    rows = r.codes.shape[0]
    q = r.codes.reshape(rows, -1, 2, 4, 32)  # (rows, super-blocks, halves of 128, quarters of 32, 32)
    low, high = q & 0xF, q >> 4
    # byte l of a half's 64 low bytes holds quarters 0|2 (l < 32) or 1|3 (l >= 32), lower nibble first
    ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    scales = r.scales.view(np.uint8).reshape(rows, -1, 16)
    parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), scales, _f16_bytes(r.d)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
