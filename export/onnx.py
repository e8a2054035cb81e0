"""Checkpoint → ONNX folder on ONNX Runtime's fused operators, which onnxruntime-genai also runs unchanged.

The export is in five modules, one per step: `onnx_quant` (the precisions: which matrices at which bits,
quantized by `edgelm.quant.blocks`), `onnx_matrices` (the graph's matrices as read from the checkpoint, and
int4_mixed's format for each), `onnx_pack` (their bytes in MatMulNBits' layout), `onnx_graph` (the
graph, written node by node from the checkpoint's numpy arrays: no torch, no tracing), and this one (the
folder).

`GroupQueryAttention` (domain com.microsoft) applies the rotary embedding itself from cos/sin tables and
appends to the KV cache; q/k/v and gate/up are each one fused matrix. Quantized matrices are `MatMulNBits`
(int8, int4, int4_mixed; a 6-bit matrix of int4_mixed is two of them, 4 and 2 bits, summed) or
`DynamicQuantizeMatMul` (int8_dynamic), and the quantized embedding table is `GatherBlockQuantized`:
`edgelm.quant.blocks` chooses the codes and scales, this module only packs them.

The folder: model.onnx + model.onnx.data (every weight as external data, so no 2 GiB limit), config.json,
the tokenizer files, genai_config.json (onnxruntime-genai) and edgelm.json (provenance). The data file is
written while the graph is built, one matrix after another, so memory holds one matrix, not the model.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgelm._version import __version__
from edgelm.checkpoint import checked_entries, checkpoint_sha256, tensor_reader
from edgelm.errors import EdgelmError, missing_dependency
from edgelm.export.onnx_graph import MS_DOMAIN, OPSET, build_model
from edgelm.export.onnx_quant import (
    DYNAMIC_BITS,
    MIXED_SIZE_OF,
    PRECISIONS,
    BlockFormat,
    Precision,
    QuantOptions,
)
from edgelm.files import temporary_sibling, write_json_atomic
from edgelm.formats.onnx import DATA_FILE, GENAI_CONFIG, MODEL_FILE, PROVENANCE
from edgelm.model.config import ARCHITECTURES, DEFAULT_CONTEXT, ModelConfig
from edgelm.progress import progress_bar
from edgelm.quant.calibration import progress_label
from edgelm.quant.sensitivity import SENSITIVITY_TOKENS

try:
    import onnx
except ModuleNotFoundError as e:
    raise missing_dependency("onnx", "onnx") from e

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
BUILTIN_CALIBRATION_TOKENS = 8192  # int4_mixed without calibration text: this much of the built-in corpus
BUILTIN_CALIBRATION = f"built-in corpus, training split, {BUILTIN_CALIBRATION_TOKENS} tokens"
BUILTIN_SENSITIVITY = f"output sensitivity, built-in corpus, training split, {SENSITIVITY_TOKENS} tokens"
# model.onnx (its nodes and the initializers' places), genai_config.json and edgelm.json, which int4_mixed's
# budget cannot measure before its matrices are chosen: at most this per layer (measured: 6-7.5 KB)
GRAPH_BYTES_PER_LAYER = 8_000


def output_folder(checkpoint: Path, out: Path | None, quant: str) -> Path:
    """`--out`, else `<checkpoint>-onnx-<quant>` beside the checkpoint."""
    return out if out is not None else checkpoint.with_name(f"{checkpoint.name}-onnx-{quant}")


def builtin_calibration(checkpoint: Path) -> Mapping[str, np.ndarray]:
    """The activation statistics of BUILTIN_CALIBRATION_TOKENS tokens of the built-in corpus's training
    split on the checkpoint: what int4_mixed calibrates on when it is given no text."""
    from edgelm.quant.calibration import activation_covariance
    from edgelm.training.data import builtin_calibration_text

    text = builtin_calibration_text(8 * BUILTIN_CALIBRATION_TOKENS)  # fewer than 8 characters per token
    return activation_covariance(checkpoint, text, max_tokens=BUILTIN_CALIBRATION_TOKENS)


def builtin_sensitivity(checkpoint: Path, advance: Callable[[str], None]) -> dict[str, np.ndarray]:
    """How much each output of each matrix matters to the prediction (`output_sensitivity`, which calls
    `advance` 2 × layers times), on SENSITIVITY_TOKENS tokens of the built-in corpus: what weighs
    int4_mixed's choice of formats."""
    from edgelm.quant.sensitivity import output_sensitivity
    from edgelm.training.data import builtin_calibration_text

    return output_sensitivity(
        checkpoint, builtin_calibration_text(8 * SENSITIVITY_TOKENS), SENSITIVITY_TOKENS, advance=advance
    )


def mixed_budget(checkpoint: Path, config: ModelConfig, folder: Path) -> int:
    """int4_mixed's bytes for model.onnx.data: the size of the checkpoint's MIXED_SIZE_OF GGUF file, less
    the files already in `folder` and GRAPH_BYTES_PER_LAYER for each layer."""
    from edgelm.export.gguf import planned_size

    copied = sum(f.stat().st_size for f in folder.iterdir())
    graph = GRAPH_BYTES_PER_LAYER * (config.num_hidden_layers + 1)
    return planned_size(checkpoint, MIXED_SIZE_OF) - copied - graph


def _copy(source: Path, target: Path) -> None:
    """A checkpoint file copied into the folder; JSON without the indentation that can double its size
    (a tokenizer.json's vocabulary and merges), the same values."""
    if source.suffix == ".json":
        value = json.loads(source.read_text(encoding="utf-8"))
        target.write_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    else:
        shutil.copyfile(source, target)


def export_onnx(
    checkpoint: Path,
    out: Path | None = None,
    quant: str = "fp32",
    options: QuantOptions | None = None,
    hessians: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Write the checkpoint as an ONNX folder of the given precision (a key of PRECISIONS); return it. The
    quantizer runs on `threads` threads (None: every core); `show_progress` draws a bar per layer on a
    terminal.

    `hessians` (from `edgelm.quant.calibration.activation_covariance`) make the int8/int4 quantizer minimize
    each layer's output error (activation-weighted scales and GPTQ error feedback), as for GGUF. int4_mixed
    without them calibrates on the built-in corpus (`builtin_calibration`), and, with or without them, weighs
    its choice of formats by each output's sensitivity on the built-in corpus (`builtin_sensitivity`).
    """
    if quant not in PRECISIONS:
        raise EdgelmError(f"unknown ONNX precision {quant!r}; choose one of {', '.join(PRECISIONS)}")
    options = options or QuantOptions()
    options.check()
    checkpoint = Path(checkpoint)
    config, entries = checked_entries(checkpoint)
    if config.rotary_dim % 16:
        raise EdgelmError(
            f"{checkpoint}: ONNX Runtime's GroupQueryAttention rotates a multiple of 16 dimensions per head, "
            f"and this model rotates {config.rotary_dim}; export it to GGUF, or run the checkpoint itself"
        )
    folder = output_folder(checkpoint, Path(out) if out is not None else None, quant)
    if folder.exists() and not (folder / MODEL_FILE).is_file():
        raise EdgelmError(f"{folder} exists and is not an ONNX folder; choose another --out")
    precision = PRECISIONS[quant]
    calibration = "given" if hessians else None
    if precision.mixed and not hessians:
        hessians, calibration = builtin_calibration(checkpoint), BUILTIN_CALIBRATION

    tmp = temporary_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in COPIED_FILES:
            if (checkpoint / name).is_file():
                _copy(checkpoint / name, tmp / name)
        budget = mixed_budget(checkpoint, config, tmp) if precision.mixed else None
        # int4_mixed measures each layer's sensitivity forward and backward, and ranks the layers, first
        steps = config.num_hidden_layers * (4 if precision.mixed else 1)
        label = f"{folder.name}{progress_label(hessians)}"
        with open(tmp / DATA_FILE, "wb") as data, progress_bar(label, steps, show_progress) as advance:
            sensitivity = builtin_sensitivity(checkpoint, advance) if precision.mixed else None
            weights, statistics = tensor_reader(entries), hessians or {}
            model, formats = build_model(
                config, weights, precision, options, statistics, data, threads, advance, budget, sensitivity
            )
        graph = _checked_graph(model, tmp)
        write_json_atomic(tmp / GENAI_CONFIG, genai_config(config))
        record = provenance(checkpoint, quant, precision, options, calibration, formats)
        write_json_atomic(tmp / PROVENANCE, record)
        graph.replace(tmp / MODEL_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _checked_graph(model: onnx.ModelProto, folder: Path) -> Path:
    """The graph saved in `folder` under a partial name, since it takes its name last so that a folder cut
    short by a kill never loads (its weights are in model.onnx.data already), and passed by onnx.checker."""
    graph = folder / f"{MODEL_FILE}.partial"
    onnx.save_model(model, str(graph))
    try:
        onnx.checker.check_model(str(graph), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        message = f"the exported graph fails onnx.checker (a bug in edgelm; please report it): {e}"
        raise EdgelmError(message) from None
    return graph


# ------------------------------------------------------------------------------------------ the folder


def genai_config(config: ModelConfig) -> dict[str, Any]:
    """onnxruntime-genai's description of the model: its shape, I/O names and default search options."""
    ids = config.eos_token_id
    eos: int | list[int] = ids if isinstance(ids, int) else list(ids)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": eos if isinstance(eos, int) else eos[0],
            "type": ARCHITECTURES[config.architecture],  # transformers' model_type, which genai also names
            "vocab_size": config.vocab_size,
        },
        "search": {
            "do_sample": False,
            # genai reserves its KV buffers for max_length: a 128 k context would take tens of GB
            "max_length": min(config.max_position_embeddings, DEFAULT_CONTEXT),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def provenance(
    checkpoint: Path,
    quant: str,
    precision: Precision,
    options: QuantOptions,
    calibration: str | None,
    formats: Mapping[str, BlockFormat],
) -> dict[str, Any]:
    """What edgelm.json records: the source checkpoint's hash, how the weights were quantized (and on what
    text: "given" or the built-in corpus; for int4_mixed, each matrix's bits and block by its name in
    `matrix_names`, and what weighed their choice), the opsets and the tools' versions."""
    quantization: dict[str, Any] = {"dtype": precision.dtype, "bits": precision.bits}
    if precision.bits is not None:
        method = "gptq" if calibration else ("search" if options.search else "round-to-nearest")
        quantization |= dataclasses.asdict(options) | {"method": method, "operator": "MatMulNBits"}
        quantization["calibration"] = calibration
    if precision.dynamic:
        quantization |= {"bits": DYNAMIC_BITS, "block_size": "per output channel"}
        quantization |= {"operator": "DynamicQuantizeMatMul", "embedding": "GatherBlockQuantized 8-bit"}
    if precision.mixed:
        quantization |= {"size_of": f"gguf {MIXED_SIZE_OF}", "bits": "mixed", "block_size": "mixed"}
        quantization["matrices"] = {name: [f.bits, f.block] for name, f in formats.items()}
        quantization["weighed_by"] = BUILTIN_SENSITIVITY
    return {
        "format": "onnx",
        "quant": quant,
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": checkpoint_sha256(checkpoint)},
        "quantization": quantization,
        "opset": {"ai.onnx": OPSET, MS_DOMAIN: 1},
        "versions": {
            "edgelm": __version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "onnxruntime": package_version("onnxruntime"),
        },
    }


def package_version(package: str) -> str | None:
    """The installed version of a package, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
