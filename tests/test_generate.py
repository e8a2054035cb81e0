"""Sampling and the generation loop, with transformers' greedy search as the oracle."""

from __future__ import annotations

import threading
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import edgelm
from edgelm.errors import EdgelmError
from edgelm.export.gguf import export_gguf
from edgelm.generation.generate import generate_ids
from edgelm.generation.sampling import SamplingParams, sample


def test_greedy_generation_equals_transformers(checkpoint: Path) -> None:
    with edgelm.load(checkpoint, device="cpu") as model:
        prompt = model.tokenizer.encode("def push(self", add_bos=True)
        ours = list(generate_ids(model.runtime, prompt, 40, SamplingParams(temperature=0)))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=1, pad_token_id=1
        )
    generated = out[0, len(prompt) :].tolist()
    theirs = generated[: generated.index(1)] if 1 in generated else generated  # edgelm yields no EOS
    assert len(ours) > 0 and ours == theirs


def test_model_generate_equals_transformers_text(checkpoint: Path) -> None:
    """`Model.generate`'s greedy text is what transformers' greedy search and its tokenizer's decode give."""
    with edgelm.load(checkpoint, device="cpu") as model:
        ours = model.generate("def push(self", max_new_tokens=40, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer("def push(self", return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=1, pad_token_id=1)
    generated = out[0, prompt.shape[1] :].tolist()
    generated = generated[: generated.index(1)] if 1 in generated else generated
    assert len(ours) > 0 and ours == tokenizer.decode(generated)


@pytest.mark.slow
def test_model_generate_equals_llama_cpp_completion(checkpoint: Path, tmp_path: Path) -> None:
    """On a GGUF file, `Model.generate`'s greedy text is llama-cpp-python's own greedy completion."""
    path = export_gguf(checkpoint, tmp_path / "model.gguf", "f32")
    with edgelm.load(path) as model:
        ours = model.generate("def push(self", max_new_tokens=30, temperature=0)
        context = model.config.max_position_embeddings
    llama = llama_cpp.Llama(str(path), n_ctx=context, verbose=False)
    theirs = llama.create_completion("def push(self", max_tokens=30, temperature=0)
    llama.close()
    # llama-cpp-python drops the bytes of an incomplete character (errors="ignore"); edgelm writes U+FFFD
    assert len(ours) > 0 and ours.replace("\ufffd", "") == theirs["choices"][0]["text"]


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    rng = np.random.default_rng(0)
    draws = np.bincount([sample(logits, SamplingParams(1.0, 0, 1.0), rng) for _ in range(20000)], minlength=4)
    assert np.allclose(draws / 20000, [0.5, 0.25, 0.15, 0.1], atol=0.015)
    top2 = {sample(logits, SamplingParams(1.0, 2, 1.0), rng) for _ in range(500)}
    assert top2 == {0, 1}
    # top_p = 0.7: the smallest prefix reaching 0.7 is {0, 1}
    assert {sample(logits, SamplingParams(1.0, 0, 0.7), rng) for _ in range(500)} == {0, 1}
    assert {sample(logits, SamplingParams(0.0), rng) for _ in range(10)} == {0}
    cold = np.bincount([sample(logits, SamplingParams(0.25, 0, 1.0), rng) for _ in range(5000)], minlength=4)
    assert cold[0] / 5000 > 0.9  # p^4 renormalised: 0.0625 / 0.0670


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(temperature=float("nan")),
        dict(top_k=-2),
        dict(top_k=1.5),
        dict(top_p=0),
        dict(top_p=1.5),
    ],
)
def test_out_of_range_sampling_parameters(bad: dict) -> None:
    with pytest.raises(EdgelmError):
        SamplingParams(**bad)


def test_generate_api(checkpoint: Path) -> None:
    with edgelm.load(checkpoint) as model:
        a = model.generate("def", max_new_tokens=30, temperature=0.9, seed=5)
        assert a == model.generate("def", max_new_tokens=30, temperature=0.9, seed=5)
        assert "".join(model.stream("def", max_new_tokens=30, temperature=0.9, seed=5)) == a
        greedy = model.generate("def", max_new_tokens=30, temperature=0)
        assert model.generate("def", max_new_tokens=0) == ""
        for bad in (dict(max_new_tokens=-1), dict(top_p=2.0), dict(stop=[""])):
            with pytest.raises(EdgelmError):
                model.generate("def", **bad)
        with pytest.raises(EdgelmError, match="longer than the model's context"):
            model.generate("word " * 500)
    assert model.runtime.model is None  # closed by the context manager
    assert len(greedy) > 0


def test_stop_strings_are_never_emitted(checkpoint: Path) -> None:
    with edgelm.load(checkpoint) as model:
        full = model.generate("class", max_new_tokens=60, temperature=0)
        assert len(full) > 6
        for stop in (full[3:5], full[4], full[-3:], [full[10:12], full[2:4]]):
            pieces = list(model.stream("class", max_new_tokens=60, temperature=0, stop=stop))
            text = "".join(pieces)
            stops = [stop] if isinstance(stop, str) else stop
            cut = min(full.find(s) for s in stops)
            assert text == full[:cut]
            assert not any(s in text for s in stops)


def test_eos_ids_end_generation(checkpoint: Path) -> None:
    with edgelm.load(checkpoint) as model:
        prompt = model.tokenizer.encode("def", add_bos=True)
        free = list(generate_ids(model.runtime, prompt, 20, SamplingParams(0)))
        stopped = list(generate_ids(model.runtime, prompt, 20, SamplingParams(0), eos_ids=[7, free[5]]))
    assert stopped == free[: free.index(free[5])]


def test_generation_stops_at_the_context_end(checkpoint: Path) -> None:
    with edgelm.load(checkpoint) as model:
        context = model.config.max_position_embeddings
        prompt = list(range(2, context - 4))  # room for 6 more tokens
        assert len(list(generate_ids(model.runtime, prompt, 100, SamplingParams(0)))) == 6


def test_stream_with_multibyte_text(trained_run: Path) -> None:
    """Streamed pieces are whole characters even when a model emits raw bytes one token at a time."""
    with edgelm.load(trained_run) as model:
        pieces = list(model.stream("# 中文 🚀", max_new_tokens=40, temperature=1.5, top_k=0, seed=3))
    assert all(p.encode("utf-8", errors="strict") for p in pieces)
    assert "".join(pieces) == edgelm.load(trained_run).generate("# 中文 🚀", 40, 1.5, 0, seed=3)


def test_two_models_in_threads(checkpoint: Path) -> None:
    results = {}

    def run(i: int) -> None:
        with edgelm.load(checkpoint) as model:
            results[i] = model.generate("def", max_new_tokens=20, temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1]
