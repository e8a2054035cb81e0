"""The progress bar of import and export: drawn on a terminal, silent elsewhere."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import rich.console

from edgelm.export.gguf import export_gguf
from edgelm.importer import import_model
from edgelm.progress import progress_bar


def test_silent_when_not_a_terminal(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export_gguf(checkpoint, tmp_path / "out.gguf", "q8_0", show_progress=True)
    import_model(checkpoint, tmp_path / "imported", show_progress=True)
    assert capsys.readouterr().err == ""


def test_drawn_on_a_terminal(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    real = rich.console.Console

    def terminal(**kwargs: object) -> rich.console.Console:
        return real(file=screen, force_terminal=True, width=120)

    monkeypatch.setattr(rich.console, "Console", terminal)
    export_gguf(checkpoint, tmp_path / "out.gguf", "q8_0", show_progress=True)
    drawn = screen.getvalue()
    assert "out.gguf" in drawn and "21/21" in drawn and "lm_head.weight" in drawn
    with progress_bar("quiet", 3, show=False) as advance:
        advance("x")
    assert screen.getvalue() == drawn


def test_a_calibrated_export_says_on_how_many_tokens(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgelm.quant.calibration import activation_covariance

    screen = io.StringIO()
    real = rich.console.Console
    monkeypatch.setattr(
        rich.console, "Console", lambda **_: real(file=screen, force_terminal=True, width=200)
    )
    statistics = activation_covariance(checkpoint, "def main():\n    return 1\n" * 40, max_tokens=100)
    export_gguf(checkpoint, tmp_path / "out.gguf", "q4_0", statistics, show_progress=True)
    assert statistics.tokens == 100
    assert "calibrated on 100 tokens layer by layer through the quantized layers" in screen.getvalue()


def test_int4_mixed_counts_its_sensitivity_pass(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4_mixed's bar counts four steps a layer, and reaches them all: the sensitivity pass forward and
    backward through it, its ranking, its build."""
    from edgelm.export.onnx import export_onnx
    from edgelm.model.config import ModelConfig

    screen = io.StringIO()
    real = rich.console.Console
    monkeypatch.setattr(
        rich.console,
        "Console",
        lambda **_: real(file=screen, force_terminal=True, width=200, color_system=None),
    )
    export_onnx(checkpoint, tmp_path / "mixed", "int4_mixed", show_progress=True)
    steps = 4 * ModelConfig.load(checkpoint).num_hidden_layers
    assert f" {steps}/{steps} " in screen.getvalue()
