"""Tokenizers: train byte-level BPE with Hugging Face `tokenizers`, save and load `tokenizer.json`, rebuild
the tokenizer of any GGUF file (byte-level BPE or SentencePiece) so that it gives llama.cpp's ids, encode,
and decode incrementally for streaming without ever emitting half a UTF-8 character."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
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

# llama.cpp's BPE pre-tokenizers (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*) as the regexes it applies in
# turn: each one splits every piece the previous ones left, its matches and the gaps between them becoming
# pieces of their own (Hugging Face: Split(behavior="isolated")), and the pieces are then byte-encoded.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (GPT2_PATTERN,),
    "llama-bpe": (SPLIT_PATTERN,),
    "qwen2": (QWEN2_PATTERN,),
    "smollm": (r"\p{N}", GPT2_PATTERN),
}
# `tokenizer.ggml.pre` values that llama.cpp maps to one of the pre-tokenizers above
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    "default": "default",
    "gpt-2": "gpt-2",
    "phi-2": "gpt-2",
    "mpt": "gpt-2",
    "olmo": "gpt-2",
    "llama-bpe": "llama-bpe",
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "falcon3": "llama-bpe",
    "pixtral": "llama-bpe",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
    "smollm": "smollm",
    "starcoder": "smollm",
    "refact": "smollm",
    "codeshell": "smollm",
}
# llama.cpp's `tokenizer.ggml.token_type` values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# texts that make a token end generation in llama.cpp whatever its metadata says (the stable core of its list)
END_OF_GENERATION = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
)
SPACE = "▁"  # U+2581, SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
        return [self.bos_id, *ids] if add_bos and self.add_bos else ids

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
            _special_id(backend, settings.get(key, default), path) if settings.get(key, default) else None
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


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
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
    return pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[name]),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def gguf_pre_tokenizer_name(backend: HFTokenizer) -> str | None:
    """The `tokenizer.ggml.pre` name of the backend's pre-tokenizer, or None if it is none of edgelm's."""
    if backend.pre_tokenizer is None:
        return None
    state = json.loads(backend.pre_tokenizer.__getstate__())
    for name in PRE_TOKENIZER_REGEXES:
        if json.loads(_pre_tokenizer(name).__getstate__()) == state:
            return name
    return None


def tokenizer_from_gguf(metadata: dict, where: str) -> Tokenizer:
    """Rebuild the tokenizer of a GGUF file from its `tokenizer.*` metadata, giving llama.cpp's token ids.

    `tokenizer.ggml.model` "gpt2" is byte-level BPE with one of llama.cpp's pre-tokenizers (see
    GGUF_PRE_TOKENIZERS); "llama" is SentencePiece BPE, whose merges are ranked by the scores of the pieces
    they make. CONTROL and UNKNOWN tokens become special tokens and USER_DEFINED tokens added tokens, both
    matched in the raw text before anything else, as llama.cpp does. `eos_ids` are the EOS, EOT and EOM ids
    and the tokens llama.cpp ends generation at by their text. `where` names the file in errors.
    """
    tokens = _gguf_tokens(metadata, where)
    types = _gguf_array(metadata, "tokenizer.ggml.token_type", len(tokens), where) or [NORMAL] * len(tokens)
    backend, defaults = _gguf_backend(metadata, tokens, where)
    _add_gguf_tokens(backend, tokens, types)
    bos = _gguf_token_id(metadata, "bos", defaults["bos"], len(tokens), where)
    eos = _gguf_token_id(metadata, "eos", defaults["eos"], len(tokens), where)
    ends = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    ends += [i for i, t in enumerate(tokens) if t in END_OF_GENERATION]
    eos_ids = list(dict.fromkeys([eos, *(i for i in ends if isinstance(i, int) and 0 <= i < len(tokens))]))
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", defaults["add_bos"]))
    if add_bos:  # what transformers adds for add_special_tokens=True, as llama.cpp does for add_special
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    pad = metadata.get("tokenizer.ggml.padding_token_id")
    template = metadata.get("tokenizer.chat_template")
    return Tokenizer(
        backend,
        bos,
        eos_ids,
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
        pad_id=pad if isinstance(pad, int) and 0 <= pad < len(tokens) else None,
    )


def _gguf_backend(metadata: dict, tokens: list[str], where: str) -> tuple[HFTokenizer, dict[str, Any]]:
    """The Hugging Face tokenizer for `tokenizer.ggml.model`, and llama.cpp's defaults for that model: the
    BOS and EOS ids when the file names none, and whether BOS is added when add_bos_token is missing."""
    model = metadata.get("tokenizer.ggml.model")
    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre") or "default"  # llama.cpp's choice when the key is missing
        if pre not in GGUF_PRE_TOKENIZERS:
            raise EdgelmError(
                f"{where}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; edgelm knows "
                f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
            )
        kind = GGUF_PRE_TOKENIZERS[pre]
        backend = _byte_level_backend(tokens, metadata.get("tokenizer.ggml.merges"), kind, where)
        return backend, {"bos": 11, "eos": 11, "add_bos": kind == "llama-bpe"}
    if model == "llama":
        scores = _gguf_array(metadata, "tokenizer.ggml.scores", len(tokens), where)
        if scores is None:
            raise EdgelmError(
                f"{where}: a SentencePiece tokenizer needs tokenizer.ggml.scores (the piece scores rank its "
                "merges), and this file has none"
            )
        unk = metadata.get("tokenizer.ggml.unknown_token_id", 0)
        unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
        space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_backend(tokens, scores, unk_token, space_prefix, where)
        return backend, {"bos": 1, "eos": 2, "add_bos": True}
    raise EdgelmError(
        f"{where}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; edgelm reads "
        "'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
    )


def _add_gguf_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """CONTROL and UNKNOWN tokens as special tokens, USER_DEFINED ones as added tokens: each is matched in the
    raw text before the rest is tokenized (llama.cpp: the special ones where it parses special tokens)."""
    kinds = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, k in kinds if k in (UNKNOWN, CONTROL)]
    backend.add_special_tokens(special)
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED]
    )


def _gguf_tokens(metadata: dict, where: str) -> list[str]:
    """`tokenizer.ggml.tokens`, with llama.cpp's name for empty tokens; duplicates are an error."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise EdgelmError(f"{where}: the tokenizer metadata lacks tokenizer.ggml.tokens (a list of strings)")
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != len(tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise EdgelmError(
                    f"{where}: token {t!r} appears twice in tokenizer.ggml.tokens (ids {seen[t]}, {i})"
                )
            seen[t] = i
    return tokens


def _gguf_array(metadata: dict, key: str, n: int, where: str) -> list | None:
    """The first `n` values of a per-token array, None when the key is missing; fewer is an error."""
    values = metadata.get(key)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) < n:
        count = len(values) if isinstance(values, list) else type(values).__name__
        raise EdgelmError(f"{where}: {key} has {count} values for {n} tokens")
    return values[:n]


def _gguf_token_id(metadata: dict, name: str, default: int, n: int, where: str) -> int:
    """`tokenizer.ggml.<name>_token_id`, or llama.cpp's default for the tokenizer model when it is missing."""
    key = f"tokenizer.ggml.{name}_token_id"
    token_id = metadata.get(key, default)
    if not isinstance(token_id, int) or not 0 <= token_id < n:
        raise EdgelmError(
            f"{where}: {key} = {token_id} is not an id of the {n}-token vocabulary"
            + ("" if key in metadata else " (it is missing, and this is llama.cpp's default)")
        )
    return token_id


def _byte_level_backend(tokens: list[str], merges: Any, pre: str, where: str) -> HFTokenizer:
    """Byte-level BPE from GGUF tokens and merges ("a b": a and b merge, earlier merges first)."""
    if not isinstance(merges, list):
        raise EdgelmError(
            f"{where}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, and this file has none"
        )
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1) if isinstance(merge, str) else -1
        if cut > 0:  # llama.cpp splits at the first space after the first character and ignores other entries
            pairs.append((merge[:cut], merge[cut + 1 :]))
    vocab = {t: i for i, t in enumerate(tokens)}
    try:  # llama.cpp's llama3 pre-tokenizer takes a piece that is a token whole, without merging
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe")
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise EdgelmError(f"{where}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from None
    backend = HFTokenizer(model)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    tokens: list[str], scores: list[float], unk_token: str | None, space_prefix: bool, where: str
) -> HFTokenizer:
    """SentencePiece BPE as Hugging Face builds Llama's tokenizer.json: merges ranked by piece score, byte
    fallback to <0xNN> tokens, spaces written as "▁" and one put before the text when `space_prefix`."""
    if not all(isinstance(s, int | float) for s in scores):
        raise EdgelmError(f"{where}: tokenizer.ggml.scores must be numbers")
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=sentencepiece_merges(tokens, scores),
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = HFTokenizer(model)
    replace = normalizers.Replace(" ", SPACE)
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if space_prefix else replace
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if space_prefix else steps)
    return backend


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's: (a, b) whenever a, b and a+b are pieces, the pairs ranked by
    the score of a+b, highest first (llama.cpp merges the adjacent pair whose union scores highest)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token_id, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


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


def _post_processor_adds_bos(backend: HFTokenizer, bos: int | None) -> bool:
    """Whether encoding with special tokens puts the BOS id in front, as a Llama tokenizer.json does."""
    return bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos]


def _special_id(backend: HFTokenizer, token: str | dict, path: Path) -> int:
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
        elif match := _BYTE_PIECE.fullmatch(token):
            table[token_id] = bytes([int(match.group(1), 16)])
        else:
            table[token_id] = token.replace(SPACE, " ").encode("utf-8")
    return table
