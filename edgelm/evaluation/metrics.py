"""Accuracy and speed statistics as pure numpy functions, with llama.cpp's names and uncertainties.

The accuracy metrics are those of `llama-perplexity --kl-divergence`, computed over the scored positions of
a set of token windows (see `edgelm.evaluation.check` for which positions are scored):

- PPL = exp(mean NLL of the next token), ± PPL · (standard error of the mean NLL);
- PPL(Q)/PPL(base) = exp(mean NLL(Q) − mean NLL(base)), its ± from both standard errors and their
  covariance (the two NLLs are computed on the same tokens, so they are strongly correlated);
- KLD: KL(P_base ‖ P_Q) at each position in nats: mean ± standard error, median, 99th percentile, maximum;
- same top p: the share of positions where both models' most likely token is the same, ± the binomial
  standard error;
- RMS Δp: the root mean square over positions of Δp = p_Q(next token) − p_base(next token), the change in
  the probability of the token that actually came next, ± by error propagation.

Like llama.cpp, a standard error is reported as 0 when it rests on 10 values or fewer. Every function takes
log-probabilities as `log_probs` returns them (float32, computed in float64), so a model compared with itself
gives exactly KLD 0, same top p 1 and PPL ratio 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean and its uncertainty: ± one standard error of the mean (0 when n ≤ 10, as llama.cpp)."""

    value: float
    error: float


@dataclass(frozen=True)
class Timing:
    """A measurement repeated `runs` times: mean ± sample standard deviation, as llama-bench prints."""

    mean: float
    std: float
    runs: int


@dataclass(frozen=True)
class Accuracy:
    """How far a model's next-token distributions are from the reference's (llama-perplexity's statistics).

    The ppl fields are perplexities, `kld_*` in nats, `same_top_p` and `rms_dp` fractions (llama.cpp prints
    them as percentages).
    """

    positions: int  # scored tokens
    ppl_ref: Estimate  # PPL(base)
    ppl: Estimate  # PPL(Q)
    ppl_ratio: Estimate  # PPL(Q)/PPL(base)
    kld_mean: Estimate
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top_p: Estimate
    rms_dp: Estimate


def log_probs(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, computed in float64 and returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(np.float32)


def kl_divergence(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(P_ref ‖ P) in nats at each position (all axes but the last), from log-probabilities."""
    ref = np.asarray(ref_logp, dtype=np.float64)
    return (np.exp(ref) * (ref - np.asarray(logp, dtype=np.float64))).sum(-1)


@dataclass(frozen=True)
class PositionStats:
    """What the accuracy statistics need from one block of positions: per-position values, 1-D."""

    nll_ref: np.ndarray  # −log p_base(next token)
    nll: np.ndarray  # −log p_Q(next token)
    kld: np.ndarray  # KL(P_base ‖ P_Q)
    same_top: np.ndarray  # bool: the same most likely token

    @staticmethod
    def concatenate(blocks: Sequence[PositionStats]) -> PositionStats:
        """Join blocks (of windows, say) into one."""
        return PositionStats(
            *(np.concatenate([getattr(b, f) for b in blocks]) for f in ("nll_ref", "nll", "kld", "same_top"))
        )


def position_stats(ref_logp: np.ndarray, logp: np.ndarray, next_ids: np.ndarray) -> PositionStats:
    """Per-position NLLs, KL divergence and top-1 agreement of log-probs (…, vocab) against the reference's.

    `next_ids` (…) holds the token that came next at each position.
    """
    ref_logp = np.asarray(ref_logp).reshape(-1, np.shape(ref_logp)[-1])
    logp = np.asarray(logp).reshape(ref_logp.shape)
    ids = np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)
    return PositionStats(
        nll_ref=-np.take_along_axis(ref_logp, ids, -1)[:, 0].astype(np.float64),
        nll=-np.take_along_axis(logp, ids, -1)[:, 0].astype(np.float64),
        kld=kl_divergence(ref_logp, logp),
        same_top=ref_logp.argmax(-1) == logp.argmax(-1),
    )


def mean_and_error(values: np.ndarray) -> Estimate:
    """Mean ± its standard error; the error is 0 for 10 values or fewer (llama.cpp's rule)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    variance = float(((x - mean) ** 2).mean())
    return Estimate(mean, math.sqrt(variance / (x.size - 1)) if variance > 0 and x.size > 10 else 0.0)


def _covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    """Cov(mean a, mean b); 0 below 10 values (llama.cpp's rule)."""
    if a.size < 10:
        return 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.size - 1))


def accuracy(stats: PositionStats) -> Accuracy:
    """llama-perplexity's KL-divergence statistics over the positions of `stats`."""
    n = stats.kld.size
    if n == 0:
        raise ValueError("no scored positions")
    log_ppl, log_ppl_ref = mean_and_error(stats.nll), mean_and_error(stats.nll_ref)
    log_ratio = log_ppl.value - log_ppl_ref.value
    log_ratio_var = (
        log_ppl.error**2 + log_ppl_ref.error**2 - 2 * _covariance_of_means(stats.nll, stats.nll_ref)
    )
    log_ratio_error = math.sqrt(max(log_ratio_var, 0.0))
    ppl = math.exp(log_ppl.value)
    ppl_ref = math.exp(log_ppl_ref.value)
    ratio = math.exp(log_ratio)

    dp = np.exp(-stats.nll) - np.exp(-stats.nll_ref)
    mse = mean_and_error(dp**2)
    rms = math.sqrt(mse.value)
    top = float(stats.same_top.mean())
    return Accuracy(
        positions=n,
        ppl_ref=Estimate(ppl_ref, ppl_ref * log_ppl_ref.error),
        ppl=Estimate(ppl, ppl * log_ppl.error),
        ppl_ratio=Estimate(ratio, ratio * log_ratio_error),
        kld_mean=mean_and_error(stats.kld),
        kld_median=float(np.median(stats.kld)),
        kld_p99=float(np.percentile(stats.kld, 99)),
        kld_max=float(stats.kld.max()),
        same_top_p=Estimate(top, math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0),
        rms_dp=Estimate(rms, 0.5 / rms * mse.error if rms > 0 else 0.0),
    )


def timing(values: Sequence[float]) -> Timing:
    """Mean ± sample standard deviation of repeated measurements (std 0 for a single run)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no measurements")
    return Timing(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))
