"""Training: it learns, it resumes exactly, and DDP over two processes trains the same model as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, saved_weights, unigram_entropy

from edgelm.checkpoint import load_checkpoint
from edgelm.errors import EdgelmError
from edgelm.training import train as train_module
from edgelm.training.data import batch_windows, load_tokens
from edgelm.training.train import TrainConfig, learning_rate, resume, train


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        (root / f"doc{i}.py").write_text(SAMPLE_TEXT.replace("Stack", f"Stack{i}") * 4)
    return root


def micro(out: Path, corpus: Path, **overrides: object) -> TrainConfig:
    """A model small enough to train a few steps in a second."""
    settings: dict[str, Any] = dict(
        out=str(out),
        corpus=(str(corpus),),
        vocab_size=300,
        context=32,
        batch_size=4,
        steps=6,
        warmup=2,
        eval_every=3,
        eval_windows=4,
        val_fraction=0.2,
        lr=1e-2,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


def interrupt_at(step: int) -> Callable[[dict[str, Any]], None]:
    def on_step(record: dict[str, Any]) -> None:
        if record["step"] == step:
            raise KeyboardInterrupt

    return on_step


def losses(run: Path) -> list[tuple[int, float, float | None]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in records]


@pytest.mark.slow
def test_training_learns_far_below_unigram_entropy(trained_run: Path) -> None:
    val_tokens = load_tokens(trained_run / "data").val
    baseline = unigram_entropy(val_tokens)
    val_loss = losses(trained_run)[-1][2]
    assert val_loss is not None
    # a unigram model of these tokens scores ~6.6 nats; 250 steps reach ~5: perplexity 5x lower
    assert val_loss < baseline - 1.0, (val_loss, baseline)
    assert (trained_run / "loss.png").stat().st_size > 1000
    config, _, _ = load_checkpoint(trained_run)
    assert config.max_position_embeddings == 128


def test_resume_continues_exactly(tmp_path: Path, corpus: Path) -> None:
    straight = tmp_path / "straight"
    train(micro(straight, corpus))
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):  # interrupted after step 4; the last checkpoint is step 3's
        train(micro(split, corpus), on_step=interrupt_at(4))
    with pytest.raises(EdgelmError, match="--resume"):
        train(micro(split, corpus))
    # through the command line, which must keep the run's own settings (its steps among them)
    result = subprocess.run(
        [sys.executable, "-m", "edgelm", "train", "--resume", "--out", str(split)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert losses(split) == losses(straight)
    a, b = saved_weights(straight), saved_weights(split)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_with_new_steps_follows_the_new_schedule(tmp_path: Path, corpus: Path) -> None:
    """A 4-step run resumed with --steps 8 is the 8-step run: with a warm-up of 4 steps the first four
    learning rates do not depend on the total, and from step 5 the resumed run follows the 8-step cosine."""
    short = tmp_path / "short"
    train(micro(short, corpus, steps=4, warmup=4, eval_every=4))
    result = subprocess.run(
        [sys.executable, "-m", "edgelm", "train", "--resume", "--out", str(short), "--steps", "8"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    long = tmp_path / "long"
    train(micro(long, corpus, steps=8, warmup=4, eval_every=4))
    schedule = micro(long, corpus, steps=8, warmup=4, eval_every=4)
    records = [json.loads(line) for line in (short / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == [learning_rate(schedule, step) for step in range(1, 9)]
    assert records[4]["lr"] < records[3]["lr"]  # the cosine has started
    assert json.loads((short / "trainer_state.json").read_text())["train_config"]["steps"] == 8
    assert losses(short) == losses(long)
    a, b = saved_weights(short), saved_weights(long)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def global_batch(total: int) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """A window chooser that draws `total` windows per step and hands micro-step m the m-th slice of them, so
    that any split into micro-batches of one step sees the same data (the library draws per micro-step)."""

    def windows(
        tokens: np.ndarray, seq_len: int, batch: int, seed: int, step: int, micro: int, *_: int
    ) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch_windows(tokens, seq_len, total, seed, step, 0)
        return x[micro * batch : (micro + 1) * batch], y[micro * batch : (micro + 1) * batch]

    return windows


def test_grad_accum_trains_the_same_model_as_a_larger_batch(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 2 accumulated over 2 micro-steps is one step on batch 4: the same losses and weights."""
    monkeypatch.setattr(train_module, "batch_windows", global_batch(4))
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(micro(whole, corpus, batch_size=4, steps=4))
    train(micro(split, corpus, batch_size=2, grad_accum=2, steps=4))
    a, b = saved_weights(whole), saved_weights(split)
    # float rounding in the two-part sum, grown by Adam's division by the gradients' own scale
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-4
    assert np.allclose(
        [loss for _, loss, _ in losses(split)], [loss for _, loss, _ in losses(whole)], atol=1e-5
    )
    # the control: another seed moves the weights by far more than the tolerance
    train(micro(tmp_path / "other", corpus, batch_size=4, steps=4, seed=2))
    c = saved_weights(tmp_path / "other")
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-3


def test_resume_refuses_an_interrupted_save(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    train(micro(run, corpus, steps=3))
    state = json.loads((run / "trainer_state.json").read_text())
    (run / "trainer_state.json").write_text(json.dumps({**state, "step": 2}))
    with pytest.raises(EdgelmError, match="interrupted"):
        resume(run)
    with pytest.raises(EdgelmError, match="nothing to resume"):
        resume(tmp_path / "new")


@pytest.mark.parametrize("cut", ["while-writing", "among-the-renames"])
def test_a_save_cut_short_keeps_the_last_good_one(tmp_path: Path, corpus: Path, cut: str) -> None:
    """A save is written whole into a staging folder, then renamed into place: a kill while writing leaves
    the last good save (the staged one is dropped on resume), a kill among the renames is finished on
    resume. Either way the resumed run is the one that never stopped."""
    import shutil

    from edgelm.files import temporary_sibling

    straight = tmp_path / "straight"
    train(micro(straight, corpus))
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):  # the last save is step 3's
        train(micro(split, corpus), on_step=interrupt_at(4))
    staging = temporary_sibling(split / "save")
    if cut == "while-writing":  # the next save had begun: a weights file, no trainer_state.json yet
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half a file")
    else:  # step 3's save staged whole, and its weights already renamed into place when the kill came
        left = ("data", "log.jsonl", staging.name)
        shutil.copytree(split, staging, ignore=lambda folder, names: [n for n in names if n in left])
        (staging / "model.safetensors").unlink()
    resume(split)
    assert not staging.exists()
    assert losses(split) == losses(straight)
    a, b = saved_weights(straight), saved_weights(split)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_reads_what_a_kill_or_a_hand_left(tmp_path: Path, corpus: Path) -> None:
    """A log whose last line was cut short is resumed (the line dropped); a trainer_state.json without its
    train_config is refused by name, not with a traceback."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(micro(run, corpus), on_step=interrupt_at(4))
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')
    resume(run)
    assert [step for step, _, _ in losses(run)] == list(range(1, 7))
    state = json.loads((run / "trainer_state.json").read_text())
    (run / "trainer_state.json").write_text(
        json.dumps({k: v for k, v in state.items() if k != "train_config"})
    )
    with pytest.raises(EdgelmError, match="not a trainer state edgelm wrote"):
        resume(run)


def torchrun_train(*args: str) -> subprocess.CompletedProcess[str]:
    """`edgelm train` in two CPU processes under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "edgelm", "train", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path: Path, corpus: Path) -> None:
    one = tmp_path / "one"
    train(micro(one, corpus, batch_size=4, steps=4))
    two = tmp_path / "two"
    result = torchrun_train(
        "--corpus",
        str(corpus),
        "--out",
        str(two),
        "--vocab-size",
        "300",
        "--context",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "4",
        "--warmup",
        "2",
        "--eval-every",
        "3",
        "--val-fraction",
        "0.2",
        "--lr",
        "1e-2",
    )
    assert result.returncode == 0, result.stderr
    a, b = saved_weights(one), saved_weights(two)
    # Adam divides by the gradients' own scale, so float rounding in the all-reduce grows to ~1e-5;
    # a different data order moves the weights by ~1e-2
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-4
    train(micro(tmp_path / "other", corpus, batch_size=4, steps=4, seed=2))
    c = saved_weights(tmp_path / "other")
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-3
    assert [s for s, _, _ in losses(two)] == [1, 2, 3, 4]
    assert np.allclose([loss for _, loss, _ in losses(two)], [loss for _, loss, _ in losses(one)], atol=1e-5)


def test_nothing_is_written_for_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    with pytest.raises(EdgelmError, match="no text"):
        train(micro(tmp_path / "out", empty))
    assert not (tmp_path / "out").exists()
    (empty / "blank.txt").write_text("def f(x):\n    return x\n" * 20)  # tokens, too few for the windows
    with pytest.raises(EdgelmError):
        train(micro(tmp_path / "out", empty, context=4096))
    assert not (tmp_path / "out").exists()  # nor the token cache it had written
    with pytest.raises(EdgelmError, match="unknown preset"):
        TrainConfig.for_preset("huge", out="x")
    with pytest.raises(EdgelmError, match="steps"):
        TrainConfig(out="x", steps=0)


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(out="x", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(cfg, 1) == pytest.approx(0.1) and learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 55) == pytest.approx(0.55) and learning_rate(cfg, 100) == pytest.approx(0.1)


@pytest.mark.slow
def test_ddp_failure_on_the_main_process_reaches_every_process(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n")
    result = torchrun_train("--corpus", str(empty), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and result.stderr.count("edgelm: error: the corpus holds no text") == 2
