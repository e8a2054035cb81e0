"""`edgelm.load` and `Model`: an artifact, its tokenizer and a runtime behind one small object."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgelm.generate import stream_text
from edgelm.runtimes.base import Runtime, open_runtime
from edgelm.sampling import SamplingParams


class Model:
    """A loaded model. `runtime` is the Runtime protocol underneath; `tokenizer` and `config` are its own."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.config = runtime.config
        # a runtime holds one sequence: generations from several threads take turns, whole
        self._lock = threading.Lock()

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is generated. Other threads' calls on
        this model wait until the stream is exhausted or closed."""
        params = SamplingParams(temperature, top_k, top_p)
        return self._locked(stream_text(self.runtime, prompt, max_new_tokens, params, seed, stop))

    def _locked(self, pieces: Iterator[str]) -> Iterator[str]:
        with self._lock:
            yield from pieces

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> str:
        """The continuation of `prompt` (without the prompt). temperature=0 is greedy."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop))

    def close(self) -> None:
        """Release the runtime and its memory."""
        self.runtime.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | Path, runtime: str = "auto", device: str = "auto", **options: Any) -> Model:
    """Load a checkpoint directory, ONNX folder or GGUF file; runtime and device are chosen when "auto"."""
    return Model(open_runtime(Path(path), runtime=runtime, device=device, **options))
