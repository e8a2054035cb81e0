"""Rotary position embedding frequencies in numpy: shared by the PyTorch model and both exporters."""

from __future__ import annotations

import math

import numpy as np

from edgelm.model.config import ModelConfig
from edgelm.model.rope_scaling import LinearRopeScaling


def rope_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """The rotation frequency of each pair of dimensions, float32 (head_dim/2,), the config's scaling
    applied; with `local`, those of Gemma 3's sliding layers (their own base, no scaling).

    Computed in float32 in the order transformers uses, so that the PyTorch model matches it exactly.
    """
    d = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta is not None else config.rope_theta
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponents)
    scaling = None if local and config.rope_local_theta is not None else config.rope_scaling
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # Llama 3: keep short wavelengths, slow long ones by `factor`, interpolate between (as transformers does)
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


def rope_cos_sin(config: ModelConfig, positions: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every position's angles, float32 (positions, head_dim/2) each: one column per pair
    (`local`: of Gemma 3's sliding layers)."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * rope_frequencies(config, local)[None, :]
    return np.cos(angles), np.sin(angles)
