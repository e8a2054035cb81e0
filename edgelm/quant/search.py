"""The per-block scale search of `edgelm.quant.blocks`: around a round-to-nearest scale, a grid of candidate
scales, each refit by weighted least squares to the codes it gives and scored from the block's sums, without
dequantizing; the block keeps whichever has the lowest weighted squared error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgelm.quant.arith import divide

# scales that move the block's extreme value by up to one quantization level either way
_STEPS = np.linspace(-1.0, 1.0, 11)
# (scale, offset) → the values a format keeps of them
Store = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def search_scales(
    x: np.ndarray,
    weights: np.ndarray,
    s: np.ndarray,
    m: np.ndarray,
    q: np.ndarray,
    lo: int,
    hi: int,
    store: Store | None,
    offset_max: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, the scale, offset and codes with the lowest weighted squared error: the given ones or one
    of a grid of candidates. A scale around s gives codes; weighted least squares refits the scale and, for
    an asymmetric block, the offset to them; `store` rounds the fit as the format keeps it; the error of
    those codes under that fit comes from the block's sums (`_BlockSums`), without the values. The winner's
    codes are then chosen again with its stored scale and offset, and the fit refit to those codes where
    that is better: each step can only lower the error.

    x (..., block); weights broadcast to x; s, m (..., 1); q (..., block) codes in [lo, hi]; value = s*q + m.
    lo < 0 means symmetric (m stays 0). store rounds a candidate's scale and offset to what the format keeps
    (float16; or an integer zero point), None keeps float32. offset_max=0 keeps the offsets <= 0 (K-quants
    subtract a min >= 0).
    """
    symmetric = lo < 0
    sums = _BlockSums(x, weights)

    def refit(codes: np.ndarray) -> tuple[Moments, np.ndarray, np.ndarray]:
        """The codes' sums and their least-squares scale and offset, as the format stores them."""
        moments = sums.moments(codes, symmetric)
        cs, cm = sums.least_squares(moments, symmetric, offset_max)
        return (moments, *store(cs, cm)) if store is not None else (moments, cs, cm)

    best = sums.error(sums.moments(q, symmetric), s, m)
    levels = -lo if symmetric else hi  # the extreme value's code under round-to-nearest
    scaled = (x - m) * divide(np.float32(1), s)  # x in units of the round-to-nearest scale
    codes = np.empty_like(x)
    for step in _STEPS:
        np.multiply(scaled, np.float32((levels + step) / levels), out=codes)
        np.clip(np.rint(codes, out=codes), lo, hi, out=codes)
        moments, cs, cm = refit(codes)
        error = sums.error(moments, cs, cm)
        better = _better(error, best, cs, symmetric)
        best = np.where(better, error, best)
        s, m = np.where(better, cs, s), np.where(better, cm, m)
    moments, cs, cm = refit(nearest_codes(x, s, m, lo, hi))  # the winner refit to its own nearest codes
    better = _better(sums.error(moments, cs, cm), sums.error(moments, s, m), cs, symmetric)
    s, m = np.where(better, cs, s), np.where(better, cm, m)
    return s, m, nearest_codes(x, s, m, lo, hi)


def _better(error: np.ndarray, than: np.ndarray, scale: np.ndarray, symmetric: bool) -> np.ndarray:
    """Where a candidate wins: a lower error, and a scale >= 0 for an asymmetric block (NaN, an undetermined
    fit, never wins)."""
    return (error < than) & (symmetric | (scale >= 0))


Moments = tuple[np.ndarray, np.ndarray, np.ndarray]  # A, B, C of `_BlockSums`, each (..., 1) float64


class _BlockSums:
    """What the search needs of a block to fit and score any codes c: with W = Σw, X = Σw·x, A = Σw·c²,
    B = Σw·x·c and C = Σw·c, the squared error Σw·(s·c + m - x)² is Σw·x² - 2sB - 2mX + s²A + 2smC + m²W,
    whose first term is the same for every candidate and is left out. Equal weights (no importance) are
    left out too: they scale every candidate's error alike. The sums over a block are taken in float32
    (A and C are exact: integer codes) and combined in float64."""

    def __init__(self, x: np.ndarray, weights: np.ndarray) -> None:
        w = np.asarray(weights, np.float32)
        self.weights = None if (w == w.flat[0]).all() else w
        self.wx = x if self.weights is None else x * self.weights
        w_sum = x.shape[-1] if self.weights is None else np.broadcast_to(w, x.shape).sum(-1, keepdims=True)
        self.w_sum = np.asarray(w_sum, np.float64)
        self.wx_sum = self.wx.sum(axis=-1, keepdims=True).astype(np.float64)

    def moments(self, c: np.ndarray, symmetric: bool) -> Moments:
        """A, B and C of codes c (..., block); C is 0 for symmetric blocks, whose offset is 0."""
        wc = c if self.weights is None else c * self.weights
        a, b = (
            np.einsum("...i,...i->...", u, v)[..., None].astype(np.float64)
            for u, v in ((wc, c), (c, self.wx))
        )
        return a, b, np.zeros_like(a) if symmetric else wc.sum(axis=-1, keepdims=True).astype(np.float64)

    def error(self, moments: Moments, s: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Σw·(s·c + m - x)² - Σw·x² per block (..., 1)."""
        a, b, c = moments
        s64, m64 = s.astype(np.float64), m.astype(np.float64)
        return s64 * (s64 * a - 2 * b) + m64 * (2 * s64 * c + m64 * self.w_sum - 2 * self.wx_sum)

    def least_squares(
        self, moments: Moments, symmetric: bool, offset_max: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The scale (and offset) minimizing Σw·(s·c + m - x)² per block, in float32; NaN where the codes
        do not determine them (all equal, or zero weight)."""
        a, b, c = moments
        with np.errstate(divide="ignore", invalid="ignore"):
            through_zero = b / a  # the best scale with the offset fixed at 0
            if symmetric:
                return through_zero.astype(np.float32), np.zeros(through_zero.shape, np.float32)
            det = self.w_sum * a - c * c
            det = np.where(det > 1e-12 * self.w_sum * a, det, np.nan)
            scale, offset = (self.w_sum * b - self.wx_sum * c) / det, (a * self.wx_sum - c * b) / det
        if offset_max is not None:
            clamp = offset > offset_max
            scale, offset = np.where(clamp, through_zero, scale), np.where(clamp, offset_max, offset)
        return scale.astype(np.float32), offset.astype(np.float32)


def nearest_codes(x: np.ndarray, s: np.ndarray, m: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The nearest codes in [lo, hi] for value = s*q + m (0 where s is 0), as float32."""
    return np.clip(np.rint((x - m) * divide(np.float32(1), s)), lo, hi)
