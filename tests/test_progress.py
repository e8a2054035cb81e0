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
