"""RoPE frequency scalings a config.json may name: Llama 3's, linear interpolation and Phi-3's LongRoPE."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.values import is_int


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (`"rope_type": "llama3"`), as transformers computes it.

    Wavelengths shorter than original_max_position_embeddings / high_freq_factor keep their frequency,
    those longer than original_max_position_embeddings / low_freq_factor are slowed by `factor`, and the
    ones between are interpolated smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not self.factor > 0 or not 0 < self.low_freq_factor < self.high_freq_factor:
            raise EdgelmError(
                f"config: llama3 rope scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, "
                f"got {self.factor}, {self.low_freq_factor}, {self.high_freq_factor}"
            )
        original = self.original_max_position_embeddings
        if not is_int(original) or original <= 0:
            raise EdgelmError(
                f"config: llama3 rope scaling original_max_position_embeddings={original!r} "
                "must be a positive integer"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `rope_scaling` dictionary of config.json."""
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (`"rope_type": "linear"`): every frequency divided by `factor` (Gemma 3's
    global layers from 4 B on)."""

    factor: float

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise EdgelmError(f"config: linear rope scaling factor={self.factor!r} must be positive")

    def to_hf_dict(self) -> dict[str, Any]:
        """The `rope_scaling` dictionary of config.json."""
        return {"rope_type": "linear", "factor": self.factor}


@dataclass(frozen=True)
class LongRopeScaling:
    """Phi-3's LongRoPE (`"rope_type": "longrope"`): each pair's frequency divided by its `short_factor`
    while the sequence is within `original_max_position_embeddings`, by its `long_factor` past it
    (`rope.uses_long_factors`), and cos and sin multiplied by `attention_factor`."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float

    def __post_init__(self) -> None:
        if len(self.short_factor) != len(self.long_factor) or not all(
            f > 0 for f in (*self.short_factor, *self.long_factor)
        ):
            raise EdgelmError(
                "config: longrope short_factor and long_factor must be positive and of one length"
            )
        if not is_int(self.original_max_position_embeddings) or self.original_max_position_embeddings <= 0:
            raise EdgelmError("config: longrope original_max_position_embeddings must be a positive integer")
        if not self.attention_factor > 0:
            raise EdgelmError(f"config: longrope attention_factor={self.attention_factor!r} must be positive")

    def to_hf_dict(self) -> dict[str, Any]:
        """The `rope_scaling` dictionary of config.json (the attention factor written out, as it was
        computed from the context the model was published with)."""
        return {
            "rope_type": "longrope",
            "short_factor": list(self.short_factor),
            "long_factor": list(self.long_factor),
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "attention_factor": self.attention_factor,
        }


RopeScaling = Llama3RopeScaling | LinearRopeScaling | LongRopeScaling
