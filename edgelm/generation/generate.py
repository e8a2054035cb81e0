"""The generation loop over any Runtime: chunked prefill, decode, stop (EOS, stop ids, length, stop string,
cancellation), and `TextStream`, which turns the token ids into text pieces."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Literal

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.generation.constraint import JsonConstraint
from edgelm.generation.logprobs import TokenLogprob
from edgelm.generation.sampling import SamplingParams, make_rng, sample
from edgelm.runtimes.base import Runtime
from edgelm.tokenizer import Tokenizer
from edgelm.values import is_int

# Why a generation ended: an EOS id, a stop id or a stop string ("stop"); max_new_tokens or the end of the
# context ("length"); a cancel request ("cancelled").
FinishReason = Literal["stop", "length", "cancelled"]

# new tokens a generation asks for when the caller does not say
MAX_NEW_TOKENS = 128

# prompt tokens per forward call during prefill; a cancel request is honoured between chunks
PREFILL_CHUNK = 256


def generate_ids(
    runtime: Runtime,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    seed: int | None = None,
    eos_ids: Sequence[int] = (),
    cancelled: Callable[[], bool] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    observe: Callable[[np.ndarray, int], None] | None = None,
    constraint: JsonConstraint | None = None,
) -> Generator[int, None, FinishReason]:
    """Yield new token ids until an EOS id (not yielded), `max_new_tokens`, the end of the context, or
    `cancelled()` turning true; the generator's return value (StopIteration.value) says which.

    The arguments are checked at once, before anything runs. The prompt goes through the runtime in chunks
    of `prefill_chunk` tokens, and `cancelled` is asked before every forward call (each prefill chunk and
    each decoded token), so a cancel request ends the generation within one token.

    Prefix reuse: the part of the prompt that the runtime's sequence already begins with (`Runtime.held`,
    from earlier generations) is kept (`Runtime.keep`), and only the rest is prefilled.

    `observe(logits, token)` sees each step's logits (vocab,) and the token chosen from them, before the
    token is yielded (an EOS that ends the generation is not). `constraint` masks the logits before each
    token is sampled and follows the tokens chosen (constrained decoding).
    """
    check_max_new_tokens(max_new_tokens)
    prompt = check_prompt(prompt_ids, runtime.config.vocab_size, runtime.config.max_position_embeddings)
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise EdgelmError(f"prefill_chunk={prefill_chunk!r} must be an integer >= 1")
    rng = make_rng(seed)
    return _generate(
        runtime,
        prompt,
        max_new_tokens,
        params,
        rng,
        frozenset(eos_ids),
        cancelled or _never,
        prefill_chunk,
        observe or _ignore,
        constraint,
    )


def _generate(
    runtime: Runtime,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    rng: np.random.Generator,
    eos_ids: frozenset[int],
    cancelled: Callable[[], bool],
    prefill_chunk: int,
    observe: Callable[[np.ndarray, int], None],
    constraint: JsonConstraint | None,
) -> Generator[int, None, FinishReason]:
    context = runtime.config.max_position_embeddings
    if max_new_tokens == 0:
        return "length"
    kept = runtime.keep(reusable_prefix(runtime.held, prompt))
    for start in range(kept, len(prompt), prefill_chunk):
        if cancelled():
            return "cancelled"
        logits = runtime.forward(prompt[start : start + prefill_chunk])  # (1, vocab)
    position = len(prompt)
    for produced in range(1, max_new_tokens + 1):
        token = sample(logits[-1] if constraint is None else constraint.mask(logits[-1]), params, rng)
        if token in eos_ids:
            return "stop"
        observe(logits[-1], token)
        if constraint is not None:
            constraint.accept(token)
        yield token
        position += 1
        if produced == max_new_tokens or position >= context:
            return "length"
        if cancelled():
            return "cancelled"
        logits = runtime.forward([token])
    return "length"


def reusable_prefix(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many of the `prompt`'s ids a sequence holding `held` need not prefill again: the ones they share
    at the start, but never the prompt's last (its logits choose the first new token)."""
    n = max(min(len(held), len(prompt) - 1), 0)
    mismatch = np.flatnonzero(np.asarray(held[:n], np.int64) != np.asarray(prompt[:n], np.int64))
    return int(mismatch[0]) if mismatch.size else n


def _never() -> bool:
    return False


def _ignore(logits: np.ndarray, token: int) -> None:
    pass


class TextStream:
    """The text of a generation, piece by piece: an iterator of str that never splits a character and never
    shows any part of a stop string (a tail that could still grow into one is held back until it cannot).

    `prompt_tokens` is known from the start; `completion_tokens` (tokens generated, an EOS excluded) grows
    as pieces arrive, and so does `logprobs` (one `TokenLogprob` per generated token whose text has been
    shown: not those of a stop string; None where it was not asked for); `finish_reason` is None until the
    end, then "stop", "length" or "cancelled".
    `cancel()` (any thread) ends this generation within one token, or before it starts if it is still
    waiting for its turn; what was generated until then is still yielded. `close()`, or leaving a `with`
    block, abandons the stream. Iterate it from one thread at a time.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        ids: Generator[int, None, FinishReason],
        prompt_tokens: int,
        stop: Sequence[str] | str = (),
        cancel_event: threading.Event | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """`ids`: a generator like `generate_ids`'s; `cancel_event`: the event its `cancelled` watches;
        `logprobs`: the list its `observe` fills, if any."""
        self.prompt_tokens = prompt_tokens
        self._logprobs = logprobs
        self._ends: list[int] = []  # where each generated token's text ends, in characters
        self._shown_chars = 0  # characters shown so far
        self._covered = 0  # tokens whose text has been shown whole
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._cancel_event = cancel_event
        self._pieces = self._run(tokenizer, ids, check_stop(stop))

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """The shown tokens' log-probabilities, where they were asked for."""
        return None if self._logprobs is None else self._logprobs[: self._covered]

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Ask this generation to stop (callable from any thread; it ends normally, within one token)."""
        if self._cancel_event is None:
            raise EdgelmError("this stream was made without a cancel event and cannot be cancelled")
        self._cancel_event.set()

    def close(self) -> None:
        """Stop iterating and release the generation (and the model's lock) now."""
        self._pieces.close()

    def _run(
        self, tokenizer: Tokenizer, ids: Generator[int, None, FinishReason], stop: tuple[str, ...]
    ) -> Generator[str, None, None]:
        decoder = tokenizer.stream_decoder()
        pending = ""
        try:
            while True:
                try:
                    token = next(ids)
                except StopIteration as end:
                    self.finish_reason = end.value
                    break
                self.completion_tokens += 1
                pending += decoder.push(token)
                self._ends.append(self._shown_chars + len(pending))
                cut = _first_stop(pending, stop)
                if cut is not None:
                    self.finish_reason = "stop"
                    if pending[:cut]:
                        yield self._shown(pending[:cut])
                    return
                # hold back a tail that could still grow into a stop string
                ready = len(pending) - _partial_stop_length(pending, stop)
                if ready:
                    yield self._shown(pending[:ready])
                    pending = pending[ready:]
            pending += decoder.flush()
            cut = _first_stop(pending, stop)
            if cut is not None:
                pending, self.finish_reason = pending[:cut], "stop"
            self._shown(pending)
            if cut is None:  # all of it shown, tokens without text of their own too
                self._covered = len(self._ends)
            if pending:
                yield pending
        finally:
            ids.close()

    def _shown(self, text: str) -> str:
        """`text`, counted as shown: the tokens whose text it completes count as covered."""
        self._shown_chars += len(text)
        while self._covered < len(self._ends) and self._ends[self._covered] <= self._shown_chars:
            self._covered += 1
        return text


def stop_token_ids(runtime: Runtime, stop_ids: Sequence[int] = ()) -> list[int]:
    """The ids that end a generation: the config's EOS list (generation_config.json), the tokenizer's, and
    the caller's `stop_ids`."""
    extra = check_stop_ids(stop_ids, runtime.config.vocab_size)
    return sorted({*runtime.config.eos_token_ids, *runtime.tokenizer.eos_ids, *extra})


def check_max_new_tokens(max_new_tokens: object) -> int:
    """`max_new_tokens` as an int >= 0, or a clear error."""
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise EdgelmError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    return int(max_new_tokens)


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, context: int) -> list[int]:
    """The prompt's ids as a list: at least one, each an id of the vocabulary, no more than the context."""
    ids = list(prompt_ids)
    if not all(_is_id(i, vocab_size) for i in ids):
        raise EdgelmError(f"prompt token ids must be integers in [0, {vocab_size})")
    ids = [int(i) for i in ids]
    if not ids:
        raise EdgelmError("the prompt has no tokens")
    if len(ids) > context:
        raise EdgelmError(
            f"the prompt is {len(ids)} tokens, longer than the model's context of {context}; shorten it"
        )
    return ids


def check_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """Stop strings as a tuple: one string or a list of them, none empty."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or any(not isinstance(s, str) or not s for s in stop):
        raise EdgelmError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stop)


def check_stop_ids(stop_ids: Sequence[int] | None, vocab_size: int) -> tuple[int, ...]:
    """Extra stop token ids as a tuple: a list of ids of the vocabulary."""
    if stop_ids is None:
        return ()
    if (
        isinstance(stop_ids, (str, bytes))
        or not isinstance(stop_ids, Sequence)
        or not all(_is_id(i, vocab_size) for i in stop_ids)
    ):
        raise EdgelmError(f"stop_ids must be a list of token ids in [0, {vocab_size}), got {stop_ids!r}")
    return tuple(int(i) for i in stop_ids)


def _is_id(value: object, vocab_size: int) -> bool:
    return is_int(value) and 0 <= int(value) < vocab_size


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
