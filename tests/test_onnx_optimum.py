"""`export onnx --via optimum`: optimum's graph, ONNX Runtime's quantizers, run by edgelm's OnnxRuntime and
checked against the PyTorch runtime on the same checkpoint.

optimum-onnx lives in an environment of its own (it pins transformers<4.58): $EDGELM_OPTIMUM_PYTHON, or
~/.edgelm-optimum, which the `optimum_python` fixture makes as the README does when there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import kept_prefix_error, make_checkpoint

import edgelm
from edgelm.checkpoint import checkpoint_sha256
from edgelm.errors import EdgelmError
from edgelm.export import optimum
from edgelm.export.optimum import PYTHON_VARIABLE, export_via_optimum
from edgelm.runtimes.onnxruntime import OnnxRuntime
from edgelm.tokenizer import Tokenizer

PROMPT = 40  # prefill tokens; then DECODE single steps
DECODE = 4


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    """The python that runs optimum; without one, the README's environment is made at ~/.edgelm-optimum
    (as a user would make it), so that these tests run wherever the suite does. Failing to make it fails
    the tests that need it."""
    try:
        python = optimum.optimum_python()
        optimum.probe(python)
        return python
    except EdgelmError:
        if os.environ.get(PYTHON_VARIABLE):
            raise  # a python the user named is theirs to fix
    home = optimum.DEFAULT_ENV.expanduser()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(home)], check=True)
    python = home / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *optimum.ENVIRONMENT_REQUIREMENTS,
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, f"making {home} failed:\n{install.stderr[-3000:]}"
    optimum.probe(python)
    return python


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("optimum") / "ckpt", small_tokenizer)


@pytest.fixture(scope="module")
def reference(source: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Token ids, the torch runtime's prefill logits (all positions) and its logits at each decode step."""
    ids = np.random.default_rng(0).integers(0, edgelm.load(source).config.vocab_size, PROMPT + DECODE)
    return ids.tolist(), *_logits(source, ids.tolist())


def _logits(path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with edgelm.load(path) as model:
        prefill = model.runtime.forward(ids[:PROMPT], all_logits=True)
        decode = np.concatenate([model.runtime.forward([i]) for i in ids[PROMPT:]])
    return prefill, decode


def _op_types(folder: Path) -> set[str]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {node.op_type for node in graph.node}


@pytest.mark.usefixtures("optimum_python")
def test_fp32_matches_torch(source: Path, reference: tuple, tmp_path: Path) -> None:
    folder = export_via_optimum(source, tmp_path / "fp32", "fp32")
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json", "edgelm.json"} <= names
    assert not any(name.endswith(".tmp") for name in names) and not list(tmp_path.glob(".*"))
    assert (folder / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    info = json.loads((folder / "edgelm.json").read_text())
    assert (info["format"], info["via"], info["quant"]) == ("onnx", "optimum", "fp32")
    assert info["source"]["sha256"] == checkpoint_sha256(source)
    assert info["versions"]["optimum_environment"]["optimum-onnx"]

    with edgelm.load(folder) as model:
        assert isinstance(model.runtime, OnnxRuntime)
    ids, prefill, decode = reference
    got_prefill, got_decode = _logits(folder, ids)
    np.testing.assert_allclose(got_prefill, prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_decode, decode, atol=1e-4, rtol=0)
    with edgelm.load(folder) as model:  # plain attention's past tensors, cut back to a kept prefix
        assert kept_prefix_error(model.runtime, ids[:PROMPT], PROMPT // 2, ids[PROMPT:]) <= 1e-4


@pytest.mark.usefixtures("optimum_python")
@pytest.mark.parametrize(
    ("quant", "operator", "agreement"),
    # top-1 agreement with fp32 torch over all prefill and decode positions of a random model, whose
    # logits are far closer to ties than a trained one's; measured 0.92 (int8) and 0.5 (int4)
    [("int8", "MatMulInteger", 0.8), ("int4", "MatMulNBits", 0.35)],
)
def test_quantized_agrees_with_torch(
    source: Path, reference: tuple, tmp_path: Path, quant: str, operator: str, agreement: float
) -> None:
    folder = export_via_optimum(source, tmp_path / quant, quant)
    assert operator in _op_types(folder)
    if quant == "int4":
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        attributes = [
            {a.name: a.i for a in node.attribute} for node in graph.node if node.op_type == "MatMulNBits"
        ]
        assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attributes} == {(4, 32, 4)}
    ids, prefill, decode = reference
    got_prefill, got_decode = _logits(folder, ids)
    expected, got = np.concatenate([prefill, decode]), np.concatenate([got_prefill, got_decode])
    same = float((expected.argmax(-1) == got.argmax(-1)).mean())
    print(f"{quant}: top-1 agreement {same:.3f}, max |Δlogit| {np.abs(expected - got).max():.3f}")
    assert same >= agreement
    assert np.abs(expected - got).max() < 0.5 * np.abs(expected).max()  # close, though not exact


@pytest.mark.usefixtures("optimum_python")
def test_optimum_failure_shows_its_stderr(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(EdgelmError, match=r"(?s)optimum failed to export.*no-such-architecture"):
        export_via_optimum(broken, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


def test_no_optimum_python_is_a_clear_error(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PYTHON_VARIABLE, raising=False)
    monkeypatch.setattr(optimum, "_has_exporter", lambda: False)
    monkeypatch.setattr(optimum, "DEFAULT_ENV", tmp_path / "no-env")
    with pytest.raises(EdgelmError, match=rf"(?s)pip install optimum-onnx.*{PYTHON_VARIABLE}"):
        export_via_optimum(source, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def test_configured_python_without_optimum_is_a_clear_error(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PYTHON_VARIABLE, str(tmp_path / "missing" / "python"))
    with pytest.raises(EdgelmError, match=f"{PYTHON_VARIABLE}=.*no such python executable"):
        export_via_optimum(source, tmp_path / "out", "fp32")
    if optimum._has_exporter():
        pytest.skip("this interpreter has optimum, so it cannot stand for one without")
    monkeypatch.setenv(PYTHON_VARIABLE, sys.executable)
    with pytest.raises(EdgelmError, match=r"(?s)has no optimum\.exporters\.onnx.*venv"):
        export_via_optimum(source, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def test_bad_input(source: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgelmError, match="unknown ONNX precision 'int3'"):
        export_via_optimum(source, tmp_path / "out", "int3")
    with pytest.raises(EdgelmError, match=r"no config\.json"):
        export_via_optimum(tmp_path, tmp_path / "out", "fp32")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(EdgelmError, match="is not an ONNX folder"):
        export_via_optimum(source, tmp_path / "taken", "fp32")
