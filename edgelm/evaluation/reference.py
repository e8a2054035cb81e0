"""The reference side of the check: the evaluation text, its windows, and the reference's log-probabilities
at the scored positions, computed once and cached on disk. See `edgelm.evaluation.check` for what is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.evaluation.metrics import log_probs
from edgelm.files import read_json, read_text
from edgelm.formats.artifact import artifact_kind
from edgelm.model.config import ModelConfig
from edgelm.runtimes.base import DEFAULT_CONTEXT, DEFAULT_RUNTIME, Runtime, open_runtime, runtime_class
from edgelm.tokenizer import Tokenizer
from edgelm.training.data import DEFAULT_VAL_FRACTION, spread_windows

Progress = Callable[[str, int, int], None]  # (stage, done, total)

CACHE_FORMAT = 1
WINDOW_TOKENS = 4096  # the default number of windows covers about this many tokens (16 windows of 256)
MAX_REFERENCE_BYTES = 2 << 30
FORWARD_CHUNK = 256  # scored positions per forward call: bounds the logits held at once
# runtime options the check uses unless told otherwise: exact keys and values in llama.cpp's KV cache
CHECK_OPTIONS: dict[str, dict[str, Any]] = {"llamacpp": {"kv_cache": "f32"}}


# ---------------------------------------------------------------------------------------------------------
# evaluation text and windows


@dataclass(frozen=True)
class EvaluationText:
    """The text every target is evaluated on, where it came from, and its hash."""

    text: str
    source: str

    @property
    def sha256(self) -> str:
        """Hash of the text's UTF-8 bytes (part of the reference cache's key)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> EvaluationText:
        """A UTF-8 text file; an empty one is refused."""
        path = Path(path)
        text = read_text(path, f"evaluation text {path}")
        if not text.strip():
            raise EdgelmError(f"{path}: the evaluation text is empty; give a file with text in it")
        return cls(text, str(path))


def builtin_evaluation_text(val_fraction: float = DEFAULT_VAL_FRACTION) -> EvaluationText:
    """The held-out documents of the built-in corpus (the standard library), joined by blank lines."""
    from edgelm.training.data import builtin_corpus, read_documents, split_documents

    _, held_out = split_documents(read_documents(builtin_corpus(), skip_undecodable=True), val_fraction)
    text = "\n\n".join(d.text for d in held_out)
    return EvaluationText(text, f"built-in corpus, validation split ({len(held_out)} documents)")


def default_evaluation_text(reference: Path) -> EvaluationText:
    """The built-in corpus's held-out split, with the validation fraction the reference was trained with
    when its run folder says so (a larger fraction would evaluate on training documents)."""
    state = Path(reference) / "trainer_state.json"
    fraction = 0.05
    if state.is_file():
        saved = read_json(state)
        settings = saved.get("train_config") if isinstance(saved, dict) else None
        value = settings.get("val_fraction") if isinstance(settings, dict) else None
        if isinstance(value, float) and 0 < value < 1:
            fraction = value
    return builtin_evaluation_text(fraction)


def evaluation_windows(ids: np.ndarray, ctx: int, max_windows: int, bos_id: int | None) -> np.ndarray:
    """Up to `max_windows` non-overlapping windows (n, ctx) spread evenly over `ids`; the first token of each
    becomes `bos_id` unless it is None."""
    available = len(ids) // ctx
    if available == 0:
        raise EdgelmError(
            f"the evaluation text holds {len(ids)} tokens, fewer than one window of {ctx}; "
            "give a longer text or a smaller --ctx"
        )
    windows = spread_windows(ids, ctx, max_windows)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def scored_range(ctx: int) -> tuple[int, int]:
    """The positions [start, stop) whose next-token prediction is scored: the second half of a window."""
    return ctx // 2, ctx - 1


def default_windows(ctx: int) -> int:
    """Enough windows to cover about WINDOW_TOKENS tokens, at least 2."""
    return max(2, round(WINDOW_TOKENS / ctx))


# ---------------------------------------------------------------------------------------------------------
# running a runtime over the windows


def scored_log_probs(runtime: Runtime, window: np.ndarray) -> np.ndarray:
    """Log-probs (float32, (positions, vocab)) at the scored positions of one window: the first half is fed
    in one call, the scored half in chunks with all logits."""
    start, stop = scored_range(len(window))
    runtime.reset()
    runtime.forward(window[:start].tolist())
    rows = []
    for chunk in range(start, stop, FORWARD_CHUNK):
        logits = runtime.forward(window[chunk : min(chunk + FORWARD_CHUNK, stop)].tolist(), all_logits=True)
        rows.append(log_probs(logits))
    return np.concatenate(rows)


def reference_log_probs(
    runtime: Runtime, windows: np.ndarray, progress: Progress | None = None
) -> np.ndarray:
    """Log-probs (n, positions, vocab) at the scored positions of every window: what the cache stores."""
    rows = []
    for i, window in enumerate(windows):
        if progress:
            progress("reference", i, len(windows))
        rows.append(scored_log_probs(runtime, window))
    if progress:
        progress("reference", len(windows), len(windows))
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# the reference


@dataclass(frozen=True)
class ReferenceInfo:
    """What the reference log-probs were computed from."""

    path: str
    sha256: str
    runtime: str
    device: str
    text_source: str
    text_sha256: str
    text_tokens: int
    ctx: int
    windows: int
    positions: int  # scored tokens
    cache: str | None  # the cache folder, or None when the cache could not be written


@dataclass(frozen=True)
class Reference:
    """The evaluation text, its ids and windows, and the reference's log-probs at the scored positions."""

    text: EvaluationText
    text_ids: np.ndarray  # int32: the whole text as the reference tokenizer encodes it
    windows: np.ndarray  # (n, ctx) int64
    logp: np.ndarray  # (n, positions per window, vocab) float32
    info: ReferenceInfo

    def next_ids(self, index: int) -> np.ndarray:
        """The tokens that follow the scored positions of window `index`."""
        start, stop = scored_range(self.windows.shape[1])
        return self.windows[index, start + 1 : stop + 1]


def artifact_sha256(path: Path) -> str:
    """A checkpoint's `checkpoint_sha256`; for a file its hash; for a folder the hash of its files."""
    from edgelm.checkpoint import checkpoint_sha256

    path = Path(path)
    kind = artifact_kind(path)
    if kind == "checkpoint":
        return checkpoint_sha256(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def default_cache_dir(reference: Path) -> Path:
    """`<reference>/.edgelm-cache`, or beside a reference that is a file."""
    reference = Path(reference)
    return (reference if reference.is_dir() else reference.parent) / ".edgelm-cache"


def compute_reference(
    reference: str | Path,
    text: EvaluationText | None = None,
    ctx: int | None = None,
    windows: int | None = None,
    runtime: str = "auto",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
) -> Reference:
    """The reference's log-probs on the evaluation windows, from the cache when it holds them.

    `reference` is any artifact (normally a checkpoint, run by torch); `text` defaults to the held-out split
    of the built-in corpus; `ctx` to the reference's context length; `windows` to `default_windows(ctx)`.
    """
    path = Path(reference)
    kind = artifact_kind(path)
    text = text or default_evaluation_text(path)
    opened: Runtime | None = None
    if kind == "checkpoint":
        config, tokenizer = ModelConfig.load(path), Tokenizer.load(path)
    else:
        opened = open_checked(path, runtime, device, threads, {})
        config, tokenizer = opened.config, opened.tokenizer
    try:
        ctx = _window_length(ctx, config.max_position_embeddings, str(path))
        ids, chosen, n = choose_windows(text, tokenizer, ctx, windows, config.vocab_size)
        key_fields = {
            "format": CACHE_FORMAT,
            "reference": artifact_sha256(path),
            "runtime": runtime,
            "device": device,
            "text": text.sha256,
            "ctx": ctx,
            "windows": n,
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(path)
        entry = folder / f"reference-{key}"
        cached = _load_cache(entry, chosen, ids)
        if cached is not None:
            logp, meta = cached
            return Reference(text, ids.astype(np.int32), chosen, logp, _reference_info(meta, str(entry)))
        opened = opened or open_checked(path, runtime, device, threads, {})
        logp = reference_log_probs(opened, chosen, progress)
        meta = {
            **key_fields,
            "path": str(path),
            "runtime_name": opened.name,
            "resolved_device": opened.device,
            "text_source": text.source,
            "text_tokens": int(ids.size),
            "vocab_size": int(logp.shape[-1]),
            "windows_used": int(logp.shape[0]),
            "positions": int(logp.shape[0] * logp.shape[1]),
        }
        written = _save_cache(entry, chosen, logp, meta)
        return Reference(
            text, ids.astype(np.int32), chosen, logp, _reference_info(meta, str(entry) if written else None)
        )
    finally:
        if opened is not None:
            opened.close()


def choose_windows(
    text: EvaluationText, tokenizer: Tokenizer, ctx: int, windows: int | None, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The text's ids, its windows of `ctx` tokens, and the window count asked for (`windows`, default
    `default_windows(ctx)`); refuses a text without tokens and log-probs over MAX_REFERENCE_BYTES."""
    ids = np.asarray(tokenizer.encode(text.text), dtype=np.int64)
    if ids.size == 0:
        raise EdgelmError(f"{text.source}: the evaluation text gives no tokens")
    n = default_windows(ctx) if windows is None else windows
    if not isinstance(n, int) or n < 1:
        raise EdgelmError(f"windows={n} must be at least 1")
    chosen = evaluation_windows(ids, ctx, n, tokenizer.bos_id if tokenizer.add_bos else None)
    start, stop = scored_range(ctx)
    size = chosen.shape[0] * (stop - start) * vocab_size * 4
    if size > MAX_REFERENCE_BYTES:
        raise EdgelmError(
            f"the reference log-probs would take {size / 1e9:.1f} GB ({chosen.shape[0]} windows × "
            f"{stop - start} positions × {vocab_size} vocabulary × 4 bytes); "
            "lower --ctx or --windows"
        )
    return ids, chosen, n


def _window_length(ctx: int | None, context: int, where: str) -> int:
    if ctx is None:
        return context
    if not isinstance(ctx, int) or ctx < 4:
        raise EdgelmError(f"ctx={ctx!r}: a window needs at least 4 tokens")
    if ctx > context:
        raise EdgelmError(f"ctx={ctx} is longer than {where}'s context of {context} tokens")
    return ctx


def _reference_info(meta: dict[str, Any], cache: str | None) -> ReferenceInfo:
    return ReferenceInfo(
        path=meta["path"],
        sha256=meta["reference"],
        runtime=meta["runtime_name"],
        device=meta["resolved_device"],
        text_source=meta["text_source"],
        text_sha256=meta["text"],
        text_tokens=meta["text_tokens"],
        ctx=meta["ctx"],
        windows=meta["windows_used"],
        positions=meta["positions"],
        cache=cache,
    )


def _load_cache(entry: Path, windows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, dict] | None:
    """The cached log-probs if `entry` holds a complete cache for these windows; None otherwise."""
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = read_json(entry / "meta.json")
        stored = np.load(entry / "windows.npy")
        logp = np.load(entry / "logp.npy", mmap_mode="r")
    except (EdgelmError, OSError, ValueError):
        return None
    start, stop = scored_range(windows.shape[1])
    if (
        not np.array_equal(stored, windows)
        or meta.get("text_tokens") != ids.size
        or logp.dtype != np.float32
        or logp.shape[:2] != (windows.shape[0], stop - start)
    ):
        return None
    return logp, meta


def _save_cache(entry: Path, windows: np.ndarray, logp: np.ndarray, meta: dict) -> bool:
    """Write the cache folder under a temporary name, then rename it into place; False if it cannot be
    written."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "windows.npy", windows)
        np.save(tmp / "logp.npy", logp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def open_checked(
    path: Path,
    runtime: str,
    device: str,
    threads: int | None,
    options: dict[str, Any],
    window: int | None = None,
) -> Runtime:
    """Open an artifact with the check's options for its runtime; `threads` where the runtime declares it
    takes them, and a context of at least the evaluation `window` where it reserves one."""
    name = DEFAULT_RUNTIME.get(artifact_kind(path), runtime) if runtime == "auto" else runtime
    merged = {**CHECK_OPTIONS.get(name, {}), **options}
    declared = runtime_class(name).options
    if threads is not None and "threads" in declared:
        merged["threads"] = threads
    if window is not None and "context" in declared:
        merged.setdefault("context", max(window, DEFAULT_CONTEXT))
    return open_runtime(path, runtime=name, device=device, **merged)
