"""Float32 arithmetic as llama.cpp's quantizers do it, shared by the block quantizers and GPTQ."""

from __future__ import annotations

import numpy as np


def divide(numerator: np.ndarray | np.float32, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator in float32, 0 where the denominator is 0 (llama.cpp's `d ? 1.0f/d : 0.0f`)."""
    shape = np.broadcast_shapes(np.shape(numerator), denominator.shape)
    out = np.zeros(shape, np.float32)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)
