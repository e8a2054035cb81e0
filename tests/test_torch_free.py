"""Inference without torch: a fresh virtual environment with only `edgelm[onnx]`, or only `edgelm[llamacpp]`,
generates from an exported artifact the same greedy text as this environment, and cannot import torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgelm

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n"

SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    import edgelm
    model = edgelm.load(sys.argv[1])
    text = model.generate(sys.argv[2], max_new_tokens=12, temperature=0)
    assert importlib.util.find_spec("torch") is None, "torch is importable"
    assert "torch" not in sys.modules
    print(repr(text))
    """
)


def fresh_environment(directory: Path, extra: str) -> Path:
    """A new virtual environment (no system packages) with edgelm[extra] installed; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    python = directory / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{REPO}[{extra}]"],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        if index_unreachable(install.stderr):
            pytest.skip(f"no package index reachable to build a fresh environment: {install.stderr[-300:]}")
        raise AssertionError(f"pip install {extra} failed:\n{install.stderr[-3000:]}")
    return python


# what pip prints when it cannot reach the index at all; "Could not find a version" alone is a broken pin
UNREACHABLE = (
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ProxyError",
)


def index_unreachable(pip_stderr: str) -> bool:
    """Whether a failed `pip install` failed because no package index could be reached."""
    return any(message in pip_stderr for message in UNREACHABLE)


def test_only_an_unreachable_index_skips() -> None:
    broken_pin = (
        "ERROR: Could not find a version that satisfies the requirement onnxruntime>=99 (from edgelm[onnx])\n"
        "ERROR: No matching distribution found for onnxruntime>=99\n"
    )
    offline = (
        "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after "
        "connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object>: "
        "Failed to establish a new connection: [Errno 101] Network is unreachable')': /simple/onnx/\n"
        + broken_pin
    )
    assert not index_unreachable(broken_pin)
    assert index_unreachable(offline)


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["onnx", "llamacpp"])
def test_a_fresh_environment_without_torch_generates(extra: str, checkpoint: Path, tmp_path: Path) -> None:
    if extra == "onnx":
        from edgelm.export.onnx import export_onnx

        artifact = export_onnx(checkpoint, tmp_path / "onnx", "int4")
    else:
        from edgelm.export.gguf import export_gguf

        artifact = export_gguf(checkpoint, tmp_path, "q8_0")
    with edgelm.load(artifact) as model:
        expected = model.generate(PROMPT, max_new_tokens=12, temperature=0)

    python = fresh_environment(tmp_path / "venv", extra)
    run = subprocess.run(
        [str(python), "-c", SCRIPT, str(artifact), PROMPT], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == repr(expected)
    # run from the repository root, the source folder shadows the installed package: it imports the same
    from_root = subprocess.run(
        [str(python), "-c", "import edgelm.runtimes.base, edgelm.export"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert from_root.returncode == 0, from_root.stderr[-3000:]
