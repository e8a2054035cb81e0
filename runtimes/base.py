"""The Runtime protocol, the registry of runtimes, and the automatic choice of runtime by artifact.

A plugin adds a runtime through the entry-point group `edgelm.runtimes` (name = "module:Class"); the
class follows `Runtime`, declaring its optional capabilities (`options`, `threads`, `provider`; an empty
set and None say it has none; `held` empty and `keep` resetting say it cannot reuse a prefix), and is
constructed as `Class(path, device=..., **options)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from edgelm.errors import EdgelmError, missing_dependency
from edgelm.formats.artifact import artifact_kind
from edgelm.model.config import DEFAULT_CONTEXT, ModelConfig
from edgelm.model.rope import changes_earlier_rotation
from edgelm.tokenizer import Tokenizer


@runtime_checkable
class Runtime(Protocol):
    """A model loaded for inference that keeps one sequence (its KV cache) between calls.

    Its optional capabilities are declared, not discovered: `options` (the keyword options the constructor
    takes besides `path` and `device`, e.g. "threads"; empty for none), `threads` (the CPU threads it
    computes with, None where it does not say), `provider` (the execution provider that runs it, ONNX
    Runtime's; None elsewhere) and prefix reuse (`held` and `keep`: a runtime that cannot keep part of
    its sequence holds () and resets in `keep`, returning 0).
    """

    name: ClassVar[str]  # "torch", "onnxruntime", "llamacpp"
    artifacts: ClassVar[tuple[str, ...]]  # the artifact kinds it opens, see `artifact_kind`
    options: ClassVar[frozenset[str]]  # the constructor's keyword options besides path and device
    config: ModelConfig
    tokenizer: Tokenizer
    device: str  # resolved: "cpu", "cuda", "mps", ...
    threads: int | None
    provider: str | None

    @property
    def held(self) -> tuple[int, ...]:
        """The ids the sequence holds, whose keys and values are cached (a copy)."""
        ...

    def reset(self) -> None:
        """Forget the sequence: the next `forward` starts at position 0."""

    def keep(self, n: int) -> int:
        """Keep the first `n` tokens of the sequence (at most as many as it holds) and forget the rest, so
        that the next `forward` continues after them; returns how many it kept: fewer, down to 0 (a reset),
        where the engine cannot cut the sequence there."""

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; float32 logits (len(ids), vocab), or (1, vocab) for the last."""

    def close(self) -> None:
        """Release the model's memory; the runtime is not used afterwards."""


class HeldIds:
    """`Runtime.position` and `Runtime.held` from the list of ids a runtime keeps as its sequence grows and
    cuts in `keep` (`_held`); the built-in runtimes share it, and a plugin may."""

    _held: list[int]

    @property
    def position(self) -> int:
        """The number of tokens in the sequence."""
        return len(self._held)

    @property
    def held(self) -> tuple[int, ...]:
        """The ids the sequence holds."""
        return tuple(self._held)


class RuntimeClass(Protocol):
    """A runtime's class: the artifact kinds it opens, and its constructor."""

    artifacts: tuple[str, ...]
    options: frozenset[str]

    def __call__(self, path: Path, *, device: str = "auto", **options: Any) -> Runtime: ...


# name → (module, class, the pip extra that installs its dependency)
BUILTIN_RUNTIMES: dict[str, tuple[str, str, str]] = {
    "torch": ("edgelm.runtimes.torch", "TorchRuntime", "torch"),
    "llamacpp": ("edgelm.runtimes.llamacpp", "LlamaCppRuntime", "llamacpp"),
    "onnxruntime": ("edgelm.runtimes.onnxruntime", "OnnxRuntime", "onnx"),
}
# which built-in runtime opens each artifact kind when none is named
DEFAULT_RUNTIME = {"checkpoint": "torch", "gguf": "llamacpp", "onnx": "onnxruntime"}


def runtime_names() -> list[str]:
    """Built-in runtimes and those that installed plugins add."""
    plugins = [ep.name for ep in entry_points(group="edgelm.runtimes") if ep.name not in BUILTIN_RUNTIMES]
    return [*BUILTIN_RUNTIMES, *sorted(plugins)]


def runtime_class(name: str) -> RuntimeClass:
    """Import a runtime's class by name; a missing dependency names the extra that installs it."""
    if name in BUILTIN_RUNTIMES:
        module_name, class_name, extra = BUILTIN_RUNTIMES[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("edgelm"):
                raise missing_dependency(e.name, extra) from None
            raise
        return getattr(module, class_name)
    for ep in entry_points(group="edgelm.runtimes"):
        if ep.name == name:
            cls = ep.load()
            missing = [a for a in ("name", "artifacts", "options") if not hasattr(cls, a)]
            if missing:
                raise EdgelmError(
                    f"runtime {name!r} ({ep.value}) does not declare {', '.join(missing)} of the Runtime "
                    "protocol (edgelm.runtimes.base.Runtime)"
                )
            return cls
    raise EdgelmError(f"unknown runtime {name!r}; available: {', '.join(runtime_names())}")


def open_runtime(path: Path, runtime: str = "auto", device: str = "auto", **options: Any) -> Runtime:
    """Load an artifact with the named runtime, or with the usual one for its kind when `runtime="auto"`."""
    kind = artifact_kind(Path(path))
    if runtime == "auto":
        if kind not in DEFAULT_RUNTIME:
            raise EdgelmError(f"{path}: no installed runtime opens {kind} artifacts")
        runtime = DEFAULT_RUNTIME[kind]
    cls = runtime_class(runtime)
    if kind not in cls.artifacts:
        raise EdgelmError(
            f"{path}: the {runtime} runtime opens {', '.join(cls.artifacts)} artifacts, not {kind}"
        )
    unknown = sorted(set(options).difference(cls.options))
    if unknown:
        takes = ", ".join(sorted(cls.options)) or "none"
        raise EdgelmError(
            f"the {runtime} runtime takes no option {', '.join(unknown)} (its options: {takes})"
        )
    loaded: object = cls(Path(path), device=device, **options)  # a plugin's class may break its promise
    if not isinstance(loaded, Runtime):
        raise EdgelmError(
            f"the {runtime} runtime does not follow the Runtime protocol (edgelm.runtimes.base.Runtime): "
            "it needs name, artifacts, options, config, tokenizer, device, threads, provider, held, "
            "reset, keep, forward and close"
        )
    return loaded


def reserved_context(context: int | None, config: ModelConfig) -> int:
    """The context such a runtime reserves: `context` (a positive integer) or DEFAULT_CONTEXT, at most the
    model's own."""
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
        raise EdgelmError(f"context={context!r} must be a positive number of tokens")
    return min(context or DEFAULT_CONTEXT, config.max_position_embeddings)


def checked_threads(threads: int | None) -> int | None:
    """`threads` as a runtime takes it: None (the runtime's own choice) or a positive integer."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise EdgelmError(f"threads={threads!r} must be a positive number of threads")
    return threads


def ids_to_run(config: ModelConfig, held: list[int], array: np.ndarray) -> tuple[int, np.ndarray]:
    """The position a forward starts at and the ids it runs, to append `array` to the `held` sequence: the
    new ids after the held ones, or, where they take LongRoPE past its original context, the whole
    sequence from position 0 again (`changes_earlier_rotation`)."""
    if changes_earlier_rotation(config, len(held), array.size):
        return 0, np.concatenate([np.asarray(held, np.int64), array])
    return len(held), array


def keepable(config: ModelConfig, held: int, n: int) -> int:
    """How many of the `held` tokens of a sequence a runtime that caches rotated keys can keep when asked
    for `n`: min(n, held), or 0 where the held ones took LongRoPE past its original context and the first
    n alone would not (their keys were rotated with the long factors, which they would not take now)."""
    n = max(0, min(n, held))
    return 0 if changes_earlier_rotation(config, n, held - n) else n


def check_ids(ids: Sequence[int], vocab_size: int, position: int, context: int) -> np.ndarray:
    """Validate a forward call's ids against the vocabulary and the remaining context."""
    array = np.asarray(ids, dtype=np.int64).reshape(-1)
    if array.size == 0:
        raise EdgelmError("forward() needs at least one token id")
    # a decode step's one id is read without numpy's reductions, a measurable share of a small model's step
    low, high = (int(array[0]),) * 2 if array.size == 1 else (int(array.min()), int(array.max()))
    if low < 0 or high >= vocab_size:
        raise EdgelmError(f"token ids must lie in [0, {vocab_size}); got {low}..{high}")
    if position + array.size > context:
        raise EdgelmError(
            f"the sequence would reach {position + array.size} tokens, past the model's "
            f"context of {context}; call reset() or shorten the input"
        )
    return array
