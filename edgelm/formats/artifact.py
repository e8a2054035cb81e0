"""Which kind of artifact a path holds: a checkpoint directory, an ONNX folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import EdgelmError
from edgelm.formats.onnx import MODEL_FILE

GGUF_MAGIC = b"GGUF"


def artifact_kind(path: Path) -> str:
    """ "checkpoint" (a Hugging Face-layout directory), "onnx" (a folder with model.onnx) or "gguf"."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return "onnx"
        if (path / "config.json").is_file():
            return "checkpoint"
        raise EdgelmError(
            f"{path}: neither a checkpoint (no config.json) nor an ONNX folder (no {MODEL_FILE})"
        )
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise EdgelmError(
            f"{path}: not a GGUF file (bad magic); give a .gguf file, a checkpoint "
            "directory or an ONNX folder"
        )
    raise EdgelmError(f"{path}: no such file or directory")
