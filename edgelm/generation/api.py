"""`edgelm.load` and `Model`: an artifact, its tokenizer and a runtime behind one small, thread-safe object.

Prefix reuse: the runtime's sequence stays after a generation, and the next one keeps the part its prompt
begins with (`Runtime.keep`) and prefills only the rest, so that the turns of a chat, whose prompts each
begin with the last, answer without prefilling the conversation again. The runtime says what it holds
(`Runtime.held`), so using it directly in between is safe.

Concurrency: a runtime holds one sequence, so a model runs one generation at a time. Calls from several
threads queue on the model's lock, each generation whole: a stream holds the lock from its first piece
until it is exhausted or closed. `Model.cancel()` stops the generation that holds the lock when it is
called, and only that one: a generation still waiting for its turn has a cancel flag of its own, which
`TextStream.cancel()` sets (a server cancels a queued request that way).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Generator, Mapping, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.generation.constraint import JsonConstraint
from edgelm.generation.generate import (
    MAX_NEW_TOKENS,
    FinishReason,
    TextStream,
    check_stop,
    generate_ids,
    reusable_prefix,
    stop_token_ids,
)
from edgelm.generation.logprobs import TokenLogprob, check_top_logprobs, token_logprob
from edgelm.generation.sampling import SamplingParams
from edgelm.runtimes.base import Runtime, open_runtime


class Model:
    """A loaded model. `runtime` is the Runtime protocol underneath; `tokenizer` and `config` are its own.

    Sampling arguments, the same for `generate`, `stream`, `chat` and `chat_stream`:
    `max_new_tokens` (int >= 0; generation also ends at the end of the context), `temperature` (>= 0;
    0 is greedy), `top_k` (>= 0; 0 = all tokens), `top_p` (in (0, 1]; 1 = off), `seed` (int >= 0: the same
    seed gives the same text; None: random), `stop` (strings that end the generation and are never part of
    its text), `stop_ids` (token ids that end it, besides the EOS ids of the tokenizer and the generation
    config), `json_schema` (None: free text; a JSON schema, {"type": "object"} for any JSON object: the
    text is JSON that follows it, by constrained decoding, see `generation.constraint`). Bad values raise
    EdgelmError when the call is made. `stream` and `chat_stream` also take `logprobs` (None: off; k in
    [0, 20]: the stream's `logprobs` lists each generated token's log-probability and the k most likely
    tokens of its step, see `generation.logprobs`).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.config = runtime.config
        self._lock = threading.Lock()  # held by one generation, whole
        self._owner: int | None = None  # the thread that holds _lock
        self._current: threading.Event | None = None  # the cancel flag of the generation holding _lock
        self._current_guard = threading.Lock()

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = SamplingParams.temperature,
        top_k: int = SamplingParams.top_k,
        top_p: float = SamplingParams.top_p,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        *,
        stop_ids: Sequence[int] = (),
        json_schema: Mapping[str, Any] | None = None,
    ) -> str:
        """The continuation of `prompt` (without the prompt)."""
        with self.stream(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            stop_ids=stop_ids,
            json_schema=json_schema,
        ) as stream:
            return "".join(stream)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = SamplingParams.temperature,
        top_k: int = SamplingParams.top_k,
        top_p: float = SamplingParams.top_p,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        *,
        stop_ids: Sequence[int] = (),
        logprobs: int | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> TextStream:
        """The continuation of `prompt` as a `TextStream`: text pieces as they are generated (whole
        characters only), then `finish_reason` and the token counts. The generation starts, and takes the
        model's lock, at the first piece; exhaust or `close()` the stream to let other calls run."""
        if not isinstance(prompt, str):
            raise EdgelmError(f"prompt must be a str, not {type(prompt).__name__}")
        prompt_ids = self.tokenizer.encode(prompt, add_bos=True)
        return self._stream(
            prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_ids, logprobs, json_schema
        )

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = SamplingParams.temperature,
        top_k: int = SamplingParams.top_k,
        top_p: float = SamplingParams.top_p,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        *,
        stop_ids: Sequence[int] = (),
        json_schema: Mapping[str, Any] | None = None,
    ) -> str:
        """The assistant's reply to `messages` ([{"role": "user", "content": "..."}, ...]), through the
        model's chat template (see `chat_prompt`)."""
        with self.chat_stream(
            messages,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            stop_ids=stop_ids,
            json_schema=json_schema,
        ) as stream:
            return "".join(stream)

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = SamplingParams.temperature,
        top_k: int = SamplingParams.top_k,
        top_p: float = SamplingParams.top_p,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        *,
        stop_ids: Sequence[int] = (),
        logprobs: int | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> TextStream:
        """The assistant's reply to `messages` as a `TextStream` (see `stream`)."""
        prompt_ids = self.chat_ids(messages)
        return self._stream(
            prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_ids, logprobs, json_schema
        )

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the model's chat template makes of `messages`, ending with the assistant's turn
        (add_generation_prompt=True). The template sees `messages`, `bos_token` and `eos_token`."""
        template = self.tokenizer.chat_template
        if not template:
            raise EdgelmError(
                "this model has no chat template (tokenizer_config.json 'chat_template', or GGUF "
                "'tokenizer.chat_template'); use generate() with a prompt you format yourself"
            )
        eos_ids = self.tokenizer.eos_ids or self.config.eos_token_ids
        return render_chat(
            template,
            messages,
            bos_token=self._special_text(self.tokenizer.bos_id),
            eos_token=self._special_text(eos_ids[0] if eos_ids else None),
        )

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The token ids `chat_stream` runs for `messages`: `chat_prompt`'s text, with BOS in front unless
        the template writes it."""
        prompt = self.chat_prompt(messages)
        bos = self._special_text(self.tokenizer.bos_id)
        return self.tokenizer.encode(prompt, add_bos=not (bos and prompt.startswith(bos)))

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """How many of `prompt_ids` the runtime holds from earlier generations: what a generation of them
        would not prefill again (if the runtime can keep them)."""
        return reusable_prefix(self.runtime.held, prompt_ids)

    @property
    def busy(self) -> bool:
        """Whether a generation holds the model now (others wait for their turn)."""
        return self._lock.locked()

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (the text of a special token becomes that token); `add_bos` puts the BOS id in
        front when the tokenizer adds one, as a prompt gets."""
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids; bytes that are not whole UTF-8 characters become U+FFFD."""
        return self.tokenizer.decode(ids)

    def cancel(self) -> bool:
        """Stop the generation running at this moment, from any thread: it ends within one token (or between
        two prefill chunks) and returns what it produced, with finish_reason "cancelled". Generations still
        waiting for their turn are not affected. Returns whether a generation was running."""
        with self._current_guard:
            if self._current is None:
                return False
            self._current.set()
            return True

    def close(self) -> None:
        """Cancel a running generation and release the runtime and its memory."""
        self.cancel()
        self.runtime.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        stop: Sequence[str] | str,
        stop_ids: Sequence[int],
        logprobs: int | None,
        json_schema: Mapping[str, Any] | None,
    ) -> TextStream:
        params = SamplingParams(temperature, top_k, top_p)
        stop = check_stop(stop)
        eos_ids = stop_token_ids(self.runtime, stop_ids)
        constraint = None if json_schema is None else JsonConstraint(self.tokenizer, json_schema, eos_ids)
        event = threading.Event()  # this generation's own cancel flag
        recorded: list[TokenLogprob] | None = None
        observe = None
        if logprobs is not None:
            top, recorded = check_top_logprobs(logprobs), []
            observe = partial(_record_logprob, recorded, top)
        ids = generate_ids(
            self.runtime,
            prompt_ids,
            max_new_tokens,
            params,
            seed,
            eos_ids,
            event.is_set,
            observe=observe,
            constraint=constraint,
        )
        locked = self._locked(ids, event)
        return TextStream(self.tokenizer, locked, len(prompt_ids), stop, event, recorded)

    def _locked(
        self, ids: Generator[int, None, FinishReason], event: threading.Event
    ) -> Generator[int, None, FinishReason]:
        """Run `ids` holding the model's lock, with `event` as the flag `cancel()` sets meanwhile."""
        if self._owner == threading.get_ident():
            raise EdgelmError(
                "this thread is still iterating another stream of this model; exhaust or close() it first"
            )
        with self._lock:
            self._owner = threading.get_ident()
            with self._current_guard:
                self._current = event
            try:
                return (yield from ids)
            finally:
                with self._current_guard:
                    self._current = None
                self._owner = None

    def _special_text(self, token_id: int | None) -> str:
        """The text of a special token such as BOS or EOS ("" when there is none)."""
        if token_id is None:
            return ""
        return self.tokenizer.backend.id_to_token(token_id) or ""


def _record_logprob(recorded: list[TokenLogprob], top: int, logits: np.ndarray, token: int) -> None:
    recorded.append(token_logprob(logits, token, top))


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render a Hugging Face chat template (Jinja) as transformers does: a sandboxed environment with
    trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that
    keeps non-ASCII characters."""
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EdgelmError("chat templates need jinja2; install it with: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    checked = check_messages(messages)
    try:
        return env.from_string(template).render(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:  # a template's own bug
        raise EdgelmError(f"chat template: {e}") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as plain dicts: a non-empty list, each with a str "role" and a str "content"."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise EdgelmError('messages must be a non-empty list of {"role": ..., "content": ...} objects')
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EdgelmError(f"messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise EdgelmError(f"messages[{i}].{key} must be a string")
        checked.append(dict(message))
    return checked


def load(path: str | Path, runtime: str = "auto", device: str = "auto", **options: Any) -> Model:
    """Load a checkpoint directory, ONNX folder or GGUF file; runtime and device are chosen when "auto"."""
    return Model(open_runtime(Path(path), runtime=runtime, device=device, **options))
