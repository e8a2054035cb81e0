"""The embedding API: streaming, stop strings and ids, cancel, threads, chat templates, validation.

A scripted runtime, whose logits pick tokens the test chooses, makes the text of a generation exact; the
torch runtime on a small random checkpoint covers the rest.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import SMALL

import edgelm
from edgelm.errors import EdgelmError
from edgelm.generation.api import Model
from edgelm.generation.generate import generate_ids
from edgelm.generation.sampling import SamplingParams
from edgelm.tokenizer import Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ScriptedRuntime:
    """A Runtime whose logits favour `script[i]` for the i-th generated token, then EOS: greedy decoding
    reproduces the script exactly. The first forward call after reset() is taken to be the whole prompt.
    `on_forward(n)` runs at the start of the n-th forward call (counted in `calls`)."""

    name: ClassVar[str] = "scripted"
    artifacts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tokenizer: Tokenizer, script: Sequence[int], context: int = 256, **config: object):
        self.tokenizer = tokenizer
        self.config = dataclasses.replace(
            SMALL, vocab_size=tokenizer.vocab_size, max_position_embeddings=context, **config
        )
        self.device = "cpu"
        self.script = list(script)
        self.calls = 0
        self.on_forward: Callable[[int], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.prompt_length: int | None = None

    held: tuple[int, ...] = ()  # no prefix reuse: every prompt comes whole

    def keep(self, n: int) -> int:
        self.reset()
        return 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.calls += 1
        if self.on_forward is not None:
            self.on_forward(self.calls)
        self.length += len(ids)
        if self.prompt_length is None:
            self.prompt_length = self.length
        step = self.length - self.prompt_length
        logits = np.full((1, self.config.vocab_size), -10.0, dtype=np.float32)
        logits[0, self.script[step] if step < len(self.script) else self.tokenizer.eos_ids[0]] = 10.0
        return logits

    def close(self) -> None:
        pass


def byte_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (byte-level BPE has a token for every byte)."""
    single = {b: i for i, b in enumerate(tokenizer.token_bytes) if len(b) == 1}
    return [single[bytes([b])] for b in text.encode("utf-8")]


def scripted(tokenizer: Tokenizer, text: str, **kwargs: object) -> Model:
    return Model(ScriptedRuntime(tokenizer, byte_tokens(tokenizer, text), **kwargs))


def test_multibyte_characters_stream_whole(small_tokenizer: Tokenizer) -> None:
    """Each character arrives as one piece once its last byte is generated, never half of it."""
    model = scripted(small_tokenizer, "aé€🚀b")
    assert list(model.stream("x", max_new_tokens=50, temperature=0)) == ["a", "é", "€", "🚀", "b"]
    # cut in the middle of "€" (3 bytes): the incomplete character is one U+FFFD at the end
    assert list(model.stream("x", max_new_tokens=4, temperature=0)) == ["a", "é", "\ufffd"]


def test_stop_string_split_across_tokens_never_leaks(small_tokenizer: Tokenizer) -> None:
    model = scripted(small_tokenizer, "ab<ENx<END>z")
    with model.stream("x", max_new_tokens=50, temperature=0, stop="<END>") as stream:
        pieces = list(stream)
    # "<", "<E", "<EN" are held back until "x" shows they do not begin "<END>"
    assert pieces == ["a", "b", "<ENx"]
    assert stream.finish_reason == "stop" and stream.completion_tokens == len("ab<ENx<END>")
    assert model.generate("x", 50, 0, stop=["zz", "D>z"]) == "ab<ENx<EN"
    assert model.generate("x", 50, 0, stop=["<ENx<", "b"]) == "a"  # the earliest stop string wins
    # a held-back tail that never completes is released at the end
    assert model.generate("x", 11, 0, stop="<END>!") == "ab<ENx<END>"


def test_stop_ids_eos_and_finish_reasons(small_tokenizer: Tokenizer) -> None:
    model = scripted(small_tokenizer, "abcdef")
    c = byte_tokens(small_tokenizer, "c")[0]
    with model.stream("x", temperature=0) as stream:
        assert "".join(stream) == "abcdef" and stream.finish_reason == "stop"  # the tokenizer's EOS
        assert stream.prompt_tokens == 2 and stream.completion_tokens == 6  # BOS x; EOS not counted
    with model.stream("x", max_new_tokens=3, temperature=0) as stream:
        assert "".join(stream) == "abc" and stream.finish_reason == "length"
    with model.stream("x", temperature=0, stop_ids=[c]) as stream:
        assert "".join(stream) == "ab" and stream.finish_reason == "stop"
    # the generation config's EOS list (generation_config.json) ends generation as well
    assert scripted(small_tokenizer, "abcdef", eos_token_id=(1, c)).generate("x", temperature=0) == "ab"
    # the end of the context: 2 prompt tokens + 3
    assert scripted(small_tokenizer, "abcdef", context=5).generate("x", temperature=0) == "abc"


def test_cancel_stops_within_one_token(small_tokenizer: Tokenizer) -> None:
    text = "abcdefghij" * 10
    model = scripted(small_tokenizer, text)
    reached, go = threading.Event(), threading.Event()

    def pause(n: int) -> None:
        if n == 5:  # the prefill and four decode steps
            reached.set()
            go.wait()

    model.runtime.on_forward = pause
    out: dict[str, object] = {}

    def run() -> None:
        with model.stream("x", max_new_tokens=100, temperature=0) as stream:
            out["text"] = "".join(stream)
        out["finish"] = stream.finish_reason

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert reached.wait(60)
        assert model.cancel() is True  # while forward call 5 is running
    finally:
        go.set()
    thread.join(60)
    # the token of the forward call in flight is the last: no forward call after cancel()
    assert model.runtime.calls == 5
    assert out == {"text": text[:5], "finish": "cancelled"}
    # nothing runs now: cancel() is a no-op and the next generation is whole
    assert model.cancel() is False
    assert model.generate("x", max_new_tokens=100, temperature=0) == text


def test_cancel_spares_the_queued_generation(small_tokenizer: Tokenizer) -> None:
    """A generation waiting for the model's lock when cancel() is called runs whole afterwards."""
    text = "0123456789" * 5
    model = scripted(small_tokenizer, text)
    reached, go = threading.Event(), threading.Event()
    model.runtime.on_forward = lambda n: (reached.set(), go.wait()) if n == 3 else None
    results: dict[str, str] = {}
    first = model.stream("x", max_new_tokens=60, temperature=0)
    second = model.stream("x", max_new_tokens=60, temperature=0)
    threads = [
        threading.Thread(target=lambda: results.__setitem__("first", "".join(first)), daemon=True),
        threading.Thread(target=lambda: results.__setitem__("second", "".join(second)), daemon=True),
    ]
    threads[0].start()
    try:
        assert reached.wait(60)
        threads[1].start()
        wait_until_in(threads[1], "_locked")  # the second generation is queued behind the first
        assert model.cancel() is True
    finally:
        go.set()
    for t in threads:
        t.join(60)
    assert results == {"first": text[:3], "second": text}
    assert (first.finish_reason, second.finish_reason) == ("cancelled", "stop")


def test_a_stream_cancelled_before_its_turn_does_nothing(small_tokenizer: Tokenizer) -> None:
    model = scripted(small_tokenizer, "abc")
    stream = model.stream("x", temperature=0)
    stream.cancel()
    assert list(stream) == [] and stream.finish_reason == "cancelled" and model.runtime.calls == 0
    assert model.generate("x", temperature=0) == "abc"


def test_cancel_between_prefill_chunks(small_tokenizer: Tokenizer) -> None:
    runtime = ScriptedRuntime(small_tokenizer, [5, 6, 7])
    ids = generate_ids(
        runtime,
        list(range(2, 42)),
        10,
        SamplingParams(0),
        cancelled=lambda: runtime.calls == 2,
        prefill_chunk=8,
    )
    with pytest.raises(StopIteration) as end:
        next(ids)
    assert end.value.value == "cancelled" and runtime.calls == 2  # 2 of the 5 chunks


def test_chunked_prefill_gives_the_same_tokens(checkpoint: Path) -> None:
    with edgelm.load(checkpoint, device="cpu") as model:
        prompt = model.tokenize("def push(self, item):\n    self.items.append(item)", add_bos=True)
        assert len(prompt) > 10
        whole = list(generate_ids(model.runtime, prompt, 20, SamplingParams(0)))
        chunked = list(generate_ids(model.runtime, prompt, 20, SamplingParams(0), prefill_chunk=4))
    assert len(whole) == 20 and chunked == whole


def test_streamed_text_equals_generated_text_and_seeds_repeat(checkpoint: Path) -> None:
    with edgelm.load(checkpoint, device="cpu") as model:
        kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0)
        texts = [model.generate("class", seed=seed, **kwargs) for seed in (1, 2, 3)]
        assert len(set(texts)) > 1  # the seed matters
        assert model.generate("class", seed=2, **kwargs) == texts[1]
        with model.stream("class", seed=2, **kwargs) as stream:
            pieces = list(stream)
        assert "".join(pieces) == texts[1] and len(pieces) > 1
        assert stream.completion_tokens > 0 and stream.finish_reason in ("stop", "length")


def test_eight_threads_get_the_sequential_results(checkpoint: Path) -> None:
    prompts = ["def", "class", "import", "for", "while", "return", "self", "print"]
    with edgelm.load(checkpoint, device="cpu") as model:
        expected = [
            model.generate(p, max_new_tokens=24, temperature=0.9, seed=i) for i, p in enumerate(prompts)
        ]
        results: list[str | None] = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts))

        def run(i: int) -> None:
            barrier.wait()
            pieces = []
            for piece in model.stream(prompts[i], max_new_tokens=24, temperature=0.9, seed=i):
                pieces.append(piece)  # each piece hands control back to the scheduler
            results[i] = "".join(pieces)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results == expected


def test_a_thread_cannot_wait_for_its_own_stream(small_tokenizer: Tokenizer) -> None:
    model = scripted(small_tokenizer, "abc")
    with model.stream("x", temperature=0) as stream:
        next(stream)
        with pytest.raises(EdgelmError, match="still iterating another stream"):
            model.generate("x")
    assert model.generate("x", temperature=0) == "abc"  # closing the stream released the lock


def test_chat_template(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    with edgelm.load(checkpoint, device="cpu") as model:
        prompt = model.chat_prompt(messages)
        assert prompt == "<|bos|><|system|>be brief<|eos|>\n<|user|>héllo<|eos|>\n<|assistant|>"
        ids = model.tokenize(prompt)
        assert ids[0] == model.tokenizer.bos_id and ids.count(model.tokenizer.bos_id) == 1  # one BOS
        with model.chat_stream(messages, max_new_tokens=20, temperature=0) as stream:
            reply = "".join(stream)
        eos = model.tokenizer.eos_ids
        generated = list(generate_ids(model.runtime, ids, 20, SamplingParams(0), eos_ids=eos))
        assert stream.prompt_tokens == len(ids) and reply == model.detokenize(generated)
        assert model.chat(messages, max_new_tokens=20, temperature=0) == reply
        for bad in ("hi", [], [{"role": "user"}], [{"role": 1, "content": "x"}], ["x"]):
            with pytest.raises(EdgelmError, match="messages"):
                model.chat(bad)  # type: ignore[arg-type]


def test_chat_template_errors(small_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    model = scripted(small_tokenizer, "abc")
    with pytest.raises(EdgelmError, match="no chat template"):
        model.chat([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(small_tokenizer, "chat_template", "{{ raise_exception('no system role') }}")
    with pytest.raises(EdgelmError, match="chat template: no system role"):
        model.chat([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(small_tokenizer, "chat_template", "{% for %}")
    with pytest.raises(EdgelmError, match="chat template"):
        model.chat([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(small_tokenizer, "chat_template", TEMPLATE)
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(EdgelmError, match="pip install jinja2"):
        model.chat([{"role": "user", "content": "hi"}])


def test_tokenize_detokenize(small_tokenizer: Tokenizer) -> None:
    model = scripted(small_tokenizer, "")
    text = "def f(x):\n    return 'é中🚀'"
    ids = model.tokenize(text)
    assert model.detokenize(ids) == text and ids == small_tokenizer.encode(text)
    assert model.tokenize(text, add_bos=True) == [small_tokenizer.bos_id, *ids]


@pytest.mark.parametrize(
    ("bad", "name"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=1.5), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(seed=-3), "seed"),
        (dict(seed="1"), "seed"),
        (dict(seed=1.0), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop=[3]), "stop"),
        (dict(stop=None, stop_ids=["a"]), "stop_ids"),
        (dict(stop_ids=[10**6]), "stop_ids"),
        (dict(stop_ids=3), "stop_ids"),
    ],
)
def test_bad_parameters_fail_at_the_call(small_tokenizer: Tokenizer, bad: dict, name: str) -> None:
    model = scripted(small_tokenizer, "abc")
    with pytest.raises(EdgelmError, match=name):
        model.stream("x", **bad)  # raised before anything is iterated
    assert model.runtime.calls == 0
    with pytest.raises(EdgelmError, match="prompt must be a str"):
        model.stream(b"x")  # type: ignore[arg-type]


def wait_until_in(thread: threading.Thread, function: str) -> None:
    """Wait (a minute at most) until `thread` is executing `function` (it then blocks there on a lock)."""
    done = threading.Event()
    for _ in range(12000):
        frame = sys._current_frames().get(thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == function:
                return
            frame = frame.f_back
        assert thread.is_alive(), f"the thread ended without entering {function}"
        done.wait(0.005)
    raise AssertionError(f"the thread did not enter {function}")


def test_info_load_measures_a_real_load(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgelm.cli import main
    from edgelm.info import resident_memory

    assert main(["info", str(checkpoint), "--load", "--json", "--device", "cpu"]) == 0
    load = json.loads(capsys.readouterr().out)["load"]
    assert load["runtime"] == "torch" and load["device"] == "cpu"
    assert load["load_seconds"] > 0 and load["first_token_seconds"] > 0
    assert load["first_token_prompt_tokens"] == len(edgelm.load(checkpoint).tokenize("Hello, world", True))
    assert resident_memory() > 0 and isinstance(load["load_memory"], int)
    assert main(["info", str(checkpoint), "--load", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "time to first token" in table and "model load" in table and "resident" in table


def test_logprobs_are_the_models_log_softmax(checkpoint: Path) -> None:
    """Each generated token's log-probability and its step's top alternatives are torch's log_softmax of
    the logits the model gives for the whole sequence (the oracle), whatever the temperature samples."""
    import torch

    with edgelm.load(checkpoint, device="cpu") as model:
        with model.stream("def f(x):", max_new_tokens=8, temperature=1.5, seed=4, logprobs=5) as stream:
            "".join(stream)
        entries = stream.logprobs
        assert entries is not None and len(entries) == stream.completion_tokens == 8
        ids = model.tokenize("def f(x):", add_bos=True) + [e.token for e in entries]
        model.runtime.reset()
        logits = torch.from_numpy(model.runtime.forward(ids, all_logits=True)).double()
        want = torch.log_softmax(logits, dim=-1)[len(ids) - 9 : -1]
        for entry, row in zip(entries, want, strict=True):
            assert abs(entry.logprob - row[entry.token].item()) <= 1e-4
            ids, values = [i for i, _ in entry.top], [lp for _, lp in entry.top]
            assert np.allclose(values, torch.topk(row, 5).values.numpy(), atol=1e-4)  # the five likeliest
            assert np.allclose(
                values, row[ids].numpy(), atol=1e-4
            )  # each its own figure (near-ties may swap)
        assert model.stream("x").logprobs is None
        with pytest.raises(EdgelmError, match="logprobs=21 must be an integer in"):
            model.stream("x", logprobs=21)


def test_logprobs_leave_out_a_stop_strings_tokens(small_tokenizer: Tokenizer) -> None:
    """One entry per token whose text was shown: the tokens of a stop string (and of a tail held back
    for it) are generated and counted, but not reported."""
    model = scripted(small_tokenizer, "ab<ENx<END>z")
    with model.stream("x", max_new_tokens=50, temperature=0, stop="<END>", logprobs=0) as stream:
        assert "".join(stream) == "ab<ENx"
    assert stream.completion_tokens == len("ab<ENx<END>")
    assert stream.logprobs is not None
    assert [e.token for e in stream.logprobs] == byte_tokens(small_tokenizer, "ab<ENx")
    assert all(e.top == () and e.logprob <= 0 for e in stream.logprobs)
