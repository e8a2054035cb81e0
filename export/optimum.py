"""A Hugging Face causal-LM folder → ONNX folder through optimum, quantized by ONNX Runtime's own tools.

    checkpoint ──optimum (its own python, offline)──▶ model.onnx (fp32, or fp16 with --dtype fp16)
               ──onnxruntime.quantization──▶ int8: quantize_dynamic (QInt8 weights of every MatMul)
                                             int4: MatMulNBitsQuantizer (block 32, symmetric, accuracy 4)
               ──▶ model.onnx + model.onnx.data, config.json, tokenizer files, edgelm.json

This is the reference export that edgelm's own (`edgelm.export.onnx`) is measured against, and the way to
ONNX for architectures edgelm does not build itself. optimum-onnx pins transformers<4.58, which edgelm
(transformers 5) cannot share, so optimum runs in an environment of its own as a subprocess: the python
named by $EDGELM_OPTIMUM_PYTHON, else this interpreter if it has optimum, else ~/.edgelm-optimum if it
exists. The graph is optimum's plain one (attention from primitives, position_ids, past/present KV of
growing length), which `edgelm.runtimes.onnxruntime.OnnxRuntime` runs as it is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgelm._version import __version__
from edgelm.checkpoint import checkpoint_sha256
from edgelm.errors import EdgelmError, missing_dependency
from edgelm.export.onnx import COPIED_FILES, package_version
from edgelm.files import temporary_sibling, write_json_atomic
from edgelm.formats.onnx import DATA_FILE, MODEL_FILE, PROVENANCE

try:
    import onnx
except ModuleNotFoundError as e:
    raise missing_dependency("onnx", "onnx") from e

PYTHON_VARIABLE = "EDGELM_OPTIMUM_PYTHON"
DEFAULT_ENV = Path("~/.edgelm-optimum")
TASK = "text-generation-with-past"
# the source's own files win over optimum's re-saved ones, so that the folder reads like the checkpoint
# what the optimum environment installs beside this one's packages (it is made with --system-site-packages)
ENVIRONMENT_REQUIREMENTS = ("optimum-onnx", "transformers<4.58")
SETUP_HINT = (
    f"create one with: python -m venv --system-site-packages {DEFAULT_ENV} && {DEFAULT_ENV}/bin/pip install "
    + " ".join(f'"{r}"' if "<" in r else r for r in ENVIRONMENT_REQUIREMENTS)
    + f" (found there automatically), or point {PYTHON_VARIABLE} at the python of an environment that has "
    "optimum-onnx"
)
# run inside the optimum environment: does it have the exporter, and which versions does it hold
_PROBE = """
import importlib.metadata as m, importlib.util as u, json, sys
ok = u.find_spec("optimum") is not None and u.find_spec("optimum.exporters.onnx") is not None
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
names = ("optimum", "optimum-onnx", "transformers", "torch", "onnxruntime")
print(json.dumps({"ok": ok, "python": sys.version.split()[0], **{n: version(n) for n in names}}))
"""


QuantizeFunction = Callable[[Path, Path, dict[str, Any]], "onnx.ModelProto"]


@dataclass(frozen=True)
class OptimumPrecision:
    """How one `--quant` is made: optimum's export dtype, then ONNX Runtime's quantizer (if any)."""

    export_dtype: str  # optimum's --dtype: "fp32" or "fp16"
    # (exported model, work folder, parameters) -> the quantized model, loaded with its weights
    quantize: QuantizeFunction | None = None
    tool: str | None = None  # the onnxruntime.quantization tool, as edgelm.json records it
    parameters: dict[str, Any] = field(default_factory=dict)


def _quantization_tools() -> ModuleType:
    """onnxruntime.quantization, imported when a quantizer runs; its per-MatMul log lines silenced."""
    try:
        import onnxruntime.quantization as tools
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ModuleNotFoundError as e:
        raise missing_dependency("onnxruntime", "onnx") from e
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    return tools


def quantize_dynamic(path: Path, work: Path, parameters: dict[str, Any]) -> onnx.ModelProto:
    """int8: ONNX Runtime's quantize_dynamic on the model at `path`, written under `work`, then loaded."""
    tools = _quantization_tools()
    work.mkdir(parents=True, exist_ok=True)
    tools.quantize_dynamic(
        path,
        work / MODEL_FILE,
        op_types_to_quantize=parameters["op_types_to_quantize"],
        per_channel=parameters["per_channel"],
        weight_type=tools.QuantType[parameters["weight_type"]],
        use_external_data_format=True,  # no 2 GiB limit
        extra_options=parameters["extra_options"],
    )
    return onnx.load(str(work / MODEL_FILE))


def quantize_matmul_nbits(path: Path, work: Path, parameters: dict[str, Any]) -> onnx.ModelProto:
    """int4: ONNX Runtime's MatMulNBitsQuantizer on the model at `path`, in memory (`work` unused)."""
    _quantization_tools()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(path), **parameters)
    quantizer.process()
    model: onnx.ModelProto = quantizer.model.model
    return model


INT8_PARAMETERS = {
    "weight_type": "QInt8",
    # per-tensor: on random and trained small Llamas per-channel QInt8 gave larger logit errors here
    "per_channel": False,
    # weights only: the embedding Gather stays float (a quantized one is dequantized whole at every step)
    "op_types_to_quantize": ["MatMul"],
    "extra_options": {"MatMulConstBOnly": True},
}
INT4_PARAMETERS = {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4}
PRECISIONS = {
    "fp32": OptimumPrecision("fp32"),
    # optimum's own fp16 export runs on CPU too, and keeps the attention mask finite (onnxruntime's
    # float16 converter, applied to the fp32 graph, breaks decoding: its mask overflows in fp16)
    "fp16": OptimumPrecision("fp16"),
    "int8": OptimumPrecision("fp32", quantize_dynamic, "quantize_dynamic", INT8_PARAMETERS),
    "int4": OptimumPrecision("fp32", quantize_matmul_nbits, "MatMulNBitsQuantizer", INT4_PARAMETERS),
}


def output_folder(checkpoint: Path, out: Path | None, quant: str) -> Path:
    """`--out`, else `<checkpoint>-optimum-<quant>` beside the checkpoint."""
    return out if out is not None else checkpoint.with_name(f"{checkpoint.name}-optimum-{quant}")


def export_via_optimum(checkpoint: Path, out: Path | None = None, quant: str = "fp32") -> Path:
    """Export a Hugging Face causal-LM folder with optimum (text-generation-with-past), quantize it with
    ONNX Runtime's tools, and write an ONNX folder as `edgelm.export.onnx` does; return the folder."""
    if quant not in PRECISIONS:
        raise EdgelmError(f"unknown ONNX precision {quant!r}; choose one of {', '.join(PRECISIONS)}")
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise EdgelmError(
            f"{checkpoint}: not a Hugging Face model folder (no config.json); --via optimum exports "
            "a checkpoint directory"
        )
    folder = output_folder(checkpoint, Path(out) if out is not None else None, quant)
    if folder.exists() and not (folder / MODEL_FILE).is_file():
        raise EdgelmError(f"{folder} exists and is not an ONNX folder; choose another --out")
    precision = PRECISIONS[quant]
    python = optimum_python()
    environment = probe(python)

    tmp = temporary_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        raw = tmp / "optimum"
        run_optimum(python, checkpoint, raw, precision.export_dtype)
        model = quantize(raw / MODEL_FILE, precision, tmp / "quantized")
        onnx.save_model(
            model,
            str(tmp / MODEL_FILE),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
        )
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        opset = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
        del model
        for path in raw.iterdir():  # optimum's tokenizer and config files (special_tokens_map.json, ...)
            if path.is_file() and not path.name.startswith(MODEL_FILE):
                shutil.copyfile(path, tmp / path.name)
        for name in COPIED_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        shutil.rmtree(raw)
        shutil.rmtree(tmp / "quantized", ignore_errors=True)
        write_json_atomic(tmp / PROVENANCE, provenance(checkpoint, quant, precision, opset, environment))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------- the optimum environment


def optimum_python() -> Path:
    """The python that runs optimum: $EDGELM_OPTIMUM_PYTHON, this one if it has optimum, ~/.edgelm-optimum."""
    named = os.environ.get(PYTHON_VARIABLE)
    if named:
        path = Path(named).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise EdgelmError(f"{PYTHON_VARIABLE}={named}: no such python executable; {SETUP_HINT}")
        return path
    if _has_exporter():
        return Path(sys.executable)
    home = DEFAULT_ENV.expanduser()
    for candidate in (home / "bin" / "python", home / "Scripts" / "python.exe"):
        if candidate.is_file():
            return candidate
    raise EdgelmError(
        "--via optimum needs optimum-onnx, which pins transformers<4.58 and so lives in an environment "
        f"of its own; {SETUP_HINT}"
    )


def _has_exporter() -> bool:
    """Whether this interpreter imports optimum.exporters.onnx (without importing it)."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except (ImportError, ValueError):  # no optimum at all, or a broken one
        return False


def probe(python: Path) -> dict[str, Any]:
    """Ask the optimum python whether it has the exporter; return its package versions."""
    try:
        result = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EdgelmError(f"{python}: cannot run it ({e}); {SETUP_HINT}") from None
    try:
        versions = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise EdgelmError(
            f"{python} failed to report its packages:\n{_tail(result.stderr)}\n{SETUP_HINT}"
        ) from None
    if not versions.pop("ok"):
        raise EdgelmError(f"{python} has no optimum.exporters.onnx; {SETUP_HINT}")
    return versions


def run_optimum(python: Path, checkpoint: Path, out: Path, dtype: str) -> None:
    """`optimum-cli export onnx --task text-generation-with-past` in the optimum python, offline; its
    stderr becomes the error's text when it fails."""
    command = [
        str(python),
        "-m",
        "optimum.commands.optimum_cli",
        "export",
        "onnx",
        "--model",
        str(checkpoint.resolve()),
        "--task",
        TASK,
        "--dtype",
        dtype,
        str(out),
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise EdgelmError(
            f"optimum failed to export {checkpoint} (exit {result.returncode}):\n{_tail(result.stderr)}"
        )
    if not (out / MODEL_FILE).is_file():
        made = ", ".join(sorted(p.name for p in out.iterdir())) if out.is_dir() else "nothing"
        raise EdgelmError(
            f"optimum exported {checkpoint} without a single {MODEL_FILE} (it wrote {made}); "
            "--via optimum handles decoder-only causal LMs"
        )


def _tail(text: str, lines: int = 40) -> str:
    """The last lines of a subprocess's output, where its error is."""
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ quantization


def quantize(path: Path, precision: OptimumPrecision, work: Path) -> onnx.ModelProto:
    """The exported model at `path`, quantized as `precision` says, loaded with its weights."""
    if precision.quantize is None:
        return onnx.load(str(path))
    return precision.quantize(path, work, precision.parameters)


# ------------------------------------------------------------------------------------------ the folder


def provenance(
    checkpoint: Path,
    quant: str,
    precision: OptimumPrecision,
    opset: dict[str, int],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """What edgelm.json records: the source's hash, the export and quantization, both environments."""
    try:
        sha256 = checkpoint_sha256(checkpoint)
    except (EdgelmError, OSError):  # not a safetensors checkpoint with tokenizer.json: no hash
        sha256 = None
    quantization: dict[str, Any] = {"export_dtype": precision.export_dtype, "tool": precision.tool}
    quantization |= precision.parameters
    return {
        "format": "onnx",
        "via": "optimum",
        "quant": quant,
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256},
        "export": {"tool": "optimum", "task": TASK},
        "quantization": quantization,
        "opset": opset,
        "versions": {
            "edgelm": __version__,
            "onnx": onnx.__version__,
            "onnxruntime": package_version("onnxruntime"),  # the quantizer's
            "optimum_environment": environment,  # the exporter's
        },
    }
