"""Prefix reuse: a runtime keeps the first n tokens of its sequence (`Runtime.keep`), and `Model` prefills
only what a new prompt adds to the ids its runtime holds. Each runtime's logits after a cut equal a fresh
prefill's within its own tolerance, and a conversation's greedy text equals a fresh model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import kept_prefix_error, make_checkpoint

import edgelm
from edgelm.generation.api import Model
from edgelm.generation.generate import generate_ids, reusable_prefix
from edgelm.generation.sampling import SamplingParams
from edgelm.runtimes.base import Runtime
from edgelm.tokenizer import Tokenizer

IDS = np.random.default_rng(3).integers(3, 300, size=60).tolist()
DETOUR = np.random.default_rng(4).integers(3, 300, size=17).tolist()
# the runtime options that make each runtime's logits comparable, and how close a cut must stay
OPTIONS = {"torch": {}, "onnx": {}, "gguf": {"kv_cache": "f32"}}
TOLERANCE = {"torch": 1e-5, "onnx": 1e-4, "gguf": 1e-3}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> dict[str, Path]:
    """A small random checkpoint, its float32 ONNX folder and its F32 GGUF file."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("reuse")
    checkpoint = make_checkpoint(root / "checkpoint", small_tokenizer)
    return {
        "torch": checkpoint,
        "onnx": export_onnx(checkpoint, root / "onnx", "fp32"),
        "gguf": export_gguf(checkpoint, root / "model.gguf", "f32"),
    }


@pytest.mark.parametrize("kind", OPTIONS)
def test_each_runtime_continues_a_kept_prefix_as_a_fresh_prefill(
    artifacts: dict[str, Path], kind: str
) -> None:
    with edgelm.load(artifacts[kind], device="cpu", **OPTIONS[kind]) as model:
        runtime = model.runtime
        for kept in (1, 25, 59):
            assert kept_prefix_error(runtime, IDS, kept, DETOUR) <= TOLERANCE[kind], kept
        runtime.reset()
        runtime.forward(IDS[:10])
        assert runtime.keep(40) == 10  # never more than it holds
        assert runtime.keep(0) == 0
        assert np.abs(runtime.forward(IDS, all_logits=True) - _fresh(runtime, IDS)).max() <= TOLERANCE[kind]


def _fresh(runtime: Runtime, ids: list[int]) -> np.ndarray:
    runtime.reset()
    return runtime.forward(ids, all_logits=True)


def _counting(model: Model) -> list[int]:
    """The number of ids of each forward call the model's runtime makes from now on."""
    sizes: list[int] = []
    forward = model.runtime.forward

    def counted(ids: list[int], all_logits: bool = False) -> np.ndarray:
        sizes.append(len(ids))
        return forward(ids, all_logits)

    model.runtime.forward = counted  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("kind", OPTIONS)
def test_a_conversation_prefills_only_what_each_turn_adds(artifacts: dict[str, Path], kind: str) -> None:
    """Turns whose prompts each begin with the last one: the runtime sees only the ids after the part a
    prompt shares with the ids it holds (the last prompt id again, as its logits choose the first new
    token), which is at least the last prompt; every answer is the one a freshly loaded model gives."""
    options = OPTIONS[kind]
    with edgelm.load(artifacts[kind], device="cpu", **options) as model:
        sizes = _counting(model)
        prompt, previous = "def fibonacci(n):", None
        for turn in [*range(4), "other"]:
            if turn == "other":  # a prompt that leaves the conversation at once runs whole
                prompt, previous = "class Stack:\n    def push(self, item):", None
            ids = model.tokenize(prompt, add_bos=True)
            shared = reusable_prefix(model.runtime.held, ids)
            sizes.clear()
            answer = model.generate(prompt, max_new_tokens=6, temperature=0)
            assert sizes[0] == len(ids) - shared and sum(sizes) <= sizes[0] + 5, (turn, sizes)
            if previous is not None:
                assert shared >= len(previous) - 1  # the last prompt's last id may merge with what follows
            with edgelm.load(artifacts[kind], device="cpu", **options) as fresh:
                assert fresh.generate(prompt, max_new_tokens=6, temperature=0) == answer
            previous = ids
            prompt += answer + f"\n    return a + b  # turn {turn}\n"
        assert shared == 1  # BOS


def test_a_cancelled_prefill_keeps_the_chunks_that_ran(artifacts: dict[str, Path]) -> None:
    """A generation cancelled between prefill chunks holds the chunks that ran; the next one prefills the
    rest only and gives the tokens a fresh sequence gives."""
    greedy = SamplingParams(temperature=0)
    with edgelm.load(artifacts["torch"], device="cpu") as model:
        runtime = model.runtime
        ids = model.tokenize("def fibonacci(n: int) -> int:\n    a, b = 0, 1\n", add_bos=True)
        run = generate_ids(runtime, ids, 4, greedy, cancelled=lambda: len(runtime.held) >= 8, prefill_chunk=8)
        with pytest.raises(StopIteration) as end:
            next(run)
        assert end.value.value == "cancelled" and runtime.held == tuple(ids[:8])
        sizes = _counting(model)
        tokens = list(generate_ids(runtime, ids, 6, greedy, prefill_chunk=8))
        assert sizes[0] == 8 and sum(sizes) == len(ids) - 8 + len(tokens) - 1
        assert runtime.held == (*ids, *tokens[:-1])  # the last token was never run
        runtime.forward([5, 6, 7])  # the runtime used directly: the next generation sees what it holds
        assert list(generate_ids(runtime, ids, 6, greedy)) == tokens
        runtime.reset()
        assert list(generate_ids(runtime, ids, 6, greedy)) == tokens
