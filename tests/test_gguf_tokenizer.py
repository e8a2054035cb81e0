"""Tokenizers rebuilt from GGUF metadata, against llama.cpp as the oracle: the ids of a varied text, the text
of those ids, special and user-defined tokens, BOS, and the files that transformers reads back."""

from __future__ import annotations

import ctypes
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from edgelm.errors import EdgelmError
from edgelm.formats.gguf_reader import read_gguf
from edgelm.formats.gguf_tokenizer import GGUF_PRE_TOKENIZERS, gguf_pre_tokenizer_name, tokenizer_from_gguf
from edgelm.tokenizer import PRE_TOKENIZER_REGEXES, Tokenizer, train_tokenizer

TRAIN = [
    "The quick brown fox jumps over the lazy dog. It's what they'd do, isn't it? We're sure you've seen\n",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 12 345 6789\n\n",
    "class Model:\n\tdef __init__(self, n=1024):\n\t\tself.n = n\n        self.items = {'a': [1, 2, 3]}\r\n",
    "中文文本和标点，机器学习模型。日本語のテキストです。한국어 텍스트입니다.\n",
    "emoji 🚀🔥 and numbers 2024-01-31, 3.14159, 1000000 and $42.50 + 7% <= 99 ^ ~x | y\n",
    "    indented    with     runs of spaces   and\n\n\nblank lines\t\ttabs\n",
    "I'LL DO IT, YOU'RE RIGHT, HE'S HERE; don't won't can't shouldn't I'm you'll we'd\n",
    "<tool> café ✓ calls: <tool>search(q='x')</tool>\n",
]
# none of it in the training text as such: other words, rare characters (byte fallback), other digit runs
TEXT = (
    "Hello World! Don't stop; I'LL go, she'S gone -- they'Re here, WE'VE won, it'D be.\n"
    "Numbers 1234567 and 89, 3.5e-10, ٣٤٥ (Arabic-Indic), ½ and ⅔; 007 agents.\n"
    "中文：自然语言处理很有趣！ 日本語、カタカナ。 한국어 문장.\n"
    "emoji 🚀🧑\u200d💻👍🏽 flags 🇫🇷🇯🇵, math ∑∫√ and ‹quotes› «guillemets» “curly”\n"
    "def f(x):\n\tif x   >=  10:\n        return {'k': [x, x**2]}  \r\n\n\n\n"
    "   runs    of     spaces   \x00\x01\x07\x1b control \u200b\ufeff $+<=>^~| ``` !!! ...\n"
    "naïve café ✓ with <tool> inside and trailing spaces   "
)
CONTROL_TEXT = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
SPECIALS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # CONTROL
USER_DEFINED = ["<tool>", "café ✓"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

# each pre-tokenizer as the tokenizer.json of a model using it writes it (GPT-2, Llama 3, Qwen 2, SmolLM);
# "default" has no such model: GPT-2's
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _TAIL
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _TAIL
_CASED = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    _CASED
    + r"*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + _CONTRACTIONS
    + "|"
    + _CASED
    + r"+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + _CONTRACTIONS
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HF_PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_LLAMA3), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    ),
    "qwen2": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_QWEN2), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    ),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    # Phi-4-mini's tokenizer.json spells it so
    "gpt-4o": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_GPT4O), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    ),
}


# ------------------------------------------------------------------------------------------------ helpers


def train_byte_level(pre_tokenizer: pre_tokenizers.PreTokenizer, vocab_size: int = 700) -> HFTokenizer:
    """A small byte-level BPE trained on TRAIN, with SPECIALS and USER_DEFINED as its first ids."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIALS, *USER_DEFINED],
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TRAIN * 3, trainer)
    return backend


def byte_level_vocab(backend: HFTokenizer) -> dict:
    """tokens, token types and merges as a GGUF file holds them."""
    vocab = backend.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    types = [3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    merges = [" ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(path: Path, model: str, vocab: dict, **keys: Any) -> Path:
    """A vocabulary-only GGUF file with the given tokenizer metadata: llama.cpp opens it with `vocab_only`
    from general.architecture and the tokenizer keys alone (no llama.* hyperparameters, no tensors)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if keys.get("pre") is not None:
        writer.add_tokenizer_pre(keys["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    for name in ("bos", "eos", "eot", "unk", "pad"):
        if keys.get(name) is not None:
            getattr(writer, f"add_{name}_token_id")(keys[name])
    if keys.get("add_bos") is not None:
        writer.add_add_bos_token(keys["add_bos"])
    if keys.get("add_space_prefix") is not None:
        writer.add_add_space_prefix(keys["add_space_prefix"])
    if keys.get("chat_template"):
        writer.add_chat_template(keys["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@contextmanager
def llama_vocab(path: Path) -> Iterator[llama_cpp.Llama]:
    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        yield llama
    finally:
        llama.close()


def llama_detokenize(llama: llama_cpp.Llama, ids: list[int]) -> bytes:
    """llama.cpp's `llama_detokenize(remove_special=False, unparse_special=True)`: a whole text's bytes."""
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    array = (llama_cpp.llama_token * len(ids))(*ids)
    size = 16 * len(ids) + 64
    buffer = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, array, len(ids), buffer, size, False, True)
    assert 0 <= n <= size
    return buffer.raw[:n]


def llama_special_ids(llama: llama_cpp.Llama) -> tuple[int, set[int], int, bool]:
    """llama.cpp's BOS id, end-of-generation ids, padding id (-1: none), and whether it adds BOS."""
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    ends = {i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    bos, pad = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_pad(vocab)
    return bos, ends, pad, llama_cpp.llama_vocab_get_add_bos(vocab)


def special_ids(tokenizer: Tokenizer) -> tuple[int | None, set[int], int, bool]:
    pad = -1 if tokenizer.pad_id is None else tokenizer.pad_id
    return tokenizer.bos_id, set(tokenizer.eos_ids), pad, tokenizer.add_bos


def rebuilt(path: Path) -> Tokenizer:
    return tokenizer_from_gguf(read_gguf(path).metadata, str(path))


def stream(tokenizer: Tokenizer, ids: list[int], start: bool) -> str:
    decoder = tokenizer.stream_decoder(start=start)
    return "".join([*(decoder.push(i) for i in ids), decoder.flush()])


def assert_like_llama_cpp(tokenizer: Tokenizer, llama: llama_cpp.Llama, text: str = TEXT) -> list[int]:
    """Same ids as llama.cpp (special tokens as text, and parsed), same token bytes; returns the ids."""
    ids = tokenizer.encode(text)
    assert ids == llama.tokenize(text.encode(), add_bos=False, special=False)
    assert llama.detokenize(ids) == stream(tokenizer, ids, start=False).encode()  # llama.cpp's token pieces
    with_control = text + CONTROL_TEXT
    assert tokenizer.encode(with_control, add_bos=True) == llama.tokenize(
        with_control.encode(), add_bos=True, special=True
    )
    return ids


# ------------------------------------------------------------------------------------------ byte-level BPE


@pytest.fixture(scope="module")
def shared_vocab() -> dict:
    """One vocabulary whose tokens cross every boundary a pre-tokenizer draws (digits, spaces, words,
    punctuation, contractions), so that splitting the text differently gives different ids."""
    chunks = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[^\n]{1,24}"), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    return byte_level_vocab(train_byte_level(chunks, vocab_size=900))


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_REGEXES))
def test_byte_level_trained_with_its_pre_tokenizer(tmp_path: Path, pre: str) -> None:
    vocab = byte_level_vocab(train_byte_level(HF_PRE_TOKENIZERS[pre]()))
    path = write_gguf(tmp_path / f"{pre}.gguf", "gpt2", vocab, pre=pre, bos=0, eos=1)
    tokenizer = rebuilt(path)
    with llama_vocab(path) as llama:
        ids = assert_like_llama_cpp(tokenizer, llama)
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode()) * 0.8  # merges happened: the test has teeth
    assert {vocab["tokens"].index(t) for t in USER_DEFINED} <= set(ids)


def test_every_pre_tokenizer_name_on_a_shared_vocabulary(tmp_path: Path, shared_vocab: dict) -> None:
    """Each name llama.cpp accepts, and a file without tokenizer.ggml.pre; the pre-tokenizers disagree with
    each other on this text, so a wrong regex cannot pass."""
    by_kind: dict[str, list[int]] = {}
    for name in [*GGUF_PRE_TOKENIZERS, None]:
        path = write_gguf(tmp_path / f"{name}.gguf", "gpt2", shared_vocab, pre=name, bos=0, eos=1)
        tokenizer = rebuilt(path)
        with llama_vocab(path) as llama:
            ids = assert_like_llama_cpp(tokenizer, llama)
            assert tokenizer.decode(ids) == TEXT
            assert special_ids(tokenizer) == llama_special_ids(llama), name
        kind = "default" if name is None else GGUF_PRE_TOKENIZERS[name]
        assert by_kind.setdefault(kind, ids) == ids
        assert gguf_pre_tokenizer_name(tokenizer.backend) == kind
    assert len({tuple(ids) for ids in by_kind.values()}) == len(PRE_TOKENIZER_REGEXES)


def test_llama_bpe_takes_whole_tokens_without_merging(tmp_path: Path) -> None:
    """llama.cpp's llama3 pre-tokenizer (ignore_merges): a piece that is a token is that token, even where
    its merges would build something else."""
    alphabet = list(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|bos|>", "<|eos|>", *alphabet, "bc", "ab", "abc"]
    vocab = {"tokens": tokens, "types": [3, 3] + [1] * (len(tokens) - 2), "merges": ["b c", "a b", "ab c"]}
    for pre, expected in (("llama-bpe", ["abc"]), ("gpt-2", ["a", "bc"])):
        path = write_gguf(tmp_path / f"{pre}.gguf", "gpt2", vocab, pre=pre, bos=0, eos=1)
        tokenizer = rebuilt(path)
        with llama_vocab(path) as llama:
            assert tokenizer.encode("abc") == llama.tokenize(b"abc", add_bos=False, special=False)
        assert [tokens[i] for i in tokenizer.encode("abc")] == expected


def test_contractions_are_not_case_folded(tmp_path: Path) -> None:
    """llama.cpp spells the contractions '[sS]... where Llama 3's and Qwen 2's tokenizer.json say (?i:'s...),
    which also matches "'ſ" (U+017F folds to s). qwen2 follows llama.cpp; llama-bpe keeps Meta's pattern,
    the one edgelm trains with and its GGUF exporter recognizes, so it splits "'ſam" as transformers does."""
    alphabet = list(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|bos|>", "<|eos|>", *alphabet, "¿a"]  # ſ is bytes C5 BF: "Å¿" byte-level
    vocab = {"tokens": tokens, "types": [3, 3] + [1] * (len(tokens) - 2), "merges": ["¿ a"]}
    for pre, like_llama_cpp in (("qwen2", True), ("llama-bpe", False)):
        path = write_gguf(tmp_path / f"{pre}.gguf", "gpt2", vocab, pre=pre, bos=0, eos=1)
        with llama_vocab(path) as llama:
            theirs = llama.tokenize("it'ſam".encode(), add_bos=False, special=False)
        assert tokens.index("¿a") in theirs  # llama.cpp kept "'ſam" one piece
        assert (rebuilt(path).encode("it'ſam") == theirs) == like_llama_cpp


def test_edgelm_trained_tokenizer_is_recognized() -> None:
    assert gguf_pre_tokenizer_name(train_tokenizer(["hello world " * 20], 300).backend) == "llama-bpe"


# --------------------------------------------------------------------------------------------- SentencePiece


def sentencepiece_vocab() -> dict:
    """An SPM-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, pieces with "▁" scored by merge order
    (an HF BPE trained with Metaspace and a small alphabet, so that rare characters need byte fallback),
    runs of "▁", and user-defined and control tokens."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, limit_alphabet=90, min_frequency=2, show_progress=False)
    backend.train_from_iterator(TRAIN * 3, trainer)
    trained = backend.get_vocab()
    head = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tail = ["▁▁", "▁▁▁▁", "<|im_start|>", "<|im_end|>", "<end_of_turn>", *USER_DEFINED]
    pieces = [p for p in sorted(trained, key=trained.__getitem__) if p not in {*head, *tail}]
    tokens = [*head, *pieces, *tail]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 1, 1, 3, 3, 3, 4, 4]
    scores = [0.0] * len(head) + [-float(i) for i in range(len(pieces))] + [-0.5, -1.5] + [0.0] * 5
    return {"tokens": tokens, "types": types, "scores": scores}


@pytest.mark.parametrize("space_prefix", [True, False])
def test_sentencepiece(tmp_path: Path, space_prefix: bool) -> None:
    vocab = sentencepiece_vocab()
    path = write_gguf(tmp_path / "spm.gguf", "llama", vocab, add_space_prefix=space_prefix)
    tokenizer = rebuilt(path)
    assert tokenizer.space_prefix == space_prefix and tokenizer.backend.model.unk_token == "<unk>"
    with llama_vocab(path) as llama:  # no special ids in the file: llama.cpp's defaults for SentencePiece
        assert special_ids(tokenizer) == llama_special_ids(llama)
        ids = assert_like_llama_cpp(tokenizer, llama)
        text = tokenizer.decode(ids)
        assert llama_detokenize(llama, ids) == text.encode()
        plain = TEXT.replace("<tool>", "").replace("café ✓", "")
        plain_ids = assert_like_llama_cpp(tokenizer, llama, plain)
        assert tokenizer.decode(plain_ids) == plain == llama_detokenize(llama, plain_ids).decode()
        for piece in ("Hi", " Hi", "  two spaces first"):  # the space prefix is removed once, at the start
            piece_ids = tokenizer.encode(piece)
            assert piece_ids == llama.tokenize(piece.encode(), add_bos=False, special=False)
            assert tokenizer.decode(piece_ids) == piece == stream(tokenizer, piece_ids, start=True)
            assert llama_detokenize(llama, piece_ids) == piece.encode()
    # text after a user-defined token gets a space prefix too (llama.cpp, and transformers' Llama tokenizer)
    assert text == (TEXT.replace("✓ ", "✓  ").replace("<tool> ", "<tool>  ") if space_prefix else TEXT)
    assert set(range(3, 259)) & set(ids)  # byte fallback happened
    assert {vocab["tokens"].index(t) for t in ("▁▁", "▁▁▁▁", *USER_DEFINED)} <= set(ids)
    assert tokenizer.backend.decode(plain_ids, skip_special_tokens=False) == plain  # HF's decoder
    assert stream(tokenizer, ids, start=True) == text
    assert stream(tokenizer, ids, start=False) == (" " + text if space_prefix else text)


# ------------------------------------------------------------------------------------- special ids and save


def test_special_ids_and_transformers(tmp_path: Path) -> None:
    """BOS/EOS/EOT/pad, add_bos_token and the chat template reach transformers, which encodes identically."""
    vocab = byte_level_vocab(train_byte_level(HF_PRE_TOKENIZERS["qwen2"]()))
    end = vocab["tokens"].index("<|im_end|>")
    path = write_gguf(
        tmp_path / "q.gguf",
        "gpt2",
        vocab,
        pre="qwen2",
        bos=0,
        eos=1,
        eot=end,
        pad=1,
        add_bos=False,
        chat_template=TEMPLATE,
    )
    tokenizer = rebuilt(path)
    assert (tokenizer.bos_id, tokenizer.eos_ids[:2], tokenizer.pad_id) == (0, (1, end), 1)
    assert tokenizer.chat_template == TEMPLATE
    with llama_vocab(path) as llama:
        assert special_ids(tokenizer) == llama_special_ids(llama)
        assert tokenizer.encode(TEXT, add_bos=True) == llama.tokenize(
            TEXT.encode(), add_bos=True, special=True
        )

    spm = sentencepiece_vocab()
    spm_path = write_gguf(tmp_path / "spm.gguf", "llama", spm, bos=1, eos=2, chat_template=TEMPLATE)
    for source, out in ((tokenizer, tmp_path / "qwen2"), (rebuilt(spm_path), tmp_path / "spm")):
        out.mkdir()
        source.save(out)
        hf = AutoTokenizer.from_pretrained(out)
        assert hf.encode(TEXT, add_special_tokens=False) == source.encode(TEXT)
        assert hf.encode(TEXT) == source.encode(TEXT, add_bos=True)
        assert hf.encode(TEXT) == [source.bos_id] * source.add_bos + source.encode(TEXT)
        assert hf.decode(source.encode(TEXT)) == source.decode(source.encode(TEXT))
        assert hf.chat_template == TEMPLATE and hf.eos_token_id == source.eos_ids[0]
        loaded = Tokenizer.load(out)
        assert loaded.encode(TEXT + CONTROL_TEXT, add_bos=True) == source.encode(
            TEXT + CONTROL_TEXT, add_bos=True
        )
        assert loaded.decode(source.encode(TEXT)) == source.decode(source.encode(TEXT))
        assert (loaded.add_bos, loaded.chat_template, loaded.space_prefix) == (
            source.add_bos,
            TEMPLATE,
            source.space_prefix,
        )


def test_errors(tmp_path: Path, shared_vocab: dict) -> None:
    metadata = read_gguf(write_gguf(tmp_path / "a.gguf", "gpt2", shared_vocab, pre="gpt-2")).metadata
    with pytest.raises(EdgelmError, match=r"pre-tokenizer 'tekken' .*gpt-2.*llama-bpe.*qwen2.*smollm"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.pre": "tekken"}, "x.gguf")
    with pytest.raises(EdgelmError, match=r"x\.gguf: .*tokenizer model 'bert'"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.model": "bert"}, "x.gguf")
    without_merges = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(EdgelmError, match=r"tokenizer\.ggml\.merges"):
        tokenizer_from_gguf(without_merges, "x.gguf")
    with pytest.raises(EdgelmError, match=r"tokenizer\.ggml\.scores"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.model": "llama"}, "x.gguf")
    with pytest.raises(EdgelmError, match=r"tokenizer.ggml.scores has 3 values for \d+ tokens"):
        tokenizer_from_gguf(
            {**metadata, "tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0] * 3}, "x"
        )
    with pytest.raises(EdgelmError, match=r"bos_token_id = 100000 is not an id"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.bos_token_id": 100_000}, "x.gguf")
    tokens = metadata["tokenizer.ggml.tokens"]
    with pytest.raises(EdgelmError, match="appears twice"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.tokens": [tokens[1], *tokens[1:]]}, "x.gguf")
    with pytest.raises(EdgelmError, match=r"lacks tokenizer\.ggml\.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"}, "x.gguf")


@pytest.mark.parametrize("space_prefix", [True, False])
def test_sentencepiece_tokenizer_exports_to_gguf(
    tmp_path: Path, small_tokenizer: Tokenizer, space_prefix: bool
) -> None:
    """A checkpoint with a SentencePiece tokenizer exports as llama.cpp's `llama` vocabulary (scores,
    token types, byte fallback, the space prefix): llama.cpp tokenizes the multilingual text as edgelm does,
    and the file imports back to the same ids."""
    from conftest import SMALL, make_checkpoint

    from edgelm.export.gguf import export_gguf
    from edgelm.importer import import_model

    tokenizer = rebuilt(
        write_gguf(tmp_path / "spm.gguf", "llama", sentencepiece_vocab(), add_space_prefix=space_prefix)
    )
    config = dataclasses.replace(SMALL, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_ids[0])
    checkpoint = make_checkpoint(tmp_path / "model", tokenizer, config)
    exported = export_gguf(checkpoint, tmp_path / "exported.gguf", "f32")
    metadata = read_gguf(exported).metadata
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.add_space_prefix"]) == (
        "llama",
        space_prefix,
    )
    with llama_vocab(exported) as llama:
        ids = assert_like_llama_cpp(tokenizer, llama)
    assert set(range(3, 259)) & set(ids)  # byte fallback happened
    assert Tokenizer.load(import_model(exported, tmp_path / "back")).encode(TEXT) == ids


def test_sentencepiece_merges_llama_cpp_would_not_follow_are_refused(tmp_path: Path) -> None:
    """llama.cpp merges any adjacent pair whose union is a piece: a tokenizer that lists fewer merges would
    tokenize otherwise there, and its export is refused, naming a text where the two differ."""
    from edgelm.formats.gguf_tokenizer import tokenizer_metadata

    tokenizer = rebuilt(write_gguf(tmp_path / "spm.gguf", "llama", sentencepiece_vocab()))
    state = json.loads(tokenizer.backend.to_str())
    whole = [t for t in state["model"]["vocab"] if t.startswith("▁") and len(tokenizer.encode(t[1:])) == 1]
    longest = max(whole, key=len)  # a piece the tokenizer makes from its own text
    state["model"]["merges"] = [m for m in state["model"]["merges"] if "".join(m) != longest]
    fewer = Tokenizer(HFTokenizer.from_str(json.dumps(state)), tokenizer.bos_id, list(tokenizer.eos_ids))
    with pytest.raises(EdgelmError, match=r"llama\.cpp would tokenize"):
        tokenizer_metadata(fewer, tmp_path, fewer.vocab_size)


@pytest.mark.parametrize("pre", sorted(HF_PRE_TOKENIZERS))
def test_models_own_pre_tokenizers_export_under_llama_cpp_names(tmp_path: Path, pre: str) -> None:
    """A tokenizer.json as the models ship it (Qwen's case-folded contractions, Phi-4-mini's GPT-4o split,
    ByteLevel with trim_offsets either way) is recognized as llama.cpp's pre-tokenizer, and llama.cpp then
    tokenizes as the tokenizer does. ("default" and "gpt-2" are one Hugging Face pre-tokenizer: gpt-2.)"""
    backend = train_byte_level(HF_PRE_TOKENIZERS[pre]())
    state = json.loads(backend.to_str())
    for step in state["pre_tokenizer"].get("pretokenizers", [state["pre_tokenizer"]]):
        if step["type"] == "ByteLevel":
            step["trim_offsets"] = False
    backend = HFTokenizer.from_str(json.dumps(state))
    backend.decoder = decoders.ByteLevel()
    name = gguf_pre_tokenizer_name(backend)
    assert name == ("gpt-2" if pre == "default" else pre)
    vocab = byte_level_vocab(backend)
    tokenizer = Tokenizer(backend, 0, [1])
    with llama_vocab(write_gguf(tmp_path / f"{pre}.gguf", "gpt2", vocab, pre=name, bos=0, eos=1)) as llama:
        assert tokenizer.encode(TEXT) == llama.tokenize(TEXT.encode(), add_bos=False, special=False)
