"""The tokenizer: lossless round trips, streaming decode, and agreement with Hugging Face's own readers."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from edgelm.errors import EdgelmError
from edgelm.tokenizer import Tokenizer, train_tokenizer

VARIED = (
    "English prose, with punctuation!  Numbers 1234567 and 3.14159.\n"
    "中文文本和标点。日本語のテキスト。한국어 텍스트.\n"
    "emoji 🚀🧑‍💻👍🏽 flags 🇫🇷\n"
    "def f(x):\n\tif x:\n        return {'a': [1, 2]}\r\n\n\n\n"
    "   runs    of     spaces   \x00\x01\x07\x1b control \u200b\ufeff\n"
)


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [*(decoder.push(i) for i in ids), decoder.flush()]


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=200))
def test_round_trip_any_unicode(small_tokenizer: Tokenizer, text: str) -> None:
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert "".join(stream(small_tokenizer, ids)) == text
    # the oracle: Hugging Face tokenizers' own ByteLevel decoder
    assert small_tokenizer.backend.decode(ids, skip_special_tokens=False) == text


def test_round_trip_varied_text(small_tokenizer: Tokenizer) -> None:
    ids = small_tokenizer.encode(VARIED)
    assert small_tokenizer.decode(ids) == VARIED


def test_streaming_never_emits_half_a_character(small_tokenizer: Tokenizer) -> None:
    text = "中文🚀👍🏽é" * 3
    ids = small_tokenizer.encode(text)
    pieces = stream(small_tokenizer, ids)
    assert len(ids) > len(text)  # these characters span several tokens: the test has teeth
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == text


@settings(max_examples=100, deadline=None)
@given(raw=st.lists(st.integers(0, 1 << 20), max_size=40))
def test_decode_of_any_ids_matches_tokenizers(small_tokenizer: Tokenizer, raw: list[int]) -> None:
    """Invalid UTF-8 sequences are replaced exactly as the Rust decoder replaces them."""
    ids = [2 + r % (small_tokenizer.vocab_size - 2) for r in raw]  # any non-special id
    expected = small_tokenizer.backend.decode(ids, skip_special_tokens=False)
    assert small_tokenizer.decode(ids) == expected
    assert "".join(stream(small_tokenizer, ids)) == expected


def test_bos_eos_and_transformers_agree(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    assert (small_tokenizer.bos_id, small_tokenizer.eos_ids) == (0, (1,))
    small_tokenizer.save(tmp_path, context_length=128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(SAMPLE_TEXT) == small_tokenizer.encode(SAMPLE_TEXT, add_bos=True)
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.encode(VARIED) == small_tokenizer.encode(VARIED)


def test_errors(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    with pytest.raises(EdgelmError, match="outside the vocabulary"):
        small_tokenizer.decode([10_000])
    with pytest.raises(EdgelmError, match="not valid Unicode"):
        small_tokenizer.encode("lone \ud800 surrogate")
    with pytest.raises(EdgelmError, match="at least 258"):
        train_tokenizer(["x"], vocab_size=100)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EdgelmError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)


def test_training_on_long_runs_of_one_character_is_bounded() -> None:
    """A megabyte of NUL bytes (or of any one character) is one pre-token the BPE trainer's time grows with
    about 4x per doubling (measured: 1.8 s for 64 KiB, so minutes for 1 MiB); training sees runs cut to
    MAX_TRAINING_RUN and takes a fraction of a second; the tokenizer still encodes the whole run."""
    from edgelm.tokenizer import MAX_TRAINING_RUN, _bounded_runs

    text = "\0" * (1 << 20)
    assert _bounded_runs("x" * 1000 + "yz" + "=" * 10) == "x" * MAX_TRAINING_RUN + "yz" + "=" * 10
    tokenizer = train_tokenizer([text, "def f(x):\n    return x\n" * 20], vocab_size=300)
    assert tokenizer.decode(tokenizer.encode(text)) == text
