"""Log-probabilities of generated tokens, as OpenAI's `logprobs` report them: the chosen token's and the
most likely alternatives' at each step, under the model's own distribution (the softmax of its logits,
before temperature, top-k and top-p, as vLLM and OpenAI report them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.values import is_int

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (`token`, its id) with its log-probability, and the `top` most likely tokens of
    its step with theirs, most likely first (ties: the lower id first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def check_top_logprobs(top: object) -> int:
    """`top` as the number of alternatives to report: an integer in [0, MAX_TOP_LOGPROBS]."""
    if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise EdgelmError(f"logprobs={top!r} must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    return int(top)


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The log-probabilities at one step: `logits` (vocab,) as the model gave them, `token` the one chosen,
    `top` alternatives."""
    row = logits.astype(np.float64)
    shifted = row - row.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    top = min(top, logp.size)
    best = np.argpartition(-logp, top - 1)[:top] if top else np.empty(0, np.int64)
    best = best[np.lexsort((best, -logp[best]))]  # most likely first, ties by id
    return TokenLogprob(int(token), float(logp[token]), tuple((int(i), float(logp[i])) for i in best))
