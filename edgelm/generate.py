"""The generation loop over any Runtime: prefill, decode, stop (EOS, length, stop string), stream text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.runtimes.base import Runtime
from edgelm.sampling import SamplingParams, sample


def generate_ids(
    runtime: Runtime,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    seed: int | None = None,
    eos_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield new token ids until an EOS id (not yielded), `max_new_tokens`, or the end of the context."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise EdgelmError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    context = runtime.config.max_position_embeddings
    if not prompt_ids:
        raise EdgelmError("the prompt has no tokens")
    if len(prompt_ids) > context:
        raise EdgelmError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of "
            f"{context}; shorten it"
        )
    rng = np.random.default_rng(seed)
    runtime.reset()
    if max_new_tokens == 0:
        return
    logits = runtime.forward(prompt_ids)
    position = len(prompt_ids)
    for produced in range(max_new_tokens):
        token = sample(logits[-1], params, rng)
        if token in eos_ids:
            return
        yield token
        position += 1
        if produced + 1 == max_new_tokens or position >= context:
            return
        logits = runtime.forward([token])


def stream_text(
    runtime: Runtime,
    prompt: str,
    max_new_tokens: int,
    params: SamplingParams,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> Iterator[str]:
    """Yield the generated text in pieces; never half a character, never any part of a stop string."""
    stop = _check_stop(stop)
    tokenizer = runtime.tokenizer
    prompt_ids = tokenizer.encode(prompt, add_bos=True)
    eos_ids = sorted({*runtime.config.eos_token_ids, *tokenizer.eos_ids})
    decoder = tokenizer.stream_decoder()
    pending = ""
    for token in generate_ids(runtime, prompt_ids, max_new_tokens, params, seed, eos_ids):
        pending += decoder.push(token)
        cut = _first_stop(pending, stop)
        if cut is not None:
            if pending[:cut]:
                yield pending[:cut]
            return
        # hold back a tail that could still grow into a stop string
        ready = len(pending) - _partial_stop_length(pending, stop)
        if ready:
            yield pending[:ready]
            pending = pending[ready:]
    pending += decoder.flush()
    cut = _first_stop(pending, stop)
    pending = pending if cut is None else pending[:cut]
    if pending:
        yield pending


def _check_stop(stop: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if any(not isinstance(s, str) or not s for s in stop):
        raise EdgelmError(f"stop strings must be non-empty strings, got {list(stop)!r}")
    return tuple(stop)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string begins in `text`, if any."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
