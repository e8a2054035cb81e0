"""The llama.cpp runtime: runs a GGUF file through llama-cpp-python, on CPU, or on the GPU of a CUDA or
Metal build of llama.cpp (all layers offloaded).

The model is opened with llama-cpp-python's `Llama` (mmap, threads, GPU layers), and tokens are decoded
through llama.cpp's own batch API, asking for logits only at the positions the caller wants. One lock per
runtime serializes calls into the llama.cpp context; `edgelm.Model` also holds a lock for a whole
generation, so that two threads' sequences never interleave.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import llama_cpp
import numpy as np

from edgelm.errors import EdgelmError
from edgelm.formats.gguf_config import config_from_gguf
from edgelm.formats.gguf_reader import read_gguf
from edgelm.formats.gguf_tokenizer import tokenizer_from_gguf
from edgelm.runtimes.base import HeldIds, check_ids, checked_threads, reserved_context
from edgelm.runtimes.free_cores import FreeCores

KV_CACHE_TYPES = {"f16": 1, "f32": 0}  # ggml type ids


def resolve_device(device: str) -> str:
    """ "auto" → the GPU of a CUDA or Metal build, else "cpu"; "cuda"/"metal" need such a build."""
    gpu = "metal" if sys.platform == "darwin" else "cuda"
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "auto":
        return gpu if offload else "cpu"
    if device == "cpu":
        return "cpu"
    if device.split(":")[0] in ("cuda", "metal", "gpu"):
        if not offload:
            raise EdgelmError(
                f"device {device} requested but this llama-cpp-python has no GPU support; reinstall it with "
                'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
            )
        return gpu
    raise EdgelmError(f"unknown device {device!r} for llama.cpp; use auto, cpu, cuda or metal")


class LlamaCppRuntime(HeldIds):
    """A GGUF file in llama.cpp, with its KV cache holding one sequence."""

    name: ClassVar[str] = "llamacpp"
    artifacts: ClassVar[tuple[str, ...]] = ("gguf",)
    options: ClassVar[frozenset[str]] = frozenset({"threads", "context", "kv_cache"})
    provider: str | None = None

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        threads: int | None = None,
        context: int | None = None,
        kv_cache: str = "f16",
    ) -> None:
        """`threads`: a fixed count, or None: every core that other processes leave free, measured as it
        runs (`FreeCores`). `kv_cache`: "f16", llama.cpp's default, or "f32", exact keys and values for
        accuracy checks."""
        if kv_cache not in KV_CACHE_TYPES:
            raise EdgelmError(f"kv_cache={kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")
        gguf = read_gguf(path)
        self.config = config_from_gguf(gguf.metadata, gguf.tensors, str(path))
        self.tokenizer = tokenizer_from_gguf(gguf.metadata, str(path))
        self.device = resolve_device(device)
        # llama.cpp reserves the KV cache for the whole context up front, and chooses LongRoPE's factors by it
        self.context = reserved_context(context, self.config)
        self.config = dataclasses.replace(self.config, max_position_embeddings=self.context)
        self.threads = checked_threads(threads) or max(1, os.cpu_count() or 1)
        self._free_cores = FreeCores(self.threads) if threads is None else None
        self._running_threads = self.threads
        self._lock = threading.Lock()
        try:
            llama = llama_cpp.Llama(
                str(path),
                n_ctx=self.context,
                n_batch=min(512, self.context),
                n_ubatch=min(512, self.context),
                n_threads=self.threads,
                n_threads_batch=self.threads,
                n_gpu_layers=-1 if self.device != "cpu" else 0,
                use_mmap=True,
                type_k=KV_CACHE_TYPES[kv_cache],
                type_v=KV_CACHE_TYPES[kv_cache],
                verbose=False,
            )
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise EdgelmError(f"{path}: llama.cpp could not load it ({e})") from None
        self._llama: llama_cpp.Llama | None = llama
        self._n_batch = min(512, self.context)
        self._vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama.model))
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._held: list[int] = []  # the sequence's ids, whose keys and values llama.cpp's cache holds

    def reset(self) -> None:
        """Forget the sequence: the next `forward` starts at position 0."""
        self.keep(0)

    def keep(self, n: int) -> int:
        """Keep the first `n` tokens of the sequence and forget the rest (llama.cpp's sequence removal);
        returns how many it kept: 0, after a reset, where llama.cpp cannot remove part of the cache (a
        recurrent model's) or no longer holds the beginning of the kept part (a sliding-window cache)."""
        with self._lock:
            if self._llama is None:
                raise EdgelmError("this runtime has been closed; load the model again")
            kept = max(0, min(n, len(self._held)))
            memory = llama_cpp.llama_get_memory(self._llama.ctx)
            if kept and (
                not llama_cpp.llama_memory_seq_rm(memory, 0, kept, -1)
                or llama_cpp.llama_memory_seq_pos_min(memory, 0) > 0
            ):
                kept = 0
            if not kept:
                llama_cpp.llama_memory_clear(memory, True)
            del self._held[kept:]
            return kept

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; float32 logits (len(ids), vocab), or (1, vocab) for the last."""
        with self._lock:
            llama = self._llama
            if llama is None:
                raise EdgelmError("this runtime has been closed; load the model again")
            array = check_ids(ids, self.config.vocab_size, self.position, self.context)
            rows = []
            for start in range(0, array.size, self._n_batch):
                chunk = array[start : start + self._n_batch]
                last_chunk = start + chunk.size == array.size
                self._fit_threads(llama)
                rows.append(self._decode(llama, chunk, all_logits, last_chunk))
            return np.concatenate(rows) if all_logits else rows[-1]

    def _fit_threads(self, llama: llama_cpp.Llama) -> None:
        """With threads=None, run on the cores other processes leave free now."""
        if self._free_cores is None:
            return
        count = self._free_cores.measure()
        if count != self._running_threads:
            llama_cpp.llama_set_n_threads(llama.ctx, count, count)
            self._running_threads = count

    def _decode(
        self, llama: llama_cpp.Llama, chunk: np.ndarray, all_logits: bool, last_chunk: bool
    ) -> np.ndarray:
        """Decode one batch; logits for every token (all_logits) or for the last of the last chunk."""
        batch = self._batch
        n = chunk.size
        batch.n_tokens = n
        for i, token in enumerate(chunk.tolist()):
            batch.token[i] = token
            batch.pos[i] = self.position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or (last_chunk and i == n - 1)
        status = llama_cpp.llama_decode(llama.ctx, batch)
        if status != 0:
            raise EdgelmError(f"llama.cpp failed to decode (status {status})")
        self._held.extend(chunk.tolist())
        wanted = range(n) if all_logits else [n - 1] if last_chunk else []
        out = np.empty((len(wanted), self._vocab), dtype=np.float32)
        for row, i in enumerate(wanted):
            pointer = llama_cpp.llama_get_logits_ith(llama.ctx, i)
            out[row] = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (self._vocab,)
            )
        return out

    def close(self) -> None:
        """Free the llama.cpp context and model."""
        with self._lock:
            if self._llama is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._llama.close()
                self._llama = None
