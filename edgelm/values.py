"""Checks of values that come from outside (config.json, GGUF metadata, API and HTTP arguments).

JSON's `true` is a Python bool, and bool is a subclass of int: every "is this an integer" check in edgelm
goes through `is_int`, so that `"num_hidden_layers": true` is refused rather than read as 1.
"""

from __future__ import annotations

from typing import TypeGuard

import numpy as np


def is_int(value: object) -> TypeGuard[int | np.integer]:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    """An integer or a float, not a bool."""
    return is_int(value) or isinstance(value, (float, np.floating))
