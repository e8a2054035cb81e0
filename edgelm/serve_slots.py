"""The server's slots: models of the same artifact, each keeping one conversation's KV cache and running
its generations one at a time in a worker thread of its own, and the choice of a slot for each request.

A request goes to a slot with nothing to do whose runtime holds the longest prefix of its prompt (the same
conversation's last turn, usually), the least recently chosen among equals; when every slot has work, to
the one with the longest prefix, then the fewest requests waiting, where it waits its turn. Slots run at
once (the engines release Python's lock while they compute).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from edgelm.errors import EdgelmError
from edgelm.generation.api import Model


@dataclass
class Slot:
    """One slot: its model, the thread its generations run in, the requests chosen for it and not yet
    ended (`pending`), and when it was last chosen."""

    model: Model
    worker: ThreadPoolExecutor
    pending: int = 0
    chosen: int = 0


class Slots:
    """`models`: one per slot, all of the same artifact (the same tokenizer and context)."""

    def __init__(self, models: Sequence[Model]) -> None:
        if not models:
            raise EdgelmError("the server needs at least one slot")
        self.slots = [
            Slot(model, ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edgelm-slot-{i}"))
            for i, model in enumerate(models)
        ]
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def first(self) -> Model:
        """The first slot's model: the artifact's tokenizer and config, as every slot has them."""
        return self.slots[0].model

    def choose(self, prompt_ids: Sequence[int]) -> tuple[Slot, Callable[[], None]]:
        """The slot for a prompt (see the module doc), and the call that says its request has ended (once
        or more: only the first counts)."""
        with self._lock:

            def merit(slot: Slot) -> tuple[bool, int, int, int]:
                reuse = slot.model.reusable(prompt_ids) if len(self.slots) > 1 else 0
                return slot.pending == 0, reuse, -slot.pending, -slot.chosen

            slot = max(self.slots, key=merit)
            slot.pending += 1
            slot.chosen = next(self._clock)
        ended = threading.Event()

        def end() -> None:
            with self._lock:
                if not ended.is_set():
                    ended.set()
                    slot.pending -= 1

        return slot, end

    def shutdown(self) -> None:
        """Stop the worker threads (a generation running finishes its current step first)."""
        for slot in self.slots:
            slot.worker.shutdown(wait=False, cancel_futures=True)
