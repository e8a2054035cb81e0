"""GPTQ's error feedback (Frantar et al. 2022): round a matrix's columns left to right and pass each column's
rounding error on to the columns not yet rounded, through the inverse of H = E[x xᵀ], so that the layer's
output error ||(W - Wq) x||², not the weight error, is made small.

`edgelm.quant.blocks` calls this when a quantizer gets `hessian=`; how each group's scales are fitted stays
the quantizer's own (`fit`), so the result has the same codes-and-scales form as without H.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.quant.arith import divide

_DAMPENING = 0.01  # H + 0.01 * mean(diag H) * I before inverting

# group (rows, g) of error-updated weights, their importance (g,) → step and offset per value (rows, g), such
# that value = step * q + offset for a code q in [lo, hi], and what the caller keeps of the fit
GroupFit = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, object]]


def error_feedback(
    x: np.ndarray, factor: np.ndarray, weights: np.ndarray, group: int, lo: int, hi: int, fit: GroupFit
) -> tuple[np.ndarray, list]:
    """GPTQ on x (rows, cols): signed codes (rows, cols) as float32 in [lo, hi], and fit's result per group.

    factor is U (cols, cols), upper triangular with H⁻¹ = Uᵀ U. Column c is rounded on the grid that fit
    chose for its group (from the weights as updated when the group began); its error e = (w_c - value_c) is
    then moved onto the later columns as w_j -= e * U[c, j] / U[c, c], GPTQ's optimal update under H. Within
    a group the update is applied column by column; to the columns after it, once per group (GPTQ's lazy
    batch update).
    """
    rows, cols = x.shape
    w = x.astype(np.float64)  # (rows, cols), updated in place
    codes = np.empty((rows, cols), np.float32)
    fitted = []
    for start in range(0, cols, group):
        end = start + group
        step, offset, kept = fit(w[:, start:end].astype(np.float32), weights[start:end])
        fitted.append(kept)
        errors = np.empty((rows, group))  # scaled errors e / U[c, c]
        for j in range(group):
            c = start + j
            target = w[:, c].astype(np.float32)
            q = np.clip(np.rint(divide(target - offset[:, j], step[:, j])), lo, hi)
            codes[:, c] = q
            errors[:, j] = (w[:, c] - (step[:, j] * q + offset[:, j])) / factor[c, c]
            w[:, c + 1 : end] -= np.outer(errors[:, j], factor[c, c + 1 : end])
        w[:, end:] -= errors @ factor[start:end, end:]
        if not np.isfinite(w).all():
            raise EdgelmError("quantize: the error feedback diverged (check that the hessian is E[x xᵀ])")
    return codes, fitted


def inverse_hessian_factor(hessian: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The upper Cholesky factor U of the dampened H⁻¹ (H⁻¹ = Uᵀ U), float64 (cols, cols), and diag(H).

    H is symmetrized; a dead column (H_cc = 0, an input that is always 0) is decoupled from the others, and
    0.01 * mean(diag H) is added to the diagonal (GPTQ's dampening; 1 if every column is dead).
    """
    h = np.array(hessian, dtype=np.float64)  # a copy
    if h.shape != (cols, cols):
        raise EdgelmError(
            f"quantize: hessian has shape {h.shape}, expected {(cols, cols)} (E[x xᵀ] of the {cols} inputs)"
        )
    if not np.isfinite(h).all():
        raise EdgelmError("quantize: the hessian contains NaN or infinity (check the calibration)")
    h = (h + h.T) / 2
    diagonal = np.diag(h).copy()
    if (diagonal < 0).any():
        raise EdgelmError("quantize: the hessian has a negative diagonal: it is not E[x xᵀ] of some inputs")
    dead = diagonal == 0
    h[dead, :] = 0
    h[:, dead] = 0
    dampening = _DAMPENING * diagonal.mean() if diagonal.any() else 1.0
    h[np.diag_indices(cols)] += dampening
    try:  # each step drops what it came from: two (cols, cols) arrays at a time, not four
        lower = np.linalg.cholesky(h)
        del h
        inverse_lower = np.linalg.inv(lower)  # L⁻¹, so H⁻¹ = L⁻ᵀ L⁻¹
        del lower
        inverse = inverse_lower.T @ inverse_lower
        del inverse_lower
        factor = np.linalg.cholesky(inverse).T
    except np.linalg.LinAlgError:
        raise EdgelmError(
            "quantize: the hessian is not positive semi-definite even after dampening "
            "(give E[x xᵀ] of the inputs, e.g. from edgelm.quant.calibration.activation_covariance)"
        ) from None
    return factor, diagonal
