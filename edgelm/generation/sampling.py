"""Logits → next token, in numpy: greedy, temperature, top-k, top-p; the seeded random generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.values import is_int, is_number


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.

    The defaults are llama.cpp's.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if not is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise EdgelmError(f"temperature={self.temperature!r} must be a number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise EdgelmError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = no limit)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise EdgelmError(f"top_p={self.top_p!r} must be in (0, 1] (1 = no limit)")


def make_rng(seed: int | None) -> np.random.Generator:
    """The random generator of one generation: the same seed, the same tokens; None seeds it from the OS."""
    if seed is not None and (not is_int(seed) or seed < 0):
        raise EdgelmError(f"seed={seed!r} must be an integer >= 0, or None for a random seed")
    return np.random.default_rng(seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Choose a token id from one row of logits (vocab,)."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    order = np.argsort(-scaled, kind="stable")  # most likely first
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
