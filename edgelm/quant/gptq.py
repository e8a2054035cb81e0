"""GPTQ's error feedback (Frantar et al. 2022): round a matrix's columns left to right and pass each column's
rounding error on to the columns not yet rounded, through the inverse of H = E[x xᵀ], so that the layer's
output error ||(W - Wq) x||², not the weight error, is made small.

`edgelm.quant.blocks` calls this when a quantizer gets `hessian=`; how each group's scales are fitted stays
the quantizer's own (`fit`), so the result has the same codes-and-scales form as without H.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.arith import divide

_DAMPENING = 0.01  # H + 0.01 * mean(diag H) * I before inverting
_BAND = 256  # rows symmetrized at a time
_RUN = 32  # columns whose updates reach each other one by one; later ones get them as a matrix product

# group (rows, g) of error-updated weights, their importance (g,) → step and offset per value (rows, g), such
# that value = step * q + offset for a code q in [lo, hi], and what the caller keeps of the fit
GroupFit = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, object]]


def error_feedback(
    x: np.ndarray, factor: np.ndarray, weights: np.ndarray, group: int, lo: int, hi: int, fit: GroupFit
) -> tuple[np.ndarray, list]:
    """GPTQ on x (rows, cols): signed codes (rows, cols) as float32 in [lo, hi], and fit's result per group.

    factor is U (cols, cols), upper triangular with H⁻¹ = Uᵀ U. Column c is rounded on the grid that fit
    chose for its group (from the weights as updated when the group began); its error e = (w_c - value_c) is
    then moved onto the later columns as w_j -= e * U[c, j] / U[c, c], GPTQ's optimal update under H. A
    column takes the updates of the earlier columns of its run of _RUN when it is rounded, the rest of its
    group gets a run's updates after the run, and the columns after the group a group's (GPTQ's lazy batch
    updates, nested): the same sums, as matrix products.
    """
    rows, cols = x.shape
    w = np.array(x.T, np.float32, order="C")  # (cols, rows): a column's weights contiguous, updated
    codes = np.empty((cols, rows), np.float32)
    fitted = []
    for start in range(0, cols, group):
        end = start + group
        step, offset, kept = fit(np.ascontiguousarray(w[start:end].T), weights[start:end])
        fitted.append(kept)
        step, offset = np.ascontiguousarray(step.T), np.ascontiguousarray(offset.T)  # (group, rows)
        errors = np.empty((group, rows), np.float32)  # scaled errors e / U[c, c], a row per column
        for run in range(start, end, _RUN):
            run_end = min(run + _RUN, end)
            for c in range(run, run_end):
                j = c - start
                column = w[c] - factor[run:c, c] @ errors[run - start : j]  # with the run's updates so far
                q = np.clip(np.rint(divide(column - offset[j], step[j])), lo, hi)
                codes[c] = q
                errors[j] = (column - (step[j] * q + offset[j])) / factor[c, c]
            w[run_end:end] -= factor[run:run_end, run_end:end].T @ errors[run - start : run_end - start]
        if not np.isfinite(errors).all():  # a diverged update reaches every later error
            raise EdgelmError("quantize: the error feedback diverged (check that the hessian is E[x xᵀ])")
        w[end:] -= factor[start:end, end:].T @ errors
    return np.ascontiguousarray(codes.T), fitted


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of a hessian, computed once for a matrix whose rows are quantized in chunks: U and
    diag(H) (`inverse_hessian_factor`)."""

    u: np.ndarray
    diagonal: np.ndarray


def factor_of(hessian: np.ndarray | Factor, cols: int) -> Factor:
    """The hessian's `Factor` (given one, itself)."""
    return hessian if isinstance(hessian, Factor) else Factor(*inverse_hessian_factor(hessian, cols))


def inverse_hessian_factor(hessian: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The upper Cholesky factor U of the dampened H⁻¹ (H⁻¹ = Uᵀ U), float32 (cols, cols), and diag(H)
    as float64.

    H is symmetrized; a dead column (H_cc = 0, an input that is always 0) is decoupled from the others, and
    0.01 * mean(diag H) is added to the diagonal (GPTQ's dampening; 1 if every column is dead). U is R⁻¹
    for H = R Rᵀ with R upper: a factorization and a triangular inverse, both in place in one (cols, cols)
    array, a fifth of the work of inverting H and factoring the inverse.
    """
    h = np.array(hessian, dtype=np.float32)  # a copy, which becomes U
    if h.shape != (cols, cols):
        raise EdgelmError(
            f"quantize: hessian has shape {h.shape}, expected {(cols, cols)} (E[x xᵀ] of the {cols} inputs)"
        )
    if not np.isfinite(h).all():
        raise EdgelmError("quantize: the hessian contains NaN or infinity (check the calibration)")
    for start in range(0, cols, _BAND):  # the upper triangle becomes (H + Hᵀ) / 2, the lower 0 (not read)
        band = slice(start, start + _BAND)
        h[band, start:] = (h[band, start:] + h[start:, band].T) / 2
        h[band, :start] = 0
        h[band, band] = np.triu(h[band, band])
    diagonal = np.diag(h).astype(np.float64)
    if (diagonal < 0).any():
        raise EdgelmError("quantize: the hessian has a negative diagonal: it is not E[x xᵀ] of some inputs")
    dead = diagonal == 0
    h[dead, :] = 0
    h[:, dead] = 0
    dampening = _DAMPENING * diagonal.mean() if diagonal.any() else 1.0
    h[np.diag_indices(cols)] += dampening
    _upper_factor_in_place(h)
    _invert_upper_in_place(h)
    return h, diagonal


def _bands_from_the_end(n: int) -> list[slice]:
    """[n - _BAND, n), [n - 2 _BAND, n - _BAND), ... down to 0."""
    return [slice(max(0, end - _BAND), end) for end in range(n, 0, -_BAND)]


def _upper_factor_in_place(h: np.ndarray) -> None:
    """Overwrite the upper triangle of h (its lower is 0), a positive definite H, with R upper such that
    H = R Rᵀ: Cholesky's algorithm from the last band up (each band's block factored as its reversal)."""
    for band in _bands_from_the_end(h.shape[0]):
        above = slice(0, band.start)
        try:
            h[band, band] = np.linalg.cholesky(h[band, band][::-1, ::-1])[::-1, ::-1]
        except np.linalg.LinAlgError:
            raise EdgelmError(
                "quantize: the hessian is not positive semi-definite even after dampening (give E[x xᵀ] "
                "of the inputs, e.g. from edgelm.quant.calibration.activation_covariance)"
            ) from None
        h[above, band] = h[above, band] @ np.linalg.inv(h[band, band]).T
        for rows in _bands_from_the_end(band.start):  # H above the band, its upper triangle only
            h[rows, rows.start : band.start] -= h[rows, band] @ h[rows.start : band.start, band].T
            h[rows, rows] = np.triu(h[rows, rows])


def _invert_upper_in_place(h: np.ndarray) -> None:
    """Overwrite an upper triangular R (its lower is 0) with R⁻¹, a band of rows at a time from the bottom:
    X_ii = R_ii⁻¹ and X_i,>i = -X_ii R_i,>i X_>i,>i, whose rows below are done."""
    n = h.shape[0]
    for rows in _bands_from_the_end(n):
        after = slice(rows.stop, n)
        diagonal = np.linalg.inv(h[rows, rows])
        h[rows, after] = -diagonal @ (h[rows, after] @ h[after, after])
        h[rows, rows] = diagonal
