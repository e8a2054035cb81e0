"""Constrained decoding: only tokens that keep the text valid under a JSON schema may be sampled, through
llguidance (a maintained grammar engine, Rust, over the tokenizer's own vocabulary).

At each step the engine gives the set of allowed tokens as a bitmask; the others' logits become -inf
before sampling (log-probabilities are reported from the logits as the model gave them). Once the JSON
value is complete only an end-of-sequence id is allowed, so the generation stops there.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError, missing_dependency
from edgelm.tokenizer import Tokenizer

# the JSON compiler's defaults: compact separators, so that a value of a bounded schema has an end (a
# schema's own "x-guidance" options override them)
JSON_DEFAULTS = {"whitespace_flexible": False}

_ENGINE_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_ENGINE_LOCK = threading.Lock()


class JsonConstraint:
    """The state of one constrained generation: `mask(logits)` before each sampling, `accept(token)` after."""

    def __init__(self, tokenizer: Tokenizer, schema: Mapping[str, Any], eos_ids: Sequence[int]) -> None:
        """`schema`: a JSON schema ({"type": "object"} for any JSON object); `eos_ids`: the ids that end
        the generation, one of which the engine allows once the value is complete."""
        llguidance = _llguidance()
        if not isinstance(schema, Mapping):
            raise EdgelmError(f"json_schema must be a JSON schema object, not {type(schema).__name__}")
        if not eos_ids:
            raise EdgelmError("constrained decoding needs an end-of-sequence token, and this model has none")
        try:
            matcher = llguidance.LLMatcher
            grammar = matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
            self._matcher = matcher(_engine_tokenizer(tokenizer, eos_ids), grammar, log_level=0)
        except (TypeError, ValueError) as e:
            raise EdgelmError(f"json_schema: {e}") from None
        if self._matcher.is_error():
            raise EdgelmError(f"json_schema: {self._matcher.get_error()}")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` (vocab,) with every token the schema does not allow next at -inf."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.zeros(logits.size, bool)  # rows past the tokenizer's vocabulary (padding) stay out
        shared = min(bits.size, logits.size)
        allowed[:shared] = bits[:shared]
        if not allowed.any():
            raise EdgelmError(f"constrained decoding: no token may follow ({self._matcher.get_error()})")
        return np.where(allowed, logits, -np.inf).astype(logits.dtype)

    def accept(self, token: int) -> None:
        """Advance past the sampled `token` (one the mask allowed)."""
        if not self._matcher.consume_token(token):
            raise EdgelmError(f"constrained decoding: {self._matcher.get_error()}")


def _llguidance() -> Any:
    try:
        import llguidance
    except ModuleNotFoundError:
        raise missing_dependency("llguidance", "json") from None
    return llguidance


def _engine_tokenizer(tokenizer: Tokenizer, eos_ids: Sequence[int]) -> Any:
    """llguidance's view of `tokenizer` (each token's bytes, its special ids), built once per tokenizer and
    end-of-sequence ids (a large vocabulary takes a moment)."""
    llguidance = _llguidance()
    with _ENGINE_LOCK:
        built = _ENGINE_TOKENIZERS.setdefault(tokenizer, {})
        key = tuple(sorted(eos_ids))
        if key not in built:
            built[key] = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_Vocabulary(tokenizer, key[0])), eos_token=list(key)
            )
        return built[key]


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads of a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokenizer.token_bytes
        added = tokenizer.backend.get_added_tokens_decoder()
        self.special_token_ids = sorted(i for i, token in added.items() if token.special)
        self._backend = tokenizer.backend

    def __call__(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)
