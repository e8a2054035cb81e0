"""Block quantizers in numpy: a float matrix → integer codes + scales (+ offsets), shared by both exporters.

Nothing here knows a file format: `export/gguf.py` and `export/onnx.py` only pack these arrays into bytes.
Scales and offsets are rounded to float16 (what GGUF stores) before the result is returned, and each
result's `dequantize()` computes the values the way the consumer does (float16 widened to float32, float32
arithmetic in the consumer's order), so it equals gguf-py's dequantizer bit for bit.

Two families:
- `quantize_blocks`: one scale (+ one offset) per `block` consecutive values of a row: GGUF Q8_0, Q4_0, Q4_1
  (block 32) and ONNX MatMulNBits (any block size).
- `quantize_q4_k`, `quantize_q6_k`: llama.cpp's K-quants, super-blocks of 256 values whose sub-block scales
  are themselves quantized (to 6 or 8 bits) against float16 scales, one per super-block.

search=False rounds to nearest the way llama.cpp's reference quantizers (`quantize_row_*_ref`) do.
search=True (the default; `edgelm.quant.search`) also tries a small grid of scales around that one, refits
each by weighted least squares, and keeps per block whichever dequantizes with the lowest
importance-weighted squared error, so it is never worse than round-to-nearest on that error.

hessian=H (the second moment E[x xᵀ] of the inputs, from `edgelm.quant.calibration.activation_covariance`)
turns on GPTQ's error feedback (Frantar et al. 2022): the columns are rounded left to right and each column's
rounding error is spread over the columns not yet rounded, through the inverse of H, so that the output
error ||(W - Wq) x||² rather than the weight error is made small. Each block's scale is chosen, as above,
from the weights as updated so far; the result has the same type and arrays as without H.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant import gptq
from edgelm.quant.arith import divide
from edgelm.quant.gptq import GroupFit
from edgelm.quant.rows import concat_columns, concat_rows, over_row_chunks, row_chunks
from edgelm.quant.search import Store, nearest_codes, search_scales
from edgelm.values import is_int

QK_K = 256  # values in a K-quant super-block

_GPTQ_CHUNK_VALUES = 1 << 24  # values updated at once by the error feedback (float32): 64 MiB


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class QuantizedBlocks:
    """Codes with one float16-exact scale (and offset) per `block` values of a row; see quantize_blocks.

    codes   uint8 (rows, cols), in [0, 2**bits)
    scales  float32 (rows, cols // block), each exactly representable in float16 (the GGUF d)
    zeros   None when symmetric; else float32 (rows, cols // block), float16-exact (the GGUF Q4_1 m), or with
            integer_zeros -scales * z for integer zero points z (exact in float32)

    With b = c // block, the value of w[r, c] is, computed in float32:
      symmetric   scales[r, b] * (codes[r, c] - 2**(bits-1))
      asymmetric  scales[r, b] * codes[r, c] + zeros[r, b]

    GGUF: Q8_0 stores int8(codes - 128) and d = scales; Q4_0 stores the codes as nibbles and d = scales;
    Q4_1 stores the codes as nibbles, d = scales and m = zeros. ONNX MatMulNBits computes
    (code - zero_point) * scale: symmetric codes are exact there with zero_point 2**(bits-1) (8 when omitted),
    asymmetric ones with integer_zeros (zero_point = -zeros / scales, an integer); Q4_1's float offsets have
    no exact uint8 zero point.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        """The float32 matrix (rows, cols) that a consumer of these arrays computes."""
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, -1, self.block).astype(np.float32)  # (rows, blocks, block)
        if self.zeros is None:
            values = self.scales[..., None] * (q - np.float32(1 << (self.bits - 1)))
        else:
            values = self.scales[..., None] * q + self.zeros[..., None]
        return values.reshape(rows, cols)


@dataclass(frozen=True)
class Q4KBlocks:
    """GGUF Q4_K: super-blocks of 256 values = 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

    codes   uint8 (rows, cols), in [0, 15]
    scales  uint8 (rows, cols // 32), in [0, 63]: sub-block scale codes
    mins    uint8 (rows, cols // 32), in [0, 63]: sub-block min codes
    d       float32 (rows, cols // 256), float16-exact: super-block scale of the scales
    dmin    float32 (rows, cols // 256), float16-exact: super-block scale of the mins

    value[r, c] = (d[r, c // 256] * scales[r, c // 32]) * codes[r, c] - dmin[r, c // 256] * mins[r, c // 32]
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    d: np.ndarray
    dmin: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The float32 matrix (rows, cols) that llama.cpp computes from these arrays."""
        rows, cols = self.codes.shape
        step = np.repeat(self.d, 8, axis=1) * self.scales.astype(np.float32)  # (rows, sub-blocks)
        offset = np.repeat(self.dmin, 8, axis=1) * self.mins.astype(np.float32)
        q = self.codes.reshape(rows, -1, 32).astype(np.float32)
        return (step[..., None] * q - offset[..., None]).reshape(rows, cols)


@dataclass(frozen=True)
class Q6KBlocks:
    """GGUF Q6_K: super-blocks of 256 values = 16 sub-blocks of 16, each with an int8 scale.

    codes   uint8 (rows, cols), in [0, 63]; the signed code is codes - 32
    scales  int8 (rows, cols // 16): sub-block scales
    d       float32 (rows, cols // 256), float16-exact: super-block scale

    value[r, c] = (d[r, c // 256] * scales[r, c // 16]) * (codes[r, c] - 32)
    """

    codes: np.ndarray
    scales: np.ndarray
    d: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The float32 matrix (rows, cols) that llama.cpp computes from these arrays."""
        rows, cols = self.codes.shape
        step = np.repeat(self.d, 16, axis=1) * self.scales.astype(np.float32)  # (rows, sub-blocks)
        q = self.codes.reshape(rows, -1, 16).astype(np.float32) - np.float32(32)
        return (step[..., None] * q).reshape(rows, cols)


# --------------------------------------------------------------------------------------------- quantizers


def quantize_blocks(
    w: np.ndarray,
    bits: int,
    block: int,
    symmetric: bool,
    importance: np.ndarray | None = None,
    search: bool = True,
    hessian: np.ndarray | gptq.Factor | None = None,
    integer_zeros: bool = False,
    threads: int | None = None,
) -> QuantizedBlocks:
    """Quantize every `block` consecutive values of each row of w (rows, cols) to `bits`-bit codes.

    symmetric: value = d * q, signed q in [-h, h - 1] for h = 2**(bits-1), stored as code = q + h.
      Round-to-nearest is llama.cpp's: for 8 bits Q8_0's (d = amax / 127, so q never reaches -128), below
      that Q4_0's (d = v / -h for v the value of largest magnitude, which lands on q = -h).
    asymmetric: value = d * code + m with code in [0, 2**bits - 1]; round-to-nearest is Q4_1's
      (d = (max - min) / (2**bits - 1), m = min).
    integer_zeros (asymmetric only): m = -d * z for an integer zero point z in [0, 2**bits - 1], so that
      value = d * (code - z) as ONNX MatMulNBits computes it with uint8 zero points; `zeros` holds -d * z.
    With search=False the codes are exactly llama.cpp's (chosen with the float32 d, then d and m are stored
    as float16); with search=True the candidates' codes are chosen with their float16-rounded scales.

    importance: optional weight per column (cols,), e.g. mean squared activations; it only steers the search.
    hessian: optional (cols, cols) second moment of the inputs, E[x xᵀ]: GPTQ error feedback (module
      docstring). Each block's scale (and offset) is chosen from the error-updated weights as above, steered
      by `importance` if given, else by diag(hessian); the codes are then rounded column by column. A
      `gptq.Factor` of it stands for it, so that chunks of a matrix's rows share one factorization.
    threads: rows are quantized in chunks on this many threads (None: every core); the result does not
      depend on it.
    """
    for name, value, low, high in (("bits", bits, 2, 8), ("block", block, 1, None)):
        if not is_int(value) or value < low or (high and value > high):
            allowed = f"from {low} to {high}" if high else f">= {low}"
            raise EdgelmError(f"quantize: {name}={value!r} must be an integer {allowed}")
    if integer_zeros and symmetric:
        raise EdgelmError("quantize: integer zero points are for asymmetric blocks (symmetric=False)")
    x = _as_matrix(w, block, f"block size {block}")
    weights = _as_importance(importance, x.shape[1])
    store = _integer_zero_store(bits) if integer_zeros else _f16_store
    if hessian is None:
        parts = over_row_chunks(
            lambda rows: _blocks_rows(rows, bits, block, symmetric, weights, search, store), x, threads
        )
        codes, scales, zeros = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return QuantizedBlocks(codes, scales, None if symmetric else zeros, bits, block)
    lo = -(1 << (bits - 1)) if symmetric else 0
    hi = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1

    def fit(group: np.ndarray, group_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        _, s, m = _blocks_rows(group, bits, block, symmetric, group_weights, search, store)  # (rows, 1)
        return np.broadcast_to(s, group.shape), np.broadcast_to(m, group.shape), (s, m)

    steer = None if importance is None else weights
    codes, fitted = _error_feedback_rows(x, hessian, steer, block, lo, hi, fit)
    scales, zeros = (np.concatenate(arrays, axis=1) for arrays in zip(*fitted, strict=True))
    return QuantizedBlocks(codes, scales, None if symmetric else zeros, bits, block)


def quantize_q4_k(
    w: np.ndarray,
    importance: np.ndarray | None = None,
    search: bool = True,
    hessian: np.ndarray | gptq.Factor | None = None,
    threads: int | None = None,
) -> Q4KBlocks:
    """Quantize w (rows, cols) to GGUF Q4_K; cols must be a multiple of 256.

    Each sub-block of 32 is fitted as scale * q - min with q in [0, 15] and scale, min >= 0 (round-to-nearest:
    min = -min(x, 0), scale = (max(x) - min(x, 0)) / 15); the 8 scales and 8 mins of a super-block are then
    rounded to 6 bits against d = max(scales) / 63 and dmin = max(mins) / 63, and the codes are chosen again
    with the final float16 values, as llama.cpp's quantize_row_q4_K_ref does (which fits the sub-blocks by
    its own search). search=True fits the sub-blocks by the grid search and keeps, per super-block,
    whichever result has the lower error.

    hessian: GPTQ error feedback as in quantize_blocks, with all scales and mins of a super-block of 256
    chosen at its start. threads: as in quantize_blocks.
    """
    x = _as_matrix(w, QK_K, "Q4_K super-block size 256")
    weights = _as_importance(importance, x.shape[1])
    if hessian is None:
        return concat_rows(over_row_chunks(lambda rows: _q4_k_rows(rows, weights, search), x, threads))
    steer = None if importance is None else weights

    def fit(group: np.ndarray, group_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, Q4KBlocks]:
        r = _q4_k_rows(group, group_weights, search)
        step = np.repeat(r.d, 8, axis=1) * r.scales.astype(np.float32)  # (rows, 8)
        offset = -(np.repeat(r.dmin, 8, axis=1) * r.mins.astype(np.float32))
        return np.repeat(step, 32, axis=1), np.repeat(offset, 32, axis=1), r

    codes, fitted = _error_feedback_rows(x, hessian, steer, QK_K, 0, 15, fit)
    return replace(concat_columns(fitted), codes=codes)


def quantize_q6_k(
    w: np.ndarray,
    importance: np.ndarray | None = None,
    search: bool = True,
    hessian: np.ndarray | gptq.Factor | None = None,
    threads: int | None = None,
) -> Q6KBlocks:
    """Quantize w (rows, cols) to GGUF Q6_K; cols must be a multiple of 256.

    Each sub-block of 16 is fitted as scale * q with q in [-32, 31] (round-to-nearest: scale = v / -32 for v
    the value of largest magnitude); the 16 scales of a super-block are rounded to int8 against
    d = s / -128 for s the scale of largest magnitude, and the codes are chosen again with the final float16
    d, as llama.cpp's quantize_row_q6_K_ref does (which fits the sub-blocks by its own search). search=True
    as for quantize_q4_k. hessian, threads: as for quantize_q4_k.
    """
    x = _as_matrix(w, QK_K, "Q6_K super-block size 256")
    weights = _as_importance(importance, x.shape[1])
    if hessian is None:
        return concat_rows(over_row_chunks(lambda rows: _q6_k_rows(rows, weights, search), x, threads))
    steer = None if importance is None else weights

    def fit(group: np.ndarray, group_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, Q6KBlocks]:
        r = _q6_k_rows(group, group_weights, search)
        step = np.repeat(r.d, 16, axis=1) * r.scales.astype(np.float32)  # (rows, 16)
        return np.repeat(step, 16, axis=1), np.zeros(group.shape, np.float32), r

    codes, fitted = _error_feedback_rows(x, hessian, steer, QK_K, -32, 31, fit)
    return replace(concat_columns(fitted), codes=codes)


# ------------------------------------------------------------------------------------- one chunk of rows


def _blocks_rows(
    w: np.ndarray, bits: int, block: int, symmetric: bool, weights: np.ndarray, search: bool, store: Store
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_blocks on a few rows: codes (rows, cols), scales and offsets (rows, cols // block)."""
    rows, cols = w.shape
    x = w.reshape(rows, -1, block)  # (rows, blocks, block)
    if symmetric:
        d, m, q = _nearest_symmetric(x, bits)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        d, m, q = _nearest_asymmetric(x, bits)
        lo, hi = 0, (1 << bits) - 1
    s, stored_m = store(d, m)
    if store is not _f16_store and not symmetric:  # the offset moved: choose the codes again
        q = nearest_codes(x, s, stored_m, lo, hi)
    m = stored_m
    if not (np.isfinite(s).all() and np.isfinite(m).all()):
        raise EdgelmError(
            f"quantize: weights as large as {np.abs(w).max():g} overflow the float16 scales and offsets "
            "(GGUF stores them as float16; rescale the weights or keep this tensor unquantized)"
        )
    if search:
        s, m, q = search_scales(x, weights.reshape(-1, block), s, m, q, lo, hi, store)
    codes = (q - lo).astype(np.uint8)  # symmetric: q + 2**(bits-1); asymmetric: q itself (lo = 0)
    return codes.reshape(rows, cols), s[..., 0], m[..., 0]


def _q4_k_rows(w: np.ndarray, weights: np.ndarray, search: bool) -> Q4KBlocks:
    """quantize_q4_k on a few rows."""
    x = w.reshape(w.shape[0], -1, 8, 32)  # (rows, super-blocks, sub-blocks, 32)
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)  # value = scale * q + lo, lo <= 0
    scale = (x.max(axis=-1, keepdims=True) - lo) / np.float32(15)
    result = _q4_k_finish(x, scale, lo)
    if search:
        q = nearest_codes(x, scale, lo, 0, 15)
        scale, lo, _ = search_scales(x, weights.reshape(-1, 8, 32), scale, lo, q, 0, 15, None, offset_max=0.0)
        result = _lower_error(w, weights, result, _q4_k_finish(x, scale, lo))
    return result


def _q4_k_finish(x: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> Q4KBlocks:
    """Round sub-block scales and mins (..., 8, 1) to 6 bits, then choose the codes with the final values."""
    rows = x.shape[0]
    sc, d = _six_bits(scale[..., 0])  # (rows, super-blocks, 8), (rows, super-blocks, 1)
    mn, dmin = _six_bits(-lo[..., 0])
    d, dmin = _f16(d), _f16(dmin)
    step, offset = (d * sc)[..., None], (dmin * mn)[..., None]
    q = np.clip(np.rint(divide(x + offset, step)), 0, 15)  # llama.cpp divides here
    return Q4KBlocks(
        q.astype(np.uint8).reshape(rows, -1),
        sc.astype(np.uint8).reshape(rows, -1),
        mn.astype(np.uint8).reshape(rows, -1),
        d.reshape(rows, -1),
        dmin.reshape(rows, -1),
    )


def _six_bits(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative v (..., 8) → 6-bit codes round(v * 63 / max v) and the float32 step max v / 63."""
    top = v.max(axis=-1, keepdims=True)
    return np.clip(np.rint(divide(np.float32(63), top) * v), 0, 63), top / np.float32(63)


def _q6_k_rows(w: np.ndarray, weights: np.ndarray, search: bool) -> Q6KBlocks:
    """quantize_q6_k on a few rows."""
    x = w.reshape(w.shape[0], -1, 16, 16)  # (rows, super-blocks, sub-blocks, 16)
    scale = _signed_peak(x) / np.float32(-32)
    result = _q6_k_finish(x, scale)
    if search:
        zero = np.zeros_like(scale)
        q = nearest_codes(x, scale, zero, -32, 31)
        scale, _, _ = search_scales(x, weights.reshape(-1, 16, 16), scale, zero, q, -32, 31, None)
        result = _lower_error(w, weights, result, _q6_k_finish(x, scale))
    return result


def _q6_k_finish(x: np.ndarray, scale: np.ndarray) -> Q6KBlocks:
    """Round sub-block scales (..., 16, 1) to int8 under a float16 d, then choose the codes with those."""
    rows = x.shape[0]
    s = scale[..., 0]  # (rows, super-blocks, 16)
    inverse = divide(np.float32(-128), _signed_peak(s))  # the largest |scale| becomes -128
    d = _f16(divide(np.float32(1), inverse))
    sc = np.minimum(np.rint(inverse * s), 127)  # >= -128, since no |scale| exceeds the peak's
    q = np.clip(np.rint(divide(x, (d * sc)[..., None])), -32, 31) + 32
    codes, scales = q.astype(np.uint8).reshape(rows, -1), sc.astype(np.int8).reshape(rows, -1)
    return Q6KBlocks(codes, scales, d.reshape(rows, -1))


# ------------------------------------------------------------------------------ GPTQ error feedback


def _error_feedback_rows(
    x: np.ndarray,
    hessian: np.ndarray | gptq.Factor,
    importance: np.ndarray | None,
    group: int,
    lo: int,
    hi: int,
    fit: GroupFit,
) -> tuple[np.ndarray, list]:
    """`gptq.error_feedback` over chunks of rows: the codes as stored, code - lo as uint8 (rows, cols), and,
    per group of columns, the fits of the chunks joined along the rows (arrays by np.concatenate, K-quant
    results by concat_rows). The groups' scales are steered by `importance` if given, else by
    diag(hessian), else (nothing measured) evenly."""

    factor = gptq.factor_of(hessian, x.shape[1])
    diagonal = factor.diagonal
    weights = importance if importance is not None else diagonal if diagonal.any() else np.ones_like(diagonal)
    codes = np.empty(x.shape, np.uint8)
    chunk_fits = []
    for rows in row_chunks(x, _GPTQ_CHUNK_VALUES):
        signed, fits = gptq.error_feedback(x[rows], factor.u, weights, group, lo, hi, fit)
        codes[rows] = signed - lo
        chunk_fits.append(fits)
    fitted = []
    for group_fits in zip(*chunk_fits, strict=True):  # one group of columns, all chunks of rows
        if isinstance(group_fits[0], tuple):
            fitted.append(tuple(np.concatenate(arrays) for arrays in zip(*group_fits, strict=True)))
        else:
            fitted.append(concat_rows(list(group_fits)))
    return codes, fitted


# ---------------------------------------------------------------------------------- rounding and search


def _nearest_symmetric(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference round-to-nearest: Q8_0's for 8 bits, Q4_0's (and Q5_0's) below.

    x (..., block) → float32 scale d (..., 1), offset 0 (..., 1), signed codes q (..., block) as float32.
    """
    zero = np.zeros((*x.shape[:-1], 1), np.float32)
    if bits == 8:
        d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
        return d, zero, _round_half_away(x * divide(np.float32(1), d))
    half = 1 << (bits - 1)
    d = _signed_peak(x) / np.float32(-half)
    # C: MIN(2*half - 1, (int8_t)(x*id + half + 0.5f)), a truncation of a value >= 0
    q = np.clip(np.trunc(x * divide(np.float32(1), d) + np.float32(half + 0.5)), 0, 2 * half - 1)
    return d, zero, q - half


def _nearest_asymmetric(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference round-to-nearest for Q4_1 (and Q5_1): d = (max - min) / top, m = min."""
    top = (1 << bits) - 1
    m = x.min(axis=-1, keepdims=True)
    d = (x.max(axis=-1, keepdims=True) - m) / np.float32(top)
    q = np.minimum(np.trunc((x - m) * divide(np.float32(1), d) + np.float32(0.5)), top)
    return d, m, q


def _squared_error(x: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted squared error per block (..., 1) of the float32 values a consumer computes (a sum of
    non-negative float32 terms, as float64)."""
    diff = values - x
    weighted = diff * np.asarray(weights, np.float32)
    return np.einsum("...i,...i->...", weighted, diff)[..., None].astype(np.float64)


KBlocks = TypeVar("KBlocks", "Q4KBlocks", "Q6KBlocks")  # _lower_error returns the type it is given


def _lower_error(w: np.ndarray, weights: np.ndarray, a: KBlocks, b: KBlocks) -> KBlocks:
    """Per super-block of w (rows, cols), a's arrays or b's, whichever dequantizes with the lower error."""
    rows = w.shape[0]
    by_super_block = (rows, w.shape[1] // QK_K, -1)
    x, weights = w.reshape(by_super_block), weights.reshape(-1, QK_K)
    a_error, b_error = (_squared_error(x, r.dequantize().reshape(by_super_block), weights) for r in (a, b))
    b_wins = b_error < a_error  # (rows, super-blocks, 1)
    picked = {}
    for field in fields(a):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        picked[field.name] = np.where(b_wins, vb.reshape(by_super_block), va.reshape(by_super_block))
    return type(a)(**{name: v.reshape(rows, -1) for name, v in picked.items()})


# ------------------------------------------------------------------------------------------------ helpers


def _f16_store(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and offset as GGUF keeps them: float16."""
    return _f16(scale), _f16(offset)


def _integer_zero_store(bits: int) -> Store:
    """Scale as float16, the offset as -scale * z for the nearest integer zero point z in [0, 2**bits - 1]."""

    def store(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = _f16(scale)
        z = np.clip(np.rint(divide(-offset, s)), 0, (1 << bits) - 1)
        return s, -s * z

    return store


def _f16(v: np.ndarray) -> np.ndarray:
    """v rounded to the nearest float16 (ties to even, as ggml's conversion), returned as float32."""
    with np.errstate(over="ignore"):  # overflow becomes inf; callers that must not store inf check
        return v.astype(np.float16).astype(np.float32)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: to the nearest integer, halves away from zero (np.rint would round them to even)."""
    magnitude = np.abs(v)
    whole = np.floor(magnitude)
    return np.copysign(whole + (magnitude - whole >= 0.5), v)


def _signed_peak(v: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis, sign kept (the first one on a tie), keepdims."""
    return np.take_along_axis(v, np.abs(v).argmax(axis=-1)[..., None], axis=-1)


def _as_matrix(w: np.ndarray, multiple: int, what: str) -> np.ndarray:
    """w as a float32 matrix (rows, cols) with cols a multiple of `multiple`, or a clear EdgelmError."""
    x = np.asarray(w)
    if x.ndim != 2 or x.size == 0:
        raise EdgelmError(f"quantize: expected a non-empty 2-D matrix (rows, cols), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise EdgelmError(f"quantize: expected float weights, got dtype {x.dtype}")
    if x.shape[1] % multiple:
        raise EdgelmError(
            f"quantize: a row of {x.shape[1]} values is not a whole number of blocks of the {what} "
            f"(pad the rows to a multiple of {multiple}, or leave this tensor unquantized)"
        )
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x.sum(dtype=np.float64)):  # one pass, without a temporary the size of w
        raise EdgelmError("quantize: the weights contain NaN or infinity (check the checkpoint)")
    return x


def _as_importance(importance: np.ndarray | None, cols: int) -> np.ndarray:
    """The per-column weights (cols,) as float64: ones by default, else finite and >= 0."""
    if importance is None:
        return np.ones(cols)
    weights = np.asarray(importance, dtype=np.float64)
    if weights.shape != (expected := (cols,)):
        raise EdgelmError(f"quantize: importance has shape {weights.shape}, expected {expected} (per column)")
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise EdgelmError("quantize: importance must be finite and >= 0 (e.g. mean squared activations)")
    return weights
