"""Corpora → documents → a train/validation split by document → token arrays cached on disk → batches."""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.files import NotUtf8Error, read_json, read_text, temporary_sibling, write_json_atomic
from edgelm.tokenizer import Tokenizer, train_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
# test suites and bundled packages make the built-in corpus larger, not better
_BUILTIN_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
DEFAULT_VAL_FRACTION = 0.05  # the share of documents held out for validation


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a path, or "path:line" for a JSONL record
    text: str


@dataclass(frozen=True)
class TokenData:
    """The tokenized corpus of a run: token arrays (memory-mapped) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer


def builtin_corpus() -> list[Path]:
    """The default corpus, present on every machine: the Python standard library's own source files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _BUILTIN_SKIP & set(p.relative_to(root).parts))


def builtin_calibration_text(chars: int) -> str:
    """About `chars` characters of the built-in corpus's training documents, never its held-out ones (on
    which `edgelm check` evaluates by default), in the split's hash order so that they span the library."""
    train, _ = split_documents(read_documents(builtin_corpus(), skip_undecodable=True), DEFAULT_VAL_FRACTION)
    taken, size = [], 0
    for document in sorted(train, key=_rank):
        if size >= chars:
            break
        taken.append(document.text)
        size += len(document.text)
    return "\n\n".join(taken)[:chars]


def find_corpus_files(sources: Sequence[str]) -> list[Path]:
    """Expand files, folders (searched recursively) and glob patterns into a sorted list of text files."""
    found: set[Path] = set()
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        else:
            matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
            files = [p for p in matches if p.is_file() and p.suffix in TEXT_SUFFIXES]
            if not files:
                raise EdgelmError(f"corpus: {source!r} matches no file ({', '.join(TEXT_SUFFIXES)})")
            found.update(files)
    return sorted(found)


def read_documents(files: Sequence[Path], skip_undecodable: bool = False) -> list[Document]:
    """Read UTF-8 documents: one per file, one per record of a `.jsonl` file (its "text" field)."""
    documents: list[Document] = []
    for path in files:
        try:
            text = read_text(
                path, hint="convert it, e.g. with iconv -f latin1 -t utf-8, or leave it out of the corpus"
            )
        except NotUtf8Error:
            if skip_undecodable:
                continue
            raise
        if path.suffix == ".jsonl":
            documents.extend(_jsonl_documents(path, text))
        elif text.strip():
            documents.append(Document(str(path), text))
    if not documents:
        raise EdgelmError(
            f"the corpus holds no text: every file is empty ({len(files)} file(s) given)"
            if files
            else "the corpus holds no files"
        )
    return documents


def _jsonl_documents(path: Path, text: str) -> Iterator[Document]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgelmError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EdgelmError(f'{path}:{number}: each line needs a string "text" field')
        if record["text"].strip():
            yield Document(f"{path}:{number}", record["text"])


def split_documents(
    documents: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """A deterministic split by document, decided by a hash of each document's name.

    A corpus of one document (a single large text file, say) is split at a line near the
    `1 - val_fraction` point instead, so that it can still be validated on unseen text.
    """
    if not 0 < val_fraction < 1:
        raise EdgelmError(f"val_fraction={val_fraction} must be between 0 and 1")
    if len(documents) == 1:
        doc = documents[0]
        cut = doc.text.find("\n", int(len(doc.text) * (1 - val_fraction)))
        cut = cut + 1 if 0 < cut < len(doc.text) - 1 else int(len(doc.text) * (1 - val_fraction))
        return [Document(doc.name, doc.text[:cut])], [Document(doc.name, doc.text[cut:])]
    ranked = sorted(documents, key=_rank)
    n_val = min(len(documents) - 1, max(1, round(len(documents) * val_fraction)))
    val_names = {d.name for d in ranked[:n_val]}
    return ([d for d in documents if d.name not in val_names], [d for d in documents if d.name in val_names])


def _rank(document: Document) -> bytes:
    """A document's place in the split's order: a hash of its name."""
    return hashlib.blake2b(document.name.encode(), digest_size=8).digest()


def corpus_fingerprint(files: Sequence[Path], vocab_size: int, val_fraction: float) -> str:
    """Identifies a tokenized corpus: the files (path, size, mtime) and the settings that shape the tokens."""
    digest = hashlib.sha256(f"{vocab_size}:{val_fraction}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\n{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def prepare_tokens(
    cache_dir: Path, sources: Sequence[str], vocab_size: int, val_fraction: float
) -> TokenData:
    """Tokenize a corpus into `cache_dir` (train.bin, val.bin, tokenizer files), or reuse what is there.

    With no sources the built-in corpus is used. The tokenizer is trained on the training split only.
    """
    builtin = not sources
    files = builtin_corpus() if builtin else find_corpus_files(sources)
    if not files:
        raise EdgelmError("the corpus holds no files")
    fingerprint = corpus_fingerprint(files, vocab_size, val_fraction)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file() and read_json(meta_path).get("fingerprint") == fingerprint:
        return load_tokens(cache_dir)

    train_docs, val_docs = split_documents(read_documents(files, skip_undecodable=builtin), val_fraction)
    tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = _tokenize_documents(tokenizer, docs, dtype)
        tmp = temporary_sibling(cache_dir / f"{split}.bin")
        tokens.tofile(tmp)
        tmp.replace(cache_dir / f"{split}.bin")
        counts[split] = len(tokens)
    tokenizer.save(cache_dir)
    write_json_atomic(
        meta_path,
        {
            "fingerprint": fingerprint,
            "dtype": np.dtype(dtype).name,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokens": counts,
            "files": len(files),
        },
    )
    return load_tokens(cache_dir)


def load_tokens(cache_dir: Path) -> TokenData:
    """Memory-map the token arrays written by `prepare_tokens`."""
    meta = read_json(cache_dir / "meta.json")
    arrays = [
        np.memmap(cache_dir / f"{split}.bin", dtype=meta["dtype"], mode="r") for split in ("train", "val")
    ]
    return TokenData(arrays[0], arrays[1], Tokenizer.load(cache_dir))


def _tokenize_documents(tokenizer: Tokenizer, docs: Sequence[Document], dtype: type) -> np.ndarray:
    """BOS + text + EOS for each document, concatenated."""
    pieces: list[np.ndarray] = []
    for start in range(0, len(docs), 256):
        batch = docs[start : start + 256]
        for encoding in tokenizer.backend.encode_batch([d.text for d in batch], add_special_tokens=False):
            pieces.append(np.array([tokenizer.bos_id, *encoding.ids, tokenizer.eos_ids[0]], dtype=dtype))
    return np.concatenate(pieces)


def batch_windows(
    tokens: np.ndarray,
    seq_len: int,
    batch: int,
    seed: int,
    step: int,
    micro: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (batch, seq_len) for one micro-step of one process.

    The windows of all processes are drawn together from (seed, step, micro) and each process takes
    its slice, so any number of processes with the same global batch sees the same data, and a
    resumed run sees exactly what an uninterrupted one would.
    """
    if len(tokens) < seq_len + 1:
        raise EdgelmError(
            f"the training split has {len(tokens)} tokens, fewer than one window of "
            f"{seq_len + 1}; add text or lower --context"
        )
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch * world)[rank * batch : (rank + 1) * batch]
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    return windows[:, :-1], windows[:, 1:]


def validation_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` non-overlapping windows (n, L+1) spread evenly over the validation tokens.

    L is the context length, or less when the validation split is shorter than one context.
    """
    if len(tokens) < 2:
        raise EdgelmError("the validation split holds fewer than 2 tokens; add text to the corpus")
    return spread_windows(tokens, min(seq_len, len(tokens) - 1) + 1, max_windows)


def spread_windows(tokens: np.ndarray, length: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` non-overlapping windows (n, length) int64 spread evenly over `tokens`, which hold
    at least one window."""
    available = len(tokens) // length
    chosen = np.linspace(0, available - 1, num=min(max_windows, available)).round().astype(int)
    return np.stack([np.asarray(tokens[i * length : (i + 1) * length], dtype=np.int64) for i in chosen])
