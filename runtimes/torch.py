"""The PyTorch runtime: runs a checkpoint directory on CPU, CUDA or Apple's MPS."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from edgelm.checkpoint import load_checkpoint
from edgelm.errors import EdgelmError
from edgelm.model.device import resolve_device
from edgelm.model.transformer import Transformer, load_weights
from edgelm.runtimes.base import HeldIds, check_ids, checked_threads, ids_to_run, keepable, reserved_context

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRuntime(HeldIds):
    """edgelm's own model on torch, with a KV cache for one sequence."""

    name: ClassVar[str] = "torch"
    artifacts: ClassVar[tuple[str, ...]] = ("checkpoint",)
    options: ClassVar[frozenset[str]] = frozenset({"dtype", "threads", "context"})
    provider: str | None = None

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        dtype: str = "float32",
        threads: int | None = None,
        context: int | None = None,
    ) -> None:
        """`context`: the most tokens the sequence may hold (default the model's own: the cache grows as
        it needs, reserving nothing up front)."""
        if dtype not in DTYPES:
            raise EdgelmError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if (count := checked_threads(threads)) is not None:
            torch.set_num_threads(count)
        self.threads = torch.get_num_threads()  # torch's intra-op threads: a process-wide setting
        config, tensors, self.tokenizer = load_checkpoint(path)
        bounded = config.max_position_embeddings if context is None else reserved_context(context, config)
        self.config = dataclasses.replace(config, max_position_embeddings=bounded)
        self.device = resolve_device(device)
        with torch.device("meta"):  # no random initialisation: the parameters become the loaded arrays
            model = Transformer(self.config)
        load_weights(model, tensors, assign=True)
        self.model: Transformer | None = model.to(device=self.device, dtype=DTYPES[dtype]).eval()
        self.model.setup_cache(batch=1)
        self._held: list[int] = []  # the sequence's ids, whose keys and values the cache holds

    def reset(self) -> None:
        """Forget the sequence: the next `forward` starts at position 0."""
        self.keep(0)

    def keep(self, n: int) -> int:
        """Keep the first `n` tokens of the sequence and forget the rest; returns how many it kept (the
        cache's later entries are overwritten as the sequence grows again)."""
        self._held = self._held[: keepable(self.config, len(self._held), n)]
        return len(self._held)

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; float32 logits (len(ids), vocab), or (1, vocab) for the last."""
        if self.model is None:
            raise EdgelmError("this runtime has been closed; load the model again")
        array = check_ids(ids, self.config.vocab_size, self.position, self.config.max_position_embeddings)
        start, run = ids_to_run(self.config, self._held, array)
        tokens = torch.from_numpy(run).to(self.device)[None]  # (1, T)
        with torch.inference_mode():
            logits = self.model(tokens, start=start, last_only=not all_logits)  # (1, T or 1, vocab)
        self._held.extend(array.tolist())
        return logits[0, -array.size :].float().cpu().numpy()

    def close(self) -> None:
        """Drop the model's weights and cache."""
        self.model = None
