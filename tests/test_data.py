"""Corpora, the split by document, the token cache and the batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgelm.errors import EdgelmError
from edgelm.training.data import (
    DEFAULT_VAL_FRACTION,
    Document,
    batch_windows,
    builtin_calibration_text,
    builtin_corpus,
    find_corpus_files,
    prepare_tokens,
    read_documents,
    split_documents,
    validation_windows,
)


def write_corpus(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha beta gamma\n" * 40)
    (root / "b.md").write_text("# Title\n\nSome *markdown* text.\n" * 30)
    (root / "sub" / "c.py").write_text("def c():\n    return 3\n" * 30)
    (root / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    (root / "d.jsonl").write_text(
        json.dumps({"text": "first record " * 20})
        + "\n\n"
        + json.dumps({"text": "second record " * 20})
        + "\n"
    )
    return root


def test_sources_files_folders_globs(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus")
    assert [p.name for p in find_corpus_files([str(root)])] == ["a.txt", "b.md", "d.jsonl", "c.py"]
    assert [p.name for p in find_corpus_files([str(root / "*.txt"), str(root / "sub" / "c.py")])] == [
        "a.txt",
        "c.py",
    ]
    docs = read_documents(find_corpus_files([str(root)]))
    assert len(docs) == 5 and docs[3].name.endswith("d.jsonl:3") and docs[3].text.startswith("second")
    with pytest.raises(EdgelmError, match="matches no file"):
        find_corpus_files([str(root / "*.rst")])


def test_builtin_corpus_is_the_standard_library() -> None:
    files = builtin_corpus()
    assert len(files) > 100 and any(f.name == "argparse.py" for f in files)
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


def test_builtin_calibration_text_leaves_the_held_out_documents_out() -> None:
    """int4_mixed's default calibration text: the length asked for, from training documents of the built-in
    corpus only (none of the split's held-out ones, on which `edgelm check` evaluates)."""
    text = builtin_calibration_text(50_000)
    _, held_out = split_documents(
        read_documents(builtin_corpus(), skip_undecodable=True), DEFAULT_VAL_FRACTION
    )
    assert len(text) == 50_000
    assert not any(d.text.strip()[:400] in text for d in held_out if len(d.text.strip()) >= 400)


def test_bad_corpora(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EdgelmError, match="no text"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EdgelmError, match=r"latin1.txt: not UTF-8 .*iconv"):
        read_documents([tmp_path / "latin1.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(EdgelmError, match=r"bad.jsonl:2: .*\"text\" field"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(EdgelmError, match=r"broken.jsonl:1: invalid JSON"):
        read_documents([tmp_path / "broken.jsonl"])


def test_split_is_deterministic_and_by_document() -> None:
    docs = [Document(f"doc{i}", f"text {i}") for i in range(100)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 10 and len(train) == 90 and not {d.name for d in train} & {d.name for d in val}
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # order does not matter
    single_train, single_val = split_documents([Document("one", "line\n" * 100)], 0.1)
    assert single_train[0].text + single_val[0].text == "line\n" * 100 and single_val[0].text.startswith(
        "line"
    )


def test_tokens_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_corpus(tmp_path / "corpus")
    data = prepare_tokens(tmp_path / "cache", [str(root)], vocab_size=300, val_fraction=0.2)
    assert data.train.dtype == np.uint16 and data.train[0] == data.tokenizer.bos_id
    first_end = int(np.flatnonzero(data.train == data.tokenizer.eos_ids[0])[0])
    texts = {d.text for d in read_documents(find_corpus_files([str(root)]))}
    assert data.tokenizer.decode(data.train[1:first_end].tolist()) in texts  # BOS, a whole document, EOS

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized a second time")

    monkeypatch.setattr("edgelm.training.data.train_tokenizer", no_training)
    again = prepare_tokens(tmp_path / "cache", [str(root)], vocab_size=300, val_fraction=0.2)
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    with pytest.raises(AssertionError, match="second time"):  # a changed file invalidates the cache
        (root / "a.txt").write_text("changed text\n" * 50)
        prepare_tokens(tmp_path / "cache", [str(root)], vocab_size=300, val_fraction=0.2)


def test_batches_split_across_processes_and_are_reproducible() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = batch_windows(tokens, 16, batch=4, seed=7, step=3, micro=0)
    assert x.shape == y.shape == (4, 16) and np.array_equal(x[:, 1:], y[:, :-1])
    halves = [batch_windows(tokens, 16, batch=2, seed=7, step=3, micro=0, rank=r, world=2)[0] for r in (0, 1)]
    assert np.array_equal(np.concatenate(halves), x)
    assert not np.array_equal(batch_windows(tokens, 16, 4, 7, 4, 0)[0], x)
    with pytest.raises(EdgelmError, match="fewer than one window"):
        batch_windows(tokens[:10], 16, 4, 7, 1, 0)


def test_validation_windows() -> None:
    windows = validation_windows(np.arange(100), 16, max_windows=3)
    assert windows.shape == (3, 17) and windows[0, 0] == 0
    assert validation_windows(np.arange(10), 16, 8).shape == (1, 10)  # shorter than one context
