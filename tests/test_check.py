"""The shared check: metrics against an independent numpy computation, the identical target, the cache,
gates, tokenizer mismatches and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, SMALL, logits_on_windows, make_checkpoint

import edgelm
import edgelm.evaluation.reference
from edgelm.errors import EdgelmError
from edgelm.evaluation.check import compare_tokenizers, evaluate, measure_speed
from edgelm.evaluation.reference import (
    EvaluationText,
    Reference,
    ReferenceInfo,
    compute_reference,
    evaluation_windows,
    reference_log_probs,
    scored_log_probs,
    scored_range,
)
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import train_tokenizer

VOCAB, CTX = 50, 16


class TableRuntime:
    """A stub runtime: the logits at position p after token t are A[p] + B[t], float32, so that an oracle
    can compute them for any window without running anything."""

    name: ClassVar[str] = "table"
    artifacts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b = a, b
        self.config = dataclasses.replace(
            ModelConfig(), vocab_size=VOCAB, max_position_embeddings=CTX, bos_token_id=0, eos_token_id=1
        )
        self.tokenizer = None
        self.device = "cpu"
        self.position = 0

    def logits(self, window: np.ndarray) -> np.ndarray:
        return (self.a[: len(window)] + self.b[window]).astype(np.float32)

    def reset(self) -> None:
        self.position = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids)
        rows = self.a[self.position : self.position + len(ids)] + self.b[ids]
        self.position += len(ids)
        return (rows if all_logits else rows[-1:]).astype(np.float32)

    def close(self) -> None:
        pass


@pytest.fixture
def tables() -> tuple[TableRuntime, TableRuntime, np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 2, (CTX, VOCAB)), rng.normal(0, 2, (VOCAB, VOCAB))
    reference = TableRuntime(a, b)
    target = TableRuntime(a + rng.normal(0, 0.3, a.shape), b + rng.normal(0, 0.3, b.shape))
    windows = rng.integers(0, VOCAB, (4, CTX))
    return reference, target, windows


def stub_reference(runtime: TableRuntime, windows: np.ndarray) -> Reference:
    info = ReferenceInfo("stub", "0" * 64, "table", "cpu", "test", "0" * 64, 0, CTX, len(windows), 0, None)
    return Reference(
        EvaluationText("", "test"),
        np.zeros(0, np.int32),
        windows,
        reference_log_probs(runtime, windows),
        info,
    )


def test_metrics_equal_an_independent_numpy_computation(tables) -> None:
    reference, target, windows = tables
    got = evaluate(target, stub_reference(reference, windows))

    start, stop = scored_range(CTX)  # llama-perplexity scores the second half of each window
    assert (start, stop) == (8, 15)
    p_rows, q_rows, nexts = [], [], []
    for window in windows:
        p_rows.append(reference.logits(window)[start:stop].astype(np.float64))
        q_rows.append(target.logits(window)[start:stop].astype(np.float64))
        nexts.append(window[start + 1 : stop + 1])
    p_logits, q_logits, nxt = np.concatenate(p_rows), np.concatenate(q_rows), np.concatenate(nexts)
    log_p = p_logits - np.logaddexp.reduce(p_logits, axis=1, keepdims=True)
    log_q = q_logits - np.logaddexp.reduce(q_logits, axis=1, keepdims=True)
    n = len(nxt)
    kld = (np.exp(log_p) * (log_p - log_q)).sum(1)
    nll_p, nll_q = -log_p[np.arange(n), nxt], -log_q[np.arange(n), nxt]
    se = lambda x: np.std(x, ddof=1) / math.sqrt(n)  # noqa: E731
    dp = np.exp(-nll_q) - np.exp(-nll_p)
    same = (p_logits.argmax(1) == q_logits.argmax(1)).mean()
    ratio = math.exp(nll_q.mean() - nll_p.mean())
    cov = np.cov(nll_q, nll_p)[0, 1] / n
    rms = math.sqrt((dp**2).mean())
    ordered = np.sort(kld)
    p99 = ordered[int(0.99 * (n - 1))] + (0.99 * (n - 1) % 1) * (
        ordered[int(0.99 * (n - 1)) + 1] - ordered[int(0.99 * (n - 1))]
    )

    expected = {
        "positions": n,
        "ppl_ref": (math.exp(nll_p.mean()), math.exp(nll_p.mean()) * se(nll_p)),
        "ppl": (math.exp(nll_q.mean()), math.exp(nll_q.mean()) * se(nll_q)),
        "ppl_ratio": (ratio, ratio * math.sqrt(se(nll_q) ** 2 + se(nll_p) ** 2 - 2 * cov)),
        "kld_mean": (kld.mean(), se(kld)),
        "kld_median": np.median(kld),
        "kld_p99": p99,
        "kld_max": kld.max(),
        "same_top_p": (same, math.sqrt(same * (1 - same) / (n - 1))),
        "rms_dp": (rms, 0.5 / rms * se(dp**2)),
    }
    assert n == 28 and 0 < same < 1 and kld.mean() > 0.01
    for name, value in expected.items():
        ours = getattr(got, name)
        ours = (ours.value, ours.error) if hasattr(ours, "error") else ours
        np.testing.assert_allclose(ours, value, rtol=2e-6, atol=1e-9, err_msg=name)


def test_an_identical_stub_gives_exact_zeros_and_chunks_change_nothing(tables, monkeypatch) -> None:
    reference, _, windows = tables
    ref = stub_reference(reference, windows)
    same = evaluate(reference, ref)
    assert same.kld_mean.value == 0 and same.kld_max == 0 and same.same_top_p.value == 1
    assert same.ppl_ratio.value == 1 and same.ppl_ratio.error == 0 and same.rms_dp.value == 0
    monkeypatch.setattr(edgelm.evaluation.reference, "FORWARD_CHUNK", 3)  # 3 tokens a call
    assert np.array_equal(scored_log_probs(reference, windows[0]), ref.logp[0])


def test_windows_are_llama_perplexity_chunks() -> None:
    ids = np.arange(100)
    windows = evaluation_windows(ids, 16, 3, bos_id=7)
    assert windows.shape == (3, 16) and (windows[:, 0] == 7).all()
    assert [w[1] for w in windows] == [1, 33, 81]  # chunks 0, 2 and 5 of 6, spread evenly
    assert evaluation_windows(ids, 16, 100, None).shape == (6, 16)
    with pytest.raises(EdgelmError, match="fewer than one window of 200"):
        evaluation_windows(ids, 200, 4, None)


def test_speed_is_measured_over_repetitions(tables) -> None:
    reference, _, windows = tables
    pp, tg, ttft = measure_speed(reference, windows[0].tolist(), windows[1].tolist(), repetitions=3)
    assert pp.runs == tg.runs == ttft.runs == 3 and pp.mean > 0 and tg.mean > 0 and ttft.mean > 0


# ------------------------------------------------------------------------------------ on the trained model


@pytest.mark.slow
def test_identical_target_and_the_reference_cache(trained_run: Path, tmp_path: Path) -> None:
    result = edgelm.check(
        trained_run,
        reference=trained_run,
        windows=4,
        repetitions=1,
        cache_dir=tmp_path,
        max_kld=0,
        min_top1=1,
    )
    acc = result.accuracy
    assert result.passed and result.error is None and result.tokenizer.match
    assert acc.kld_mean.value == 0 and acc.kld_max == 0 and acc.same_top_p.value == 1
    assert acc.ppl_ratio.value == 1 and acc.rms_dp.value == 0 and acc.positions == 4 * 63
    assert 1 < acc.ppl_ref.value == acc.ppl.value < 4096 and acc.ppl_ref.error > 0
    assert (result.runtime, result.device, result.format, result.quant) == (
        "torch",
        "cpu",
        "checkpoint",
        "fp32",
    )
    lat = result.latency
    assert lat.pp_tokens == 128 and lat.tg_tokens == 128 and lat.pp_tps.mean > 0 and lat.tg_tps.mean > 0
    assert lat.ttft_ms.mean > 0 and lat.load_cold_s > 0 and lat.load_warm_s.runs == 1
    assert result.peak_rss > 10e6 and result.file_size > 1e6 and result.threads >= 1

    # the cache: full float32 log-probs of the scored positions, keyed by what they depend on
    cache = Path(result.reference.cache)
    assert cache.parent == tmp_path and np.load(cache / "logp.npy").shape == (4, 63, 4096)
    again = edgelm.check(trained_run, reference=trained_run, windows=4, repetitions=0, cache_dir=tmp_path)
    assert again.accuracy == acc and again.latency is None and again.reference.cache == str(cache)
    other = compute_reference(trained_run, windows=2, cache_dir=tmp_path)
    assert other.info.cache != str(cache) and len(list(tmp_path.iterdir())) == 2


@pytest.mark.slow
def test_gguf_check_equals_one_shot_logits_and_gates(trained_run: Path, tmp_path: Path) -> None:
    """The check's KLD (prefill, then the scored half in chunks) equals one computed from whole-window
    logits of both models; the CLI exits 1 on a failing gate, 0 on passing ones."""
    from edgelm.export.gguf import export_gguf

    path = export_gguf(trained_run, tmp_path, "q4_0")
    result = edgelm.check(path, trained_run, windows=3, repetitions=0, cache_dir=tmp_path / "cache")
    assert result.runtime == "llamacpp" and result.quant == "q4_0" and result.tokenizer.match
    windows = result_windows(trained_run, tmp_path / "cache")
    with edgelm.load(trained_run) as ref, edgelm.load(path, kv_cache="f32") as q:
        start, stop = scored_range(windows.shape[1])
        p = logits_on_windows(ref.runtime, windows).reshape(3, 128, -1)[:, start:stop].astype(np.float64)
        r = logits_on_windows(q.runtime, windows).reshape(3, 128, -1)[:, start:stop].astype(np.float64)
    log_p = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
    log_q = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
    kld = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert result.accuracy.kld_mean.value == pytest.approx(kld.mean(), rel=1e-3)  # batching differs slightly
    assert result.accuracy.kld_mean.value > 0

    def run_check(*gates: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "edgelm", "check", str(path), "--reference", str(trained_run)]
        options = ["--windows", "3", "--repetitions", "0", "--cache-dir", str(tmp_path / "cache"), *gates]
        return subprocess.run([*command, *options], capture_output=True, text=True, timeout=300)

    failing = run_check("--max-kld", "1e-9", "--min-top1", "0.5")
    assert failing.returncode == 1, failing.stderr
    assert "check failed: max_kld: mean KLD" in failing.stderr and "min_top1" not in failing.stderr
    passing = run_check("--max-kld", "1", "--min-top1", "0.5", "--max-ppl-ratio", "2", "--json")
    assert passing.returncode == 0, passing.stderr
    record = json.loads(passing.stdout)
    assert record["passed"] and [g["name"] for g in record["gates"]] == [
        "tokenizer",
        "max_kld",
        "min_top1",
        "max_ppl_ratio",
    ]
    assert record["accuracy"]["kld_mean"]["value"] == pytest.approx(result.accuracy.kld_mean.value, rel=1e-9)


def result_windows(reference: Path, cache_dir: Path) -> np.ndarray:
    (entry,) = cache_dir.iterdir()
    return np.load(entry / "windows.npy")


# ------------------------------------------------------------------------------ tokenizers and bad input


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(SAMPLE_TEXT * 12)
    return path


def test_a_tokenizer_that_disagrees_is_reported(tmp_path: Path, text_file: Path) -> None:
    ours = train_tokenizer([SAMPLE_TEXT * 3, "hello world " * 50], vocab_size=300)
    theirs = train_tokenizer([SAMPLE_TEXT[::-1] * 3, "hello world " * 50], vocab_size=300)
    assert ours.vocab_size == theirs.vocab_size == 300  # the same shapes: only the ids differ
    reference = make_checkpoint(tmp_path / "a", ours)
    target = make_checkpoint(tmp_path / "b", theirs)
    result = edgelm.check(target, reference, text_file, repetitions=0, windows=2, max_kld=100)
    tokenizer = result.tokenizer
    assert not tokenizer.match and not result.passed and tokenizer.first_difference == 0
    assert tokenizer.reference_tokens == len(ours.encode(text_file.read_text()))
    assert tokenizer.target_tokens == len(theirs.encode(text_file.read_text()))
    assert any(line.startswith("tokenizer: differs") for line in result.failures())
    assert [g.name for g in result.gates if not g.passed] == ["tokenizer"]
    assert result.accuracy is not None  # still measured, on the reference's ids
    same = compare_tokenizers(np.array(ours.encode("hello world")), ours, "hello world")
    assert same.match and same.detail is None


def test_bad_input_is_a_clear_error(checkpoint: Path, tmp_path: Path, text_file: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(EdgelmError, match=r"empty\.txt: the evaluation text is empty"):
        edgelm.check(checkpoint, checkpoint, empty)
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(
        EdgelmError, match=r"fewer than one window of 96; give a longer text or a smaller --ctx"
    ):
        edgelm.check(checkpoint, checkpoint, short)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(EdgelmError, match=r"broken\.gguf"):
        edgelm.check(broken, checkpoint, text_file, repetitions=0)
    with pytest.raises(EdgelmError, match="not a GGUF file"):
        edgelm.check(text_file, checkpoint, text_file)
    with pytest.raises(EdgelmError, match="min_top1=90 is a fraction"):
        edgelm.check(checkpoint, checkpoint, text_file, min_top1=90)
    with pytest.raises(EdgelmError, match="longer than"):
        edgelm.check(checkpoint, checkpoint, text_file, ctx=SMALL.max_position_embeddings + 1)


def test_process_memory_sees_an_allocation() -> None:
    from edgelm.evaluation.memory import peak_rss_bytes, reset_peak_rss, resident_memory

    reset_peak_rss()
    before = resident_memory()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, every page written
    after, peak = resident_memory(), peak_rss_bytes()
    assert before is not None and after is not None and peak is not None
    assert after - before >= 48 << 20 and peak >= after - (1 << 20)
    del block
