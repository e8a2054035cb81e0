"""The server's slots: models of the same artifact, each keeping one conversation's KV cache, and the
choice of one for each request.

A request goes to an idle slot whose runtime holds the longest prefix of its prompt (the same
conversation's last turn, usually), the least recently chosen among equals; when every slot is busy, to the
one with the longest prefix, then the least recently chosen, where it waits its turn on that model's lock.
Slots run at once in the server's worker threads (the engines release Python's lock while they compute).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

from edgelm.errors import EdgelmError
from edgelm.generation.api import Model


class Slots:
    """`models`: one per slot, all of the same artifact (the same tokenizer and context)."""

    def __init__(self, models: Sequence[Model]) -> None:
        if not models:
            raise EdgelmError("the server needs at least one slot")
        self.models = list(models)
        self._chosen = [0] * len(models)  # when each slot was last chosen, on `_clock`
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.models)

    def choose(self, prompt_ids: Sequence[int]) -> Model:
        """The slot for a prompt (see the module doc)."""
        with self._lock:

            def merit(i: int) -> tuple[bool, int, int]:
                model = self.models[i]
                return not model.busy, model.reusable(prompt_ids), -self._chosen[i]

            chosen = max(range(len(self.models)), key=merit)
            self._chosen[chosen] = next(self._clock)
            return self.models[chosen]
