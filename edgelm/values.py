"""Checks of values that come from outside (config.json, GGUF metadata, API and HTTP arguments).

JSON's `true` is a Python bool, and bool is a subclass of int: every "is this an integer" check in edgelm
goes through `is_int`, so that `"num_hidden_layers": true` is refused rather than read as 1.
"""

from __future__ import annotations

import math
from types import UnionType
from typing import Any, TypeGuard, Union, get_args, get_origin

import numpy as np

from edgelm.errors import EdgelmError


def is_int(value: object) -> TypeGuard[int | np.integer]:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    """An integer or a float, not a bool."""
    return is_int(value) or isinstance(value, (float, np.floating))


def matches(value: object, hint: Any) -> bool:
    """Whether `value` is of the type `hint` names: int (not bool), float (any number but bool), bool, str,
    None, tuple[X, ...], a union of those, or a class (isinstance)."""
    if get_origin(hint) in (Union, UnionType):
        return any(matches(value, option) for option in get_args(hint))
    if get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(matches(v, get_args(hint)[0]) for v in value)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """The type `hint` names, in words for an error message: "an integer or a list of integers"."""
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(describe(option) for option in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {describe(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def number(value: object, name: str, where: str) -> float:
    """`value` as a float, where it is a finite number; else an EdgelmError naming `name`."""
    if not is_number(value) or not math.isfinite(value):
        raise EdgelmError(f"{where}: {name}={value!r} must be a finite number")
    return float(value)
