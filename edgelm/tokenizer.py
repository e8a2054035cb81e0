"""Tokenizers: train byte-level BPE with Hugging Face `tokenizers`, save and load `tokenizer.json`, encode,
and decode incrementally for streaming without ever emitting half a UTF-8 character. (A GGUF file's
tokenizer is rebuilt by `edgelm.formats.gguf_tokenizer`.)"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling, write_json_atomic

BOS, EOS = "<|bos|>", "<|eos|>"

# Llama 3's split pattern (llama.cpp calls it "llama-bpe"): words, numbers in groups of at most three
# digits, punctuation runs, and whitespace runs that keep a line's indentation together. Meta's spelling,
# which the GGUF exporter recognizes; llama.cpp spells the contractions '[sS]|'[tT]..., unlike it on "'ſ".
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's pattern: contractions, words, numbers and punctuation runs each with one leading space, whitespace
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Qwen 2's pattern: Llama 3's with single digits, the contractions spelled as llama.cpp does (no case folding)
QWEN2_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-4o's pattern (o200k, Phi-4-mini's): words split before an upper-case run, contractions kept on them,
# numbers in groups of three, punctuation runs with the newlines and slashes after them
GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's BPE pre-tokenizers (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*) as the regexes it applies in
# turn: each one splits every piece the previous ones left, its matches and the gaps between them becoming
# pieces of their own (Hugging Face: Split(behavior="isolated")), and the pieces are then byte-encoded.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (GPT2_PATTERN,),
    "llama-bpe": (SPLIT_PATTERN,),
    "qwen2": (QWEN2_PATTERN,),
    "smollm": (r"\p{N}", GPT2_PATTERN),
    "gpt-4o": (GPT4O_PATTERN,),
}
SPACE = "▁"  # U+2581, SentencePiece's visible space
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MAX_TRAINING_RUN = 256  # characters of one kind in a row tokenizer training sees (the stdlib has none longer)
_LONG_RUN = re.compile(rf"(.)\1{{{MAX_TRAINING_RUN},}}", re.DOTALL)


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
    """A byte-level BPE or SentencePiece tokenizer with its special ids and the raw bytes of every token.

    `add_bos`: whether a sequence begins with the BOS id (`add_bos_token`); `chat_template`: the model's Jinja
    chat template, if it has one; `space_prefix`: a SentencePiece tokenizer that puts "▁" before the text,
    which `decode` removes again.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        bos_id: int | None,
        eos_ids: Sequence[int],
        add_bos: bool = True,
        chat_template: str | None = None,
        pad_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos and bos_id is not None  # Qwen2, for one, has no BOS token
        self.chat_template = chat_template
        self.pad_id = pad_id
        self.space_prefix = _decoding(backend) == "sentencepiece+strip"
        self.token_bytes = _token_bytes(backend)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self.token_bytes)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` starts a sequence: the BOS id in front if the tokenizer adds one.

        As llama.cpp's `llama_tokenize(add_special=add_bos, parse_special=True)`: the text of a special token
        becomes that token.
        """
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
        if add_bos and self.add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` as the start of a text (a SentencePiece space prefix is removed); bytes that do
        not form UTF-8 become U+FFFD, as in `tokenizers`' byte-level decoder."""
        data = b"".join(self._bytes_of(i) for i in ids)
        if self.space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, start: bool = False) -> StreamDecoder:
        """A decoder fed one id at a time that returns only complete characters.

        `start`: the ids begin a text, so a SentencePiece space prefix is removed as `decode` does; leave it
        False for a continuation, such as the tokens generated after a prompt (llama.cpp's token pieces).
        """
        return StreamDecoder(self, strip_space=start and self.space_prefix)

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
        settings: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None if self.bos_id is None else self.backend.id_to_token(self.bos_id),
            "eos_token": self.backend.id_to_token(self.eos_ids[0]) if self.eos_ids else None,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        unk = getattr(self.backend.model, "unk_token", None)
        if unk:
            settings["unk_token"] = unk
        if self.pad_id is not None:
            settings["pad_token"] = self.backend.id_to_token(self.pad_id)
        if context_length is not None:
            settings["model_max_length"] = context_length
        if self.chat_template:
            settings["chat_template"] = self.chat_template
        write_json_atomic(directory / "tokenizer_config.json", settings)

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Read `tokenizer.json` (+ `tokenizer_config.json`: special tokens, add_bos_token, chat template)."""
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
        # a key set to null (Qwen2's bos_token) means the tokenizer has no such token
        bos, eos, pad = (
            _special_id(backend, token, path) if (token := settings.get(key, default)) else None
            for key, default in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", None))
        )
        # without add_bos_token, what the tokenizer's post-processor does is what transformers does
        adds_bos = settings.get("add_bos_token", _post_processor_adds_bos(backend, bos))
        template = settings.get("chat_template")
        return cls(
            backend,
            bos,
            [eos] if eos is not None else [],
            add_bos=bool(adds_bos),
            chat_template=template if isinstance(template, str) else None,
            pad_id=pad,
        )


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, strip_space: bool = False) -> None:
        self._tokenizer = tokenizer
        self._strip_space = strip_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly empty)."""
        data = self._tokenizer._bytes_of(token_id)
        if self._strip_space and data:
            data = data[1:] if data.startswith(b" ") else data
            self._strip_space = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is held back at the end of a sequence, with U+FFFD for an incomplete character."""
        return self._utf8.decode(b"", final=True)


def pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """Hugging Face's form of the llama.cpp pre-tokenizer `name` (a key of PRE_TOKENIZER_REGEXES)."""
    if name == "gpt-2":  # as in GPT-2's tokenizer.json: the byte-level step splits with GPT2_PATTERN itself
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":  # as in SmolLM's tokenizer.json: every digit alone, then GPT-2
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return split_then_bytes(*PRE_TOKENIZER_REGEXES[name])


def split_then_bytes(*regexes: str) -> pre_tokenizers.PreTokenizer:
    """Split by each regex in turn (matches and gaps both pieces), then byte-encode the pieces."""
    return pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with BOS and EOS as ids 0 and 1 on an iterable of documents."""
    if vocab_size < 256 + 2:
        raise EdgelmError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + BOS + EOS)"
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer("llama-bpe")
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator((_bounded_runs(text) for text in texts), trainer)
    bos, eos = _special_id(backend, BOS, "trained tokenizer"), _special_id(backend, EOS, "trained tokenizer")
    # transformers' PreTrainedTokenizerFast adds BOS through the post-processor, as for Llama
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return Tokenizer(backend, bos, [eos])


def _bounded_runs(text: str) -> str:
    """The text with each run of one character cut to MAX_TRAINING_RUN: the BPE trainer's time grows about
    4x per doubling of such a run (a megabyte of NUL bytes would take minutes), and no merge it learns
    needs a longer one."""
    return _LONG_RUN.sub(lambda run: run.group(0)[:MAX_TRAINING_RUN], text)


def _post_processor_adds_bos(backend: HFTokenizer, bos: int | None) -> bool:
    """Whether encoding with special tokens puts the BOS id in front, as a Llama tokenizer.json does."""
    return bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos]


def _special_id(backend: HFTokenizer, token: str | dict, path: Path | str) -> int:
    """The id of a special token given as its text or as tokenizer_config.json's {"content": ...} form."""
    content = token["content"] if isinstance(token, dict) else token
    token_id = backend.token_to_id(content)
    if token_id is None:
        raise EdgelmError(f"{path}: special token {content!r} is not in the vocabulary")
    return token_id


def _decoding(backend: HFTokenizer) -> str:
    """How the backend's tokens become bytes: "byte-level" (GPT-2's byte characters), "sentencepiece"
    ("▁" for a space, <0xNN> for a byte), or "sentencepiece+strip" (also removing the space prefix)."""
    state = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    if state.get("type") == "ByteLevel":
        return "byte-level"
    steps = state.get("decoders", []) if state.get("type") == "Sequence" else []
    kinds = [s.get("type") for s in steps]
    if kinds[:3] == ["Replace", "ByteFallback", "Fuse"] and steps[0] == {
        "type": "Replace",
        "pattern": {"String": SPACE},
        "content": " ",
    }:
        if len(steps) == 3:
            return "sentencepiece"
        if len(steps) == 4 and steps[3] == {"type": "Strip", "content": " ", "start": 1, "stop": 0}:
            return "sentencepiece+strip"
    raise EdgelmError(
        "only byte-level BPE and SentencePiece (Replace ▁, ByteFallback, Fuse, Strip) tokenizers are "
        f"supported, not decoder {state or None}"
    )


def _token_bytes(backend: HFTokenizer) -> list[bytes]:
    """The bytes each id stands for, as llama.cpp's token pieces: added (special and user-defined) tokens
    stand for their UTF-8 text; byte-level tokens for their bytes; SentencePiece pieces for their text with
    "▁" as a space, and <0xNN> tokens for the byte NN."""
    byte_level = _decoding(backend) == "byte-level"
    unicode_to_byte = {c: b for b, c in byte_to_unicode().items()}
    # a vocabulary has tens of thousands of tokens, so both steps run in C: a regex finds a character that
    # stands for no byte, and str.translate maps the others to the latin-1 character of their byte
    other_character = re.compile("[^" + "".join(map(re.escape, unicode_to_byte)) + "]")
    to_latin1 = str.maketrans({c: chr(b) for c, b in unicode_to_byte.items()})
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        if token in added:
            table[token_id] = token.encode("utf-8")
        elif byte_level:
            if other_character.search(token) is None:
                table[token_id] = token.translate(to_latin1).encode("latin-1")
            else:
                table[token_id] = token.encode("utf-8")
        elif match := BYTE_PIECE.fullmatch(token):
            table[token_id] = bytes([int(match.group(1), 16)])
        else:
            table[token_id] = token.replace(SPACE, " ").encode("utf-8")
    return table
