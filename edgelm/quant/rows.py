"""Working on a matrix a chunk of rows at a time: bounded temporaries, every core, and the chunks' results
joined again. The quantizers' rows are independent, so the result does not depend on the chunking."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.values import is_int

CHUNK_VALUES = 1 << 20  # values quantized at once: bounds the temporaries to a few tens of MiB
_R = TypeVar("_R")  # what a function of a chunk of rows returns


def over_row_chunks(fn: Callable[[np.ndarray], _R], x: np.ndarray, threads: int | None) -> list[_R]:
    """fn on consecutive chunks of x's rows (at most CHUNK_VALUES values each, and at least one chunk per
    thread), on up to `threads` threads (None: every core; numpy releases the GIL), in row order."""
    if threads is not None and (not is_int(threads) or threads < 1):
        raise EdgelmError(f"quantize: threads={threads!r} must be an integer >= 1")
    workers = int(threads or os.cpu_count() or 1)
    chunks = row_chunks(x, min(CHUNK_VALUES, -(-x.size // workers)))
    if workers == 1 or len(chunks) == 1:
        return [fn(x[rows]) for rows in chunks]
    with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
        return list(pool.map(lambda rows: fn(x[rows]), chunks))


def row_chunks(x: np.ndarray, values: int) -> list[slice]:
    """Slices of about `values` values each, whole rows only."""
    step = max(1, values // x.shape[1])
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


def concat_rows(parts: list) -> Any:
    """One result from results for consecutive chunks of rows (same dataclass, arrays joined along rows)."""
    return type(parts[0])(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(parts[0])))


def concat_columns(parts: list) -> Any:
    """One K-quant result from results for consecutive groups of whole super-blocks (arrays joined along
    the columns)."""
    return type(parts[0])(
        *(np.concatenate([getattr(p, f.name) for p in parts], axis=1) for f in fields(parts[0]))
    )
