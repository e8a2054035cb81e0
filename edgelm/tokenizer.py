"""Byte-level BPE: train with Hugging Face `tokenizers`, save and load `tokenizer.json`, encode, and
decode incrementally for streaming without ever emitting half a UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling, write_json_atomic

BOS, EOS = "<|bos|>", "<|eos|>"

# Llama 3's split pattern (llama.cpp calls it "llama-bpe"): words, numbers in groups of at most three
# digits, punctuation runs, and whitespace runs that keep a line's indentation together.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to the printable characters of byte-level vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class Tokenizer:
    """A byte-level BPE tokenizer with BOS/EOS ids and the raw bytes of every token."""

    def __init__(self, backend: HFTokenizer, bos_id: int, eos_ids: Sequence[int]) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.token_bytes = _token_bytes(backend)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, with the BOS id in front when `add_bos`."""
        if not isinstance(text, str):
            raise EdgelmError(f"text to encode must be a str, not {type(text).__name__}")
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except (TypeError, UnicodeEncodeError):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise EdgelmError(f"text is not valid Unicode at character {e.start}: {e.reason}") from None
            raise
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that do not form UTF-8 become U+FFFD, as in `tokenizers`."""
        return b"".join(self._bytes_of(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A decoder fed one id at a time that returns only complete characters."""
        return StreamDecoder(self)

    def _bytes_of(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self.token_bytes):
            raise EdgelmError(f"token id {token_id} is outside the vocabulary (size {len(self.token_bytes)})")
        return self.token_bytes[token_id]

    def save(self, directory: Path, context_length: int | None = None) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (transformers' fast tokenizer reads them)."""
        directory = Path(directory)
        tmp = temporary_sibling(directory / "tokenizer.json")
        self.backend.save(str(tmp))
        tmp.replace(directory / "tokenizer.json")
        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.backend.id_to_token(self.bos_id),
            "eos_token": self.backend.id_to_token(self.eos_ids[0]),
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if context_length is not None:
            settings["model_max_length"] = context_length
        write_json_atomic(directory / "tokenizer_config.json", settings)

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Read `tokenizer.json` (+ `tokenizer_config.json` for the BOS/EOS tokens) from a directory."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise EdgelmError(f"{directory}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise EdgelmError(f"{path}: not a valid tokenizer file ({e})") from None
        settings = (
            read_json(directory / "tokenizer_config.json")
            if (directory / "tokenizer_config.json").is_file()
            else {}
        )
        bos = _special_id(backend, settings.get("bos_token", BOS), path)
        eos = _special_id(backend, settings.get("eos_token", EOS), path)
        return cls(backend, bos, [eos])


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly empty)."""
        return self._utf8.decode(self._tokenizer._bytes_of(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end of a sequence, with U+FFFD for an incomplete character."""
        return self._utf8.decode(b"", final=True)


# GGUF's names for the pre-tokenizers edgelm can rebuild: llama.cpp's `tokenizer.ggml.pre` values
GGUF_PRE_TOKENIZERS = ("llama-bpe", "gpt-2")


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    if name == "llama-bpe":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "gpt-2"


def tokenizer_from_gguf(metadata: dict, where: str) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from a GGUF file's `tokenizer.ggml.*` metadata."""
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise EdgelmError(
            f"{where}: tokenizer model {model!r} is not supported yet (edgelm reads byte-level BPE, "
            "tokenizer.ggml.model = gpt2)"
        )
    if pre not in GGUF_PRE_TOKENIZERS:
        raise EdgelmError(
            f"{where}: pre-tokenizer {pre!r} is not supported yet; edgelm knows "
            f"{', '.join(GGUF_PRE_TOKENIZERS)}"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise EdgelmError(
            f"{where}: the tokenizer metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges"
        )
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == 3
        ]
    )
    bos = metadata.get("tokenizer.ggml.bos_token_id", 0)
    eos = [
        metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in metadata
    ]
    return Tokenizer(backend, bos, eos or [1])


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with BOS and EOS as ids 0 and 1 on an iterable of documents."""
    if vocab_size < 256 + 2:
        raise EdgelmError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + BOS + EOS)"
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer("llama-bpe")
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    bos, eos = backend.token_to_id(BOS), backend.token_to_id(EOS)
    # transformers' PreTrainedTokenizerFast adds BOS through the post-processor, as for Llama
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return Tokenizer(backend, bos, [eos])


def _special_id(backend: HFTokenizer, token: str | dict, path: Path) -> int:
    content = token["content"] if isinstance(token, dict) else token
    token_id = backend.token_to_id(content)
    if token_id is None:
        raise EdgelmError(f"{path}: special token {content!r} is not in the vocabulary")
    return token_id


def _token_bytes(backend: HFTokenizer) -> list[bytes]:
    """The bytes each id stands for; special tokens stand for their UTF-8 text."""
    if not isinstance(backend.decoder, decoders.ByteLevel):
        raise EdgelmError(f"only byte-level BPE tokenizers are supported, not decoder {backend.decoder!r}")
    unicode_to_byte = {c: b for b, c in byte_to_unicode().items()}
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        if token in special or any(c not in unicode_to_byte for c in token):
            table[token_id] = token.encode("utf-8")
        else:
            table[token_id] = bytes(unicode_to_byte[c] for c in token)
    return table
