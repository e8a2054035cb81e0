"""GGUF import: llama.cpp running the source file is the oracle for the imported checkpoint's logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import llama_cpp  # noqa: F401  (the oracle run by export_gguf_via_llama_cpp: required)
import numpy as np
import pytest
from conftest import SMALL, make_checkpoint, saved_weights

import edgelm
from edgelm.errors import EdgelmError
from edgelm.export.gguf import export_gguf, export_gguf_via_llama_cpp
from edgelm.importer import import_model
from edgelm.tokenizer import Tokenizer
from edgelm.training.data import load_tokens, validation_windows

# rows 256 wide, so that Q4_K is really Q4_K (not its Q5_0 fallback)
WIDE = dataclasses.replace(
    SMALL,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    head_dim=64,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("wide") / "wide", small_tokenizer, WIDE, seed=3)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_exact(tmp_path: Path, small_tokenizer: Tokenizer, tied: bool) -> None:
    source = make_checkpoint(
        tmp_path / "src", small_tokenizer, dataclasses.replace(SMALL, tie_word_embeddings=tied)
    )
    imported = import_model(export_gguf(source, tmp_path, "f32"), tmp_path / "imported")
    before, after = saved_weights(source), saved_weights(imported)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    with edgelm.load(source) as a, edgelm.load(imported) as b:
        assert a.config == b.config
        text = "def push(self, item):\n    中文 🚀"
        assert a.tokenizer.encode(text) == b.tokenizer.encode(text)


def agreement(source: Path, imported: Path, windows: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and max |Δlogit| between llama.cpp on the GGUF file and edgelm on its import."""
    agree, delta = [], 0.0
    with edgelm.load(source, kv_cache="f32") as theirs, edgelm.load(imported) as ours:
        for window in windows:
            theirs.runtime.reset()
            ours.runtime.reset()
            a = theirs.runtime.forward(window.tolist(), all_logits=True)
            b = ours.runtime.forward(window.tolist(), all_logits=True)
            agree.append((a.argmax(-1) == b.argmax(-1)).mean())
            delta = max(delta, float(np.abs(a - b).max()))
    return float(np.mean(agree)), delta


# Lowest top-1 agreement allowed between llama.cpp running a quantized file and edgelm running its import.
# The weights are the same numbers; llama.cpp also rounds the activations to 8 bits inside quantized matrix
# products. Measured on the trained tiny model: Q8_0 0.992, Q4_0 0.993, Q4_K (its Q5_0/Q5_1 fallbacks) 0.989.
TRAINED_TOP1 = {"q8_0": 0.98, "q4_0": 0.98, "q4_k": 0.97}


@pytest.mark.slow
@pytest.mark.parametrize("via", ["edgelm", "llama.cpp"])
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0", "q4_k"])
def test_imported_logits_match_llama_cpp(trained_run: Path, tmp_path: Path, quant: str, via: str) -> None:
    exporter = export_gguf if via == "edgelm" else export_gguf_via_llama_cpp
    source = exporter(trained_run, tmp_path, quant)
    windows = validation_windows(load_tokens(trained_run / "data").val, 127, max_windows=6)
    top1, delta = agreement(source, import_model(source, tmp_path / "imported"), windows)
    if quant == "f32":
        assert top1 == 1.0 and delta <= 1e-4, delta  # measured 2e-5
    else:
        assert top1 >= TRAINED_TOP1[quant], (top1, delta)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["edgelm", "llama.cpp"])
def test_imported_q4_k_with_256_wide_rows(wide: Path, tmp_path: Path, via: str) -> None:
    """Real Q4_K blocks (the tiny model's 128-wide rows fall back to Q5_0). Random weights give flat logits
    whose top two are often close, so agreement is lower than on a trained model: measured 0.89."""
    source = (export_gguf if via == "edgelm" else export_gguf_via_llama_cpp)(wide, tmp_path, "q4_k")
    ids = np.random.default_rng(0).integers(2, 300, size=(4, 48))
    top1, delta = agreement(source, import_model(source, tmp_path / "imported"), ids)
    assert top1 >= 0.85, (top1, delta)


def test_bad_sources(tmp_path: Path, checkpoint: Path) -> None:
    gguf = export_gguf(checkpoint, tmp_path, "q8_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    with pytest.raises(EdgelmError, match=r"truncated\.gguf"):
        import_model(truncated, tmp_path / "a")
    assert not (tmp_path / "a" / "model.safetensors").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgelmError, match=r"no config\.json"):
        import_model(tmp_path / "empty", tmp_path / "b")
    with pytest.raises(EdgelmError, match="not empty"):
        import_model(gguf, checkpoint)


def test_llama3_scaling_is_read_back_from_rope_freqs() -> None:
    """Llama 3.1's own settings, written as llama.cpp's rope_freqs, come back as they were; factors that no
    Llama 3 scaling gives are refused."""
    from edgelm.export.gguf import llama3_rope_factors
    from edgelm.formats.gguf_config import llama3_scaling
    from edgelm.model.rope_scaling import Llama3RopeScaling

    llama31 = Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    config = dataclasses.replace(SMALL, head_dim=128, rope_theta=500000.0, rope_scaling=llama31)
    factors = llama3_rope_factors(config)
    assert 1.0 < np.median(factors) < 8.0  # kept, smoothed and slowed pairs alike
    assert llama3_scaling(factors, config, None, "test") == llama31
    with pytest.raises(EdgelmError, match="cannot be read as Llama 3's scaling"):
        llama3_scaling(factors[::-1].copy(), config, None, "test")
