"""GGUF ⇄ tokenizer: rebuild the tokenizer of any GGUF file (byte-level BPE or SentencePiece) so that it
gives llama.cpp's ids, and the `tokenizer.ggml.*` metadata that makes llama.cpp tokenize as edgelm does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

from edgelm.errors import EdgelmError
from edgelm.formats.gguf import DEFAULT_TOKEN_IDS
from edgelm.tokenizer import (
    BYTE_PIECE,
    PRE_TOKENIZER_REGEXES,
    SPACE,
    Tokenizer,
    pre_tokenizer,
    split_then_bytes,
)

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
    "gpt-4o": "gpt-4o",
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


# Qwen 2/2.5/3's own tokenizer.json spelling of llama.cpp's qwen2 pre-tokenizer: its contractions case-fold
# ("(?i:'s|...)"), which splits otherwise only where Unicode folds a letter to s, t, ... ("'ſ"); llama.cpp's
# converter takes Qwen's tokenizers as qwen2, and so does the GGUF export
QWEN_TOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_OWN_SPELLINGS = {"qwen2": (QWEN_TOKENIZER_PATTERN,)}


def gguf_pre_tokenizer_name(backend: HFTokenizer) -> str | None:
    """The `tokenizer.ggml.pre` name of the backend's pre-tokenizer, or None if it is none of edgelm's
    (nor a model's own spelling of one of them). ByteLevel's trim_offsets, which moves no token boundary,
    is not compared."""
    if backend.pre_tokenizer is None:
        return None
    state = _without_offsets(json.loads(backend.pre_tokenizer.__getstate__()))
    for name in PRE_TOKENIZER_REGEXES:
        spellings = [pre_tokenizer(name)]
        spellings += [split_then_bytes(*_OWN_SPELLINGS[name])] if name in _OWN_SPELLINGS else []
        if any(_without_offsets(json.loads(p.__getstate__())) == state for p in spellings):
            return name
    return None


def _without_offsets(state: Any) -> Any:
    """A pre-tokenizer's state without the trim_offsets settings."""
    if isinstance(state, dict):
        return {k: _without_offsets(v) for k, v in state.items() if k != "trim_offsets"}
    if isinstance(state, list):
        return [_without_offsets(v) for v in state]
    return state


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
        return backend, {**DEFAULT_TOKEN_IDS["gpt2"], "add_bos": kind == "llama-bpe"}
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
        return backend, {**DEFAULT_TOKEN_IDS["llama"], "add_bos": True}
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
    backend.pre_tokenizer = pre_tokenizer(pre)
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


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """The name llama.cpp gives the tokenizer's pre-tokenizer; anything it would split differently fails."""
    name = gguf_pre_tokenizer_name(tokenizer.backend)
    if name is None:
        spec = json.loads(tokenizer.backend.to_str())["pre_tokenizer"]
        raise EdgelmError(
            f"the tokenizer's pre-tokenizer {spec!r} is not one that llama.cpp recognizes (edgelm writes "
            f"{', '.join(PRE_TOKENIZER_REGEXES)}); GGUF export needs a tokenizer that splits text the way "
            "llama.cpp will"
        )
    return name


def tokenizer_metadata(tokenizer: Tokenizer, checkpoint: Path, vocab_size: int) -> dict[str, Any]:
    """Every `tokenizer.ggml.*` value llama.cpp needs to reproduce the tokenizer's ids: "model" gpt2
    (byte-level BPE: tokens, types, merges, the pre-tokenizer's name) or llama (SentencePiece BPE: tokens,
    types, scores, the unknown token and the space prefix). llama.cpp wants a token for each of the
    model's `vocab_size` embedding rows: the rows past the tokenizer's last id get unused `[PAD<id>]`
    tokens, as its converter writes them."""
    metadata = _vocabulary(tokenizer, checkpoint)
    missing = vocab_size - len(metadata["tokens"])
    if missing < 0:
        raise EdgelmError(
            f"{checkpoint}: the tokenizer has {len(metadata['tokens'])} tokens, more than the model's "
            f"vocab_size of {vocab_size}"
        )
    start = len(metadata["tokens"])
    metadata["tokens"] = metadata["tokens"] + [f"[PAD{i}]" for i in range(start, vocab_size)]
    metadata["types"] = metadata["types"] + [UNUSED] * missing
    if "scores" in metadata:
        metadata["scores"] = metadata["scores"] + [-1000.0] * missing  # never preferred, as llama.cpp's
    return metadata


def _vocabulary(tokenizer: Tokenizer, checkpoint: Path) -> dict[str, Any]:
    """The tokenizer's own `tokenizer.ggml.*` values, one token per id it has."""
    model = json.loads(tokenizer.backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise EdgelmError(f"{checkpoint}: GGUF export supports BPE tokenizers, not {model.get('type')}")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(tokenizer.token_bytes)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    if "" in tokens:
        raise EdgelmError(f"{checkpoint}: tokenizer ids are not contiguous (id {tokens.index('')} is unused)")
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    types = [CONTROL if added.get(t) else USER_DEFINED if t in added else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
        return _sentencepiece_metadata(tokenizer, tokens, types, merges, model.get("unk_token"), checkpoint)
    return {
        "model": "gpt2",
        "pre": pre_tokenizer_name(tokenizer),
        "tokens": tokens,
        "types": types,
        "merges": merges,
    }


def _sentencepiece_metadata(
    tokenizer: Tokenizer,
    tokens: list[str],
    types: list[int],
    merges: list[str],
    unk_token: str | None,
    checkpoint: Path,
) -> dict[str, Any]:
    """SentencePiece BPE as llama.cpp's `llama` vocabulary: each piece scored by the rank of the first merge
    that makes it (llama.cpp merges the adjacent pair whose union scores highest), <0xNN> pieces as bytes.
    llama.cpp merges any two adjacent pieces whose union is a piece, where the tokenizer merges only the
    pairs it lists: the export holds the two equal on every piece of the vocabulary and refuses otherwise."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    scores = [-1.0 - rank[t] if t in rank else 0.0 for t in tokens]
    types = [
        UNKNOWN if t == unk_token else BYTE if kind == NORMAL and BYTE_PIECE.fullmatch(t) else kind
        for t, kind in zip(tokens, types, strict=True)
    ]
    rebuilt = _sentencepiece_backend(tokens, scores, unk_token, tokenizer.space_prefix, str(checkpoint))
    _add_gguf_tokens(rebuilt, tokens, types)  # as the file's reader, and llama.cpp, match them first
    # each piece's text, less the "▁" the space prefix puts back
    pieces = [t for t, kind in zip(tokens, types, strict=True) if kind == NORMAL]
    strip = tokenizer.space_prefix
    surfaces = [(t[1:] if strip and t.startswith(SPACE) else t).replace(SPACE, " ") for t in pieces]
    ours = tokenizer.backend.encode_batch(surfaces, add_special_tokens=False)
    theirs = rebuilt.encode_batch(surfaces, add_special_tokens=False)
    for text, a, b in zip(surfaces, ours, theirs, strict=True):
        if a.ids != b.ids:
            raise EdgelmError(
                f"{checkpoint}: llama.cpp would tokenize {text!r} as {b.ids}, the tokenizer as {a.ids} (it "
                "leaves out merges llama.cpp makes); GGUF export needs a SentencePiece tokenizer whose "
                "merges are every split of each piece"
            )
    return {
        "model": "llama",
        "tokens": tokens,
        "types": types,
        "scores": scores,
        "unk": tokens.index(unk_token) if unk_token in tokens else None,
        "space_prefix": tokenizer.space_prefix,
    }
