"""The Runtime protocol and registry: automatic choice, plugins through entry points, clear refusals."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import ClassVar, cast

import numpy as np
import pytest
from conftest import SMALL, make_checkpoint

import edgelm
from edgelm.checkpoint import load_checkpoint
from edgelm.errors import EdgelmError
from edgelm.formats.artifact import artifact_kind
from edgelm.runtimes import base
from edgelm.runtimes.base import Runtime, open_runtime
from edgelm.tokenizer import Tokenizer


class ReplayRuntime:
    """A plugin runtime for the test: a checkpoint's tokenizer, logits that favour the token last + 1."""

    name: ClassVar[str] = "replay"
    artifacts: ClassVar[tuple[str, ...]] = ("checkpoint",)
    options: ClassVar[frozenset[str]] = frozenset()  # none of the optional capabilities

    def __init__(self, path: Path, device: str = "auto") -> None:
        self.config, _, self.tokenizer = load_checkpoint(path)
        self.device = "cpu" if device == "auto" else device
        self.threads: int | None = None
        self.provider: str | None = None
        self.seen: list[int] = []

    def reset(self) -> None:
        self.seen = []

    held: tuple[int, ...] = ()  # a runtime without prefix reuse

    def keep(self, n: int) -> int:
        self.reset()
        return 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.seen.extend(ids)
        logits = np.zeros((len(ids), self.config.vocab_size), dtype=np.float32)
        for row, token in enumerate(ids):
            logits[row, (token + 1) % self.config.vocab_size] = 10.0
        return logits if all_logits else logits[-1:]

    def close(self) -> None:
        pass


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = EntryPoint(name="replay", value=f"{__name__}:ReplayRuntime", group="edgelm.runtimes")
    monkeypatch.setattr(base, "entry_points", lambda group: [entry] if group == "edgelm.runtimes" else [])


def test_plugin_runtime_gets_generation_for_free(checkpoint: Path, plugin: None) -> None:
    assert "replay" in base.runtime_names()
    with edgelm.load(checkpoint, runtime="replay") as model:
        assert isinstance(model.runtime, Runtime)
        prompt_ids = model.tokenizer.encode("a", add_bos=True)
        text = model.generate("a", max_new_tokens=5, temperature=0)
        expected = [(prompt_ids[-1] + k) % model.config.vocab_size for k in range(1, 6)]
        assert text == model.tokenizer.decode(expected)
        assert cast(ReplayRuntime, model.runtime).seen == [*prompt_ids, *expected[:-1]]


def test_auto_choice_and_refusals(checkpoint: Path, tmp_path: Path) -> None:
    assert artifact_kind(checkpoint) == "checkpoint"
    model = open_runtime(checkpoint)
    assert model.name == "torch" and model.device == "cpu"
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(20))
    assert artifact_kind(tmp_path / "x.gguf") == "gguf"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EdgelmError, match="not a GGUF file"):
        edgelm.load(tmp_path / "notes.txt")
    with pytest.raises(EdgelmError, match="unknown runtime 'nosuch'; available: torch"):
        edgelm.load(checkpoint, runtime="nosuch")
    with pytest.raises(EdgelmError, match="unknown device"):
        edgelm.load(checkpoint, device="tpu")
    with pytest.raises(EdgelmError, match="dtype"):
        edgelm.load(checkpoint, dtype="int3")


@pytest.mark.slow
def test_every_runtime_takes_a_context_and_refuses_what_it_does_not_take(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    """`context` bounds the sequence in all three runtimes; llama.cpp and ONNX Runtime, which reserve their
    KV cache for it up front, take DEFAULT_CONTEXT of a longer model's context unless asked. An option a
    runtime does not take, and a context that is not a positive count, are refused by name."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    config = dataclasses.replace(SMALL, max_position_embeddings=2 * base.DEFAULT_CONTEXT)
    checkpoint = make_checkpoint(tmp_path / "long", small_tokenizer, config)
    onnx = export_onnx(checkpoint, tmp_path / "onnx", "fp32")
    gguf = export_gguf(checkpoint, tmp_path / "model.gguf", "q8_0")
    for artifact, default in ((checkpoint, config), (onnx, None), (gguf, None)):
        with edgelm.load(artifact) as model:
            reserved = model.config.max_position_embeddings
            assert reserved == (default.max_position_embeddings if default else base.DEFAULT_CONTEXT)
        with edgelm.load(artifact, context=16) as model:
            assert model.config.max_position_embeddings == 16
            model.runtime.forward(list(range(16)))
            with pytest.raises(EdgelmError, match="context of 16"):
                model.runtime.forward([1])
    with edgelm.load(onnx) as model:  # the KV buffers hold the reserved context, not the model's
        assert model.runtime._kv[0].shape()[2] == base.DEFAULT_CONTEXT  # type: ignore[attr-defined]
    genai = json.loads((onnx / "genai_config.json").read_text())  # and genai's default, as genai reserves it
    assert genai["search"]["max_length"] == base.DEFAULT_CONTEXT < genai["model"]["context_length"]
    with pytest.raises(EdgelmError, match=r"the torch runtime takes no option kv_cache \(its options: "):
        edgelm.load(checkpoint, kv_cache="f32")
    for artifact in (checkpoint, onnx, gguf):
        with pytest.raises(EdgelmError, match="context=0 must be a positive number of tokens"):
            edgelm.load(artifact, context=0)


def test_logits_are_the_callers_to_keep_and_one_bad_id_is_refused(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    """A runtime may reuse its buffers from step to step (ONNX Runtime's decode logits are), but the logits
    it returns stay as they were when later steps run; and a decode step's single id is checked as a
    prompt's are."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer, SMALL)
    artifacts = [
        checkpoint,
        export_onnx(checkpoint, tmp_path / "onnx", "fp32"),
        export_onnx(checkpoint, tmp_path / "onnx16", "fp16"),  # float16 logits, returned as float32
        export_gguf(checkpoint, tmp_path / "model.gguf", "q8_0"),
    ]
    for artifact in artifacts:
        with edgelm.load(artifact) as model:
            prompt = model.runtime.forward([1, 2, 3], all_logits=True)
            steps = [model.runtime.forward([token]) for token in (4, 5, 6)]
            kept = [prompt.copy()] + [step.copy() for step in steps]
            model.runtime.forward([7, 8])
            for logits, copy in zip([prompt, *steps], kept, strict=True):
                assert logits.dtype == np.float32
                np.testing.assert_array_equal(logits, copy)
            assert not np.array_equal(steps[0], steps[1])
            vocab = model.config.vocab_size
            for bad in (-1, vocab):
                with pytest.raises(
                    EdgelmError, match=rf"token ids must lie in \[0, {vocab}\); got {bad}\.\.{bad}"
                ):
                    model.runtime.forward([bad])
            assert model.runtime.position == 8


def test_builtin_runtimes_declare_the_options_their_constructors_take() -> None:
    import inspect

    for name in base.BUILTIN_RUNTIMES:
        cls = base.runtime_class(name)
        keywords = set(inspect.signature(cls).parameters) - {"path", "device"}
        assert cls.options == keywords, name


def test_a_plugin_that_declares_nothing_optional_is_checked_without_threads(
    checkpoint: Path, plugin: None, tmp_path: Path
) -> None:
    from edgelm.evaluation.check import check
    from edgelm.evaluation.reference import EvaluationText

    cls = base.runtime_class("replay")
    assert cls.options == frozenset()
    text = EvaluationText("the quick brown fox jumps over the lazy dog. " * 40, "test")
    result = check(
        checkpoint,
        checkpoint,
        text,
        ctx=16,
        windows=2,
        repetitions=0,
        runtime="replay",
        threads=2,
        cache_dir=tmp_path,
    )  # threads=2 reaches the torch reference but not the plugin, whose constructor does not take it
    assert result.error is None and result.runtime == "replay"
    assert result.threads is None and result.provider is None
    assert result.reference is not None and result.reference.runtime == "torch"
    rt = open_runtime(checkpoint, "replay")
    assert rt.threads is None and rt.provider is None


class Undeclared(ReplayRuntime):
    """A plugin whose runtime lacks a capability the protocol declares (`provider`)."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        super().__init__(path, device)
        del self.provider


class NoOptions:
    """A plugin class that does not declare its constructor's options."""

    name, artifacts = "bare", ("checkpoint",)


def test_a_plugin_that_breaks_the_protocol_is_refused(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [
        EntryPoint(name="undeclared", value=f"{__name__}:Undeclared", group="edgelm.runtimes"),
        EntryPoint(name="bare", value=f"{__name__}:NoOptions", group="edgelm.runtimes"),
    ]
    monkeypatch.setattr(base, "entry_points", lambda group: entries if group == "edgelm.runtimes" else [])
    with pytest.raises(EdgelmError, match="does not declare options"):
        base.runtime_class("bare")
    with pytest.raises(EdgelmError, match="does not follow the Runtime protocol"):
        open_runtime(checkpoint, "undeclared")
