"""Which kind of artifact a path holds: a checkpoint directory, an ONNX folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import EdgelmError
from edgelm.files import is_temporary
from edgelm.formats.onnx import DATA_FILE, GENAI_CONFIG, MODEL_FILE

GGUF_MAGIC = b"GGUF"


def artifact_kind(path: Path) -> str:
    """ "checkpoint" (a Hugging Face-layout directory), "onnx" (a folder with model.onnx) or "gguf"."""
    path = Path(path)
    if is_temporary(path) and path.exists():
        raise EdgelmError(f"{path}: what an interrupted edgelm run was writing, not an artifact; delete it")
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return "onnx"
        if any((path / name).is_file() for name in (DATA_FILE, GENAI_CONFIG)):
            raise EdgelmError(f"{path}: an ONNX folder without its {MODEL_FILE} (export it again)")
        if (path / "config.json").exists():  # read_json refuses one that is not a regular file
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
