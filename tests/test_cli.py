"""The command line as a user meets it: help, the happy path, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL, make_checkpoint

import edgelm as edgelm_module
from edgelm.errors import EdgelmError
from edgelm.files import temporary_sibling
from edgelm.tokenizer import Tokenizer


def edgelm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=300
    )


def test_help_for_every_command() -> None:
    for command in ([], ["train"], ["generate"], ["info"]):
        result = edgelm(*command, "--help")
        assert result.returncode == 0 and "usage: edgelm" in result.stdout
    assert "--resume" in edgelm("train", "--help").stdout and "--top-p" in edgelm("generate", "--help").stdout


def test_generate_and_info(checkpoint: Path) -> None:
    result = edgelm("generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1")
    assert result.returncode == 0 and result.stdout.startswith("def ") and len(result.stdout) > 5
    info = json.loads(edgelm("info", str(checkpoint), "--json").stdout)
    assert info["parameters"] > 0 and info["export_sizes"]["int4"] < info["export_sizes"]["fp16"]
    table = edgelm("info", str(checkpoint)).stdout
    assert "parameters" in table and "int4 export" in table


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "/nonexistent/model", "--prompt", "x"],
        ["generate", "CHECKPOINT", "--prompt", "x", "--temperature", "-1"],
        ["generate", "CHECKPOINT", "--prompt", "x", "--top-p", "7"],
        ["generate", "CHECKPOINT", "--prompt", "x", "--runtime", "nosuch"],
        ["generate", "CHECKPOINT", "--prompt", "x", "--device", "cuda:9"],
        ["generate", "CHECKPOINT", "--prompt", "x", "--context", "0"],
        ["generate", "CHECKPOINT", "--prompt", "def main(): pass", "--context", "3"],
        ["generate", "CHECKPOINT", "--prompt", "x", "--threads", "0"],
        ["info", "/nonexistent"],
        ["train", "--corpus", "/nonexistent/*.txt", "--out", "OUT"],
        ["train", "--preset", "huge", "--out", "OUT"],
        ["train", "--resume", "--out", "OUT"],
    ],
)
def test_errors_are_one_line(checkpoint: Path, tmp_path: Path, args: list[str]) -> None:
    args = [
        str(checkpoint) if a == "CHECKPOINT" else str(tmp_path / "out") if a == "OUT" else a for a in args
    ]
    result = edgelm(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("edgelm: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_info_on_onnx_and_gguf(checkpoint: Path, tmp_path: Path) -> None:
    """`edgelm info` describes an exported ONNX folder and GGUF file from their own headers."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx
    from edgelm.model.config import ModelConfig

    config = ModelConfig.load(checkpoint)
    gguf = export_gguf(checkpoint, tmp_path / "model.gguf", "q8_0")
    described = json.loads(edgelm("info", str(gguf), "--json").stdout)
    assert described["format"].startswith("gguf v") and described["architecture"] == "llama"
    assert described["layers"] == config.num_hidden_layers and described["vocab_size"] == config.vocab_size
    assert described["tensor_types"]["Q8_0"] > 0 and described["file_size"] == gguf.stat().st_size
    folder = export_onnx(checkpoint, tmp_path / "onnx", "int4")
    described = json.loads(edgelm("info", str(folder), "--json").stdout)
    assert described["format"] == "ONNX int4" and described["layers"] == config.num_hidden_layers
    assert "GroupQueryAttention" in described["operators"] and "MatMulNBits" in described["operators"]
    assert "parameters" in edgelm("info", str(folder)).stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", ["import", "gguf", "onnx"])
def test_killed_mid_write_leaves_nothing_that_loads(
    tmp_path: Path, small_tokenizer: Tokenizer, command: str
) -> None:
    """kill -9 while the output is being written (its hidden temporary name exists and grows): the
    output's own name never appears, loading it fails, and the same command then succeeds."""
    config = dataclasses.replace(
        SMALL, hidden_size=256, intermediate_size=1024, head_dim=64, num_hidden_layers=24
    )
    checkpoint = make_checkpoint(tmp_path / "ckpt", small_tokenizer, config)
    out, args = {
        "import": (tmp_path / "imported", ["import", str(checkpoint)]),
        "gguf": (tmp_path / "out.gguf", ["export", "gguf", str(checkpoint), "--quant", "q4_k_m"]),
        "onnx": (tmp_path / "onnx", ["export", "onnx", str(checkpoint), "--quant", "int4"]),
    }[command]
    args += ["--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "edgelm", *args], stderr=subprocess.DEVNULL)
    temporary = temporary_sibling(out)
    while process.poll() is None and not written_into(temporary):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "finished before it could be killed: make the model larger"
    assert not out.exists()
    with pytest.raises(EdgelmError):
        edgelm_module.load(out)
    assert edgelm(*args).returncode == 0
    with edgelm_module.load(out) as model:
        assert model.config.num_hidden_layers == config.num_hidden_layers


def written_into(temporary: Path) -> bool:
    """Whether the temporary file (or a file inside the temporary folder) holds data yet."""
    files = [temporary] if temporary.is_file() else list(temporary.glob("*")) if temporary.is_dir() else []
    return any(f.is_file() and f.stat().st_size > 0 for f in files)
