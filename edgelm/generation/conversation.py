"""A conversation kept within a model's context: its system message and turns, rendered through the
model's chat template, or, for a model without one, one running text that each input continues.

Exchanges (a user turn and its answer) are dropped oldest first (the system message stays) when the prompt
and room for the answer would not fit the context; `Conversation.answer` says how many it dropped. Each
prompt begins with the last one, so `Model`'s prefix reuse prefills only the new turn (until an exchange
is dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.generation.api import Model
from edgelm.generation.generate import TextStream

# the most of the context kept free for an answer
ANSWER_ROOM = 0.25


class Conversation:
    """The messages of one chat with `model`: `system` (or None), then user and assistant turns.

    `templated` is whether the model has a chat template; without one the conversation is plain text,
    each user input appended to it and continued by the model.
    """

    def __init__(self, model: Model, system: str | None = None) -> None:
        self.model = model
        self.system = system
        self.turns: list[dict[str, str]] = []
        self.templated = bool(model.tokenizer.chat_template)

    def reset(self) -> None:
        """Forget the turns (the system message stays)."""
        self.turns = []

    def answer(self, text: str, max_new_tokens: int, **sampling: Any) -> tuple[TextStream, int]:
        """The model's answer to the user's `text` as a stream (add it with `add_answer` once read), and
        how many of the oldest exchanges were dropped to fit it in the context."""
        message = {"role": "user", "content": text}
        self.turns.append(message)
        reserve = min(max_new_tokens, int(self.model.config.max_position_embeddings * ANSWER_ROOM))
        try:
            dropped = self._fit(reserve)
            if self.templated:
                stream = self.model.chat_stream(self._messages(self.turns), max_new_tokens, **sampling)
            else:
                stream = self.model.stream(self._text(self.turns), max_new_tokens, **sampling)
        except BaseException:  # a message that does not fit, a template that refuses it, Ctrl-C
            if self.turns and self.turns[-1] is message:
                self.turns.pop()
            raise
        return stream, dropped

    def add_answer(self, text: str) -> None:
        """Record the assistant's answer (what was shown, a stopped one too)."""
        self.turns.append({"role": "assistant", "content": text})

    def _fit(self, reserve: int) -> int:
        """Drop the oldest turns until the prompt leaves `reserve` tokens of the context; refuse, before
        dropping anything, a user message that does not fit alone."""
        room = self.model.config.max_position_embeddings - reserve
        alone = self._prompt_tokens(self.turns[-1:])
        if alone > room:
            raise EdgelmError(
                f"this message makes a prompt of {alone} tokens, and the context holds {room} besides "
                f"{reserve} for the answer; shorten it"
            )
        dropped = 0
        while self._prompt_tokens(self.turns) > room:
            del self.turns[: 2 if self.turns[1]["role"] == "assistant" else 1]
            dropped += 1
        return dropped

    def _prompt_tokens(self, turns: list[dict[str, str]]) -> int:
        if self.templated:
            return len(self.model.chat_ids(self._messages(turns)))
        return len(self.model.tokenize(self._text(turns), add_bos=True))

    def _messages(self, turns: list[dict[str, str]]) -> list[Mapping[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *turns]

    def _text(self, turns: list[dict[str, str]]) -> str:
        """Plain continuation: the system text and the turns, one after the other."""
        return (self.system or "") + "".join(turn["content"] for turn in turns)
