"""Rotary position embedding frequencies in numpy: shared by the PyTorch model and both exporters."""

from __future__ import annotations

import math

import numpy as np

from edgelm.model.config import ModelConfig
from edgelm.model.rope_scaling import LinearRopeScaling, Llama3RopeScaling, LongRopeScaling


def uses_long_factors(config: ModelConfig, length: int) -> bool:
    """Whether a sequence of `length` tokens (the ones before it included) rotates with LongRoPE's long
    factors: once it passes the original context, as transformers decides at each forward (for the keys
    already cached too: see `changes_earlier_rotation`)."""
    scaling = config.rope_scaling
    return isinstance(scaling, LongRopeScaling) and length > scaling.original_max_position_embeddings


def changes_earlier_rotation(config: ModelConfig, position: int, n: int) -> bool:
    """Whether n tokens appended after `position` others take the sequence past LongRoPE's original
    context, so that the keys already cached were rotated with the short factors and all of them now take
    the long ones. A runtime then computes the whole sequence again, as transformers' generation does
    (Phi-3's `prepare_inputs_for_generation` drops the cache there), and as a single forward over it
    computes."""
    crossing = uses_long_factors(config, position + n) and not uses_long_factors(config, position)
    return position > 0 and crossing


def rope_frequencies(config: ModelConfig, local: bool = False, length: int = 0) -> np.ndarray:
    """The rotation frequency of each rotated pair of dimensions, float32 (rotary_dim/2,), the config's
    scaling applied for a sequence of `length` tokens (LongRoPE's factors depend on it); with `local`,
    those of Gemma 3's sliding layers (their own base, no scaling).

    Computed in float32 in the order transformers uses, so that the PyTorch model matches it; the power is
    taken in float64 and rounded, which gives torch's float32 power (numpy's float32 one is off by a unit
    in the last place for a tenth of the pairs).
    """
    d = config.rotary_dim
    theta = config.rope_local_theta if local and config.rope_local_theta is not None else config.rope_theta
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    powers = np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)
    scaling = None if local and config.rope_local_theta is not None else config.rope_scaling
    if isinstance(scaling, LongRopeScaling):  # each pair's own divisor
        factors = scaling.long_factor if uses_long_factors(config, length) else scaling.short_factor
        divisors = np.asarray(factors, np.float32)
        return (np.float32(1.0) / (divisors * powers)).astype(np.float32)
    inv_freq = np.float32(1.0) / powers
    if isinstance(scaling, LinearRopeScaling):
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if isinstance(scaling, Llama3RopeScaling):
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: np.ndarray, scaling: Llama3RopeScaling) -> np.ndarray:
    """Llama 3: keep short wavelengths, slow long ones by `factor`, interpolate between (as transformers
    does)."""
    original = scaling.original_max_position_embeddings
    wavelength = np.float32(2 * math.pi) / inv_freq
    slowed = np.where(
        wavelength > original / scaling.low_freq_factor, inv_freq / np.float32(scaling.factor), inv_freq
    )
    smooth = (np.float32(original) / wavelength - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * slowed / np.float32(scaling.factor) + smooth * slowed
    medium = (wavelength >= original / scaling.high_freq_factor) & (
        wavelength <= original / scaling.low_freq_factor
    )
    return np.where(medium, smoothed, slowed).astype(np.float32)


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: LongRoPE's attention factor, 1 elsewhere."""
    scaling = config.rope_scaling
    return scaling.attention_factor if isinstance(scaling, LongRopeScaling) else 1.0


def rope_cos_sin(config: ModelConfig, positions: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the angles of positions 0..positions-1 in a sequence of that length, float32
    (positions, rotary_dim/2) each: one column per pair (`local`: of Gemma 3's sliding layers), times the
    attention factor."""
    frequencies = rope_frequencies(config, local, length=positions)
    angles = np.arange(positions, dtype=np.float32)[:, None] * frequencies[None, :]
    factor = np.float32(rope_attention_factor(config))
    return np.cos(angles) * factor, np.sin(angles) * factor
