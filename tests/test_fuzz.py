"""Truncations and random byte flips of every file of each artifact kind: each command that reads it
(info, generate, import, export) either works or gives one line on stderr and exit status 1 and writes
nothing — never a traceback, a crash or a hang.

The damage is seeded, so a failure names a case that reproduces. Half of the flips land in a file's first
4 KiB, where its headers, metadata and tensor tables are; the rest anywhere, weights included."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_checkpoint

from edgelm.cli import main
from edgelm.export.gguf import export_gguf
from edgelm.tokenizer import Tokenizer

CASES_PER_FILE = 20  # 10 truncations and 10 flip sets per file
COMMANDS = {  # MODEL and OUT are filled in
    "info": ["info", "MODEL"],
    "generate": ["generate", "MODEL", "--prompt", "def", "--max-new-tokens", "2", "--seed", "0"],
    "import": ["import", "MODEL", "--out", "OUT"],
    "export": ["export", "gguf", "MODEL", "--quant", "q4_0", "--out", "OUT"],
}
# the commands that read each kind: import reads a GGUF file, export a checkpoint
KIND_COMMANDS = {
    "checkpoint": ["info", "generate", "export"],
    "gguf": ["info", "generate", "import"],
    "onnx": ["info", "generate"],
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> dict[str, Path]:
    """One good artifact of each kind: a checkpoint folder, a GGUF file, an int8 ONNX folder."""
    from edgelm.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = make_checkpoint(root / "checkpoint", small_tokenizer)
    return {
        "checkpoint": checkpoint,
        "gguf": export_gguf(checkpoint, root / "model.gguf", "q8_0"),
        "onnx": export_onnx(checkpoint, root / "onnx", "int8"),
    }


def damaged(data: bytes, case: int, rng: np.random.Generator) -> bytes:
    """`data` cut short (even cases) or with 1 to 8 bytes set to random values (odd cases)."""
    if case % 2 == 0:
        return data[: int(rng.integers(0, len(data)))]
    flipped = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        span = min(len(data), 4096) if rng.random() < 0.5 else len(data)
        flipped[int(rng.integers(0, span))] = int(rng.integers(0, 256))
    return bytes(flipped)


FILES = {
    "checkpoint": ["config.json", "tokenizer.json", "model.safetensors"],
    "gguf": [""],  # the artifact is the file
    "onnx": [
        "model.onnx",
        "model.onnx.data",
        "config.json",
        "genai_config.json",
        "edgelm.json",
        "tokenizer.json",
    ],
}
CASES = [
    (kind, name, case, command)
    for kind, names in FILES.items()
    for name in names
    for case in range(CASES_PER_FILE)
    for command in KIND_COMMANDS[kind]
]


@pytest.mark.parametrize(("kind", "name", "case", "command"), CASES)
def test_damage_is_refused_in_one_line_or_harmless(
    artifacts: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    name: str,
    case: int,
    command: str,
) -> None:
    source = artifacts[kind]
    model = tmp_path / source.name
    if source.is_dir():
        shutil.copytree(source, model)
    else:
        shutil.copy(source, model)
    target = model / name if name else model
    seed = [kind, name, case].__repr__().encode()
    rng = np.random.default_rng(list(seed))
    target.write_bytes(damaged(target.read_bytes(), case, rng))
    out = tmp_path / "out"
    status = main([str(model) if a == "MODEL" else str(out) if a == "OUT" else a for a in COMMANDS[command]])
    stderr = capsys.readouterr().err
    if status == 0:
        return  # a flip in a weight, or in text nothing reads, changes numbers, not validity
    assert status == 1
    assert stderr.startswith("edgelm: error: ") and stderr.count("\n") == 1, stderr
    assert not out.exists()
