"""`edgelm export gguf` and `edgelm export onnx`: a checkpoint into an artifact for llama.cpp or ONNX
Runtime."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import numpy as np


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `export` subcommand and its two formats."""
    export = commands.add_parser(
        "export", help="export a checkpoint to ONNX or GGUF", description="Export a checkpoint."
    )
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    _add_gguf(formats)
    _add_onnx(formats)


def _add_gguf(formats: argparse._SubParsersAction) -> None:
    """`export gguf` and its flags."""
    gguf = formats.add_parser(
        "gguf",
        help="a GGUF file for llama.cpp",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a GGUF file (llama.cpp's architecture for the family: llama, qwen2, "
        "qwen3, gemma2, gemma3, phi3; the full tokenizer) that llama.cpp and everything built on "
        "it loads. Types: f32, f16, bf16 (a bf16 model exactly), q8_0, q8_0_f16emb (Q8_0 with F16 "
        "embeddings and output), q4_0, q4_1, q4_k (Q4_K in every layer), q6_k, q4_k_m (llama.cpp's "
        "Q4_K_M mixture). Rows "
        "whose length is not a multiple of 256 fall back from Q4_K to Q5_0 and from Q6_K to Q8_0, "
        "as in llama.cpp.",
    )
    gguf.add_argument("checkpoint", help="checkpoint directory")
    gguf.add_argument("--quant", default="f16", help="quantization type or mixture (see above)")
    gguf.add_argument(
        "--out",
        default=None,
        help="a .gguf path, or a folder for NAME-TYPE.gguf (default: beside the checkpoint)",
    )
    gguf.add_argument(
        "--calibration",
        default=None,
        metavar="TEXT",
        help="a UTF-8 text file: quantize to minimize each layer's output error on the activations it causes "
        "(importance weighting and GPTQ error feedback)",
    )
    gguf.add_argument(
        "--via",
        choices=["edgelm", "llama.cpp"],
        default="edgelm",
        help="quantize with edgelm, or with llama.cpp's own quantizer from edgelm's F32 file",
    )
    gguf.add_argument("--threads", type=int, default=None, help="quantizer threads (default: every core)")
    gguf.set_defaults(run=run_gguf)


def _add_onnx(formats: argparse._SubParsersAction) -> None:
    """`export onnx` and its flags."""
    onnx = formats.add_parser(
        "onnx",
        help="an ONNX folder for ONNX Runtime and onnxruntime-genai",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write an ONNX folder (model.onnx + external data, tokenizer, genai_config.json, "
        "edgelm.json) on ONNX Runtime's fused operators: GroupQueryAttention, "
        "SkipSimplifiedLayerNormalization and, for int8/int4, MatMulNBits. Precisions: fp32, fp16 (GPU "
        "providers), int8, int4. "
        "--via optimum exports any causal LM optimum supports (quantized by ONNX Runtime's own tools).",
    )
    onnx.add_argument("checkpoint", help="checkpoint directory (or, with --via optimum, any HF model folder)")
    onnx.add_argument(
        "--quant",
        default="fp32",
        help="fp32, fp16, int8, int8_dynamic (ORT's dynamic int8 path), int4, int4_mixed (4, 6 or 8 bits "
        "per matrix where they matter most to the prediction, in the size of llama.cpp's Q4_K_M; calibrated "
        "on the built-in corpus unless --calibration; where they matter is always measured on it)",
    )
    onnx.add_argument("--out", default=None, help="output folder (default: CHECKPOINT-onnx-QUANT beside it)")
    onnx.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="int8/int4: values per scale (power of 2; int4_mixed chooses)",
    )
    onnx.add_argument(
        "--zero-points", action="store_true", help="int8/int4: asymmetric blocks with uint8 zero points"
    )
    onnx.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        help="int8/int4 on CPU: MatMulNBits' compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)",
    )
    onnx.add_argument(
        "--calibration",
        default=None,
        metavar="TEXT",
        help="int8/int4: a UTF-8 text file; quantize to minimize each layer's output error on it (GPTQ)",
    )
    onnx.add_argument(
        "--via",
        choices=["edgelm", "optimum"],
        default="edgelm",
        help="build the graph with edgelm, or export with optimum (its own environment: see README)",
    )
    onnx.add_argument("--threads", type=int, default=None, help="quantizer threads (default: every core)")
    onnx.set_defaults(run=run_onnx)


def run_gguf(args: argparse.Namespace) -> None:
    """Write the GGUF file (with edgelm's quantizer or llama.cpp's) and print its size."""
    from edgelm.export.gguf import export_gguf, export_gguf_via_llama_cpp

    out = Path(args.out) if args.out else None
    if args.via == "llama.cpp":
        if args.calibration:
            raise EdgelmError("--calibration applies to edgelm's quantizer, not --via llama.cpp")
        path = export_gguf_via_llama_cpp(Path(args.checkpoint), out, args.quant)
    else:
        hessians = _hessians(args)
        path = export_gguf(Path(args.checkpoint), out, args.quant, hessians, args.threads, show_progress=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def run_onnx(args: argparse.Namespace) -> None:
    """Write the ONNX folder (with edgelm's graph builder or optimum) and print its size."""
    out = Path(args.out) if args.out else None
    if args.via == "optimum":
        from edgelm.export.optimum import export_via_optimum

        if args.calibration or args.zero_points:
            raise EdgelmError(
                "--calibration and --zero-points apply to edgelm's quantizer, not --via optimum"
            )
        folder = export_via_optimum(Path(args.checkpoint), out, args.quant)
    else:
        from edgelm.export.onnx import export_onnx
        from edgelm.export.onnx_quant import QuantOptions

        options = QuantOptions(args.block_size, not args.zero_points, args.accuracy_level)
        hessians = _hessians(args)
        folder = export_onnx(
            Path(args.checkpoint), out, args.quant, options, hessians, args.threads, show_progress=True
        )
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.1f} MB)")


def _hessians(args: argparse.Namespace) -> Mapping[str, np.ndarray] | None:
    """The activation covariances of --calibration's text on the checkpoint, or None without it."""
    if not args.calibration:
        return None
    from edgelm.quant.calibration import activation_covariance, read_calibration_text

    text = read_calibration_text(Path(args.calibration))
    return activation_covariance(Path(args.checkpoint), text)
