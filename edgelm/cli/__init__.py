"""The `edgelm` command. Each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edgelm.errors import EdgelmError, missing_dependency

DESCRIPTION = """\
edgelm: train a small Llama-style model or bring one, export it to GGUF, and run it.

  edgelm train --out runs/tiny                       train the tiny preset on the built-in corpus
  edgelm generate runs/tiny --prompt "def "          continue a prompt
  edgelm info runs/tiny                              parameters, context and export sizes
  edgelm export gguf runs/tiny --quant q4_k_m        a GGUF file for llama.cpp
  edgelm export onnx runs/tiny --quant int4          an ONNX folder for ONNX Runtime
  edgelm generate runs/tiny-Q4_K_M.gguf --prompt "x"  run it in llama.cpp
  edgelm import ~/models/SmolLM2-135M --out ck/sm    bring a Hugging Face folder or a GGUF file
  edgelm compare runs/tiny --out runs/tiny-report    export to every format, check each: report.md
  edgelm check runs/tiny-Q4_0.gguf --reference runs/tiny --max-kld 0.05
                                                     one artifact against it; exit 1 when a gate fails
  edgelm serve runs/tiny --port 8080                 an OpenAI-compatible server on 127.0.0.1
"""


def build_parser() -> argparse.ArgumentParser:
    """The `edgelm` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="edgelm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edgelm {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model on a corpus",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a Llama-style model and its tokenizer. The output folder is a checkpoint "
        "(Hugging Face layout) that every other command accepts. Several processes or GPUs: "
        "torchrun --nproc_per_node N -m edgelm train ...",
    )
    train.add_argument(
        "--corpus",
        nargs="+",
        default=[],
        metavar="PATH",
        help="text files, folders or globs (.txt .md .py .jsonl with a 'text' field); "
        "default: the Python standard library's source files",
    )
    train.add_argument(
        "--preset",
        default="tiny",
        help="model size: tiny (~1.3M parameters, CPU minutes), small (~22M), base (~100M, GPU)",
    )
    train.add_argument("--out", default=None, help="run folder (default: runs/PRESET)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    train.add_argument("--batch-size", type=int, help="sequences per micro-step and process")
    train.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--warmup", type=int, help="warm-up steps before the cosine decay")
    train.add_argument("--context", type=int, help="context length (default: the preset's)")
    train.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size (default: the preset's)")
    train.add_argument("--eval-every", type=int, help="steps between validation and checkpoints")
    train.add_argument("--val-fraction", type=float, help="share of documents held out for validation")
    train.add_argument("--seed", type=int, help="seed for initialisation and batches")
    train.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings (only --steps and "
        "--device may change)",
    )
    mode.add_argument("--overwrite", action="store_true", help="start again in a folder that holds a run")
    train.set_defaults(run=_train)

    generate = commands.add_parser(
        "generate",
        help="continue a prompt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate text from a checkpoint directory (PyTorch) or a GGUF file (llama.cpp), "
        "streamed to standard output.",
    )
    generate.add_argument("model", help="checkpoint directory or .gguf file")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (0 = all)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    generate.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    generate.add_argument(
        "--runtime",
        default="auto",
        help="auto (torch for checkpoints, onnxruntime for ONNX folders, llamacpp for GGUF), or a plugin",
    )
    generate.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N, mps (torch), coreml or dml (onnxruntime), metal (llama.cpp)",
    )
    generate.set_defaults(run=_generate)

    importer = commands.add_parser(
        "import",
        help="import a Hugging Face folder or a GGUF file",
        description="Convert a Llama-family model into an edgelm checkpoint that every command accepts: "
        "a Hugging Face folder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; safetensors, sharded "
        "or not, in float32, float16 or bfloat16) or a GGUF file of architecture llama (any tensor type "
        "gguf-py dequantizes; its tokenizer is rebuilt from the GGUF metadata).",
    )
    importer.add_argument("source", help="Hugging Face model folder or .gguf file")
    importer.add_argument("--out", required=True, help="new checkpoint folder")
    importer.set_defaults(run=_import)

    export = commands.add_parser(
        "export", help="export a checkpoint to ONNX or GGUF", description="Export a checkpoint."
    )
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser(
        "gguf",
        help="a GGUF file for llama.cpp",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a GGUF file (architecture llama, full tokenizer) that llama.cpp and everything "
        "built on it loads. Types: f32, f16, q8_0, q8_0_f16emb (Q8_0 with F16 embeddings and output), "
        "q4_0, q4_1, q4_k, q6_k, q4_k_m (llama.cpp's Q4_K_M mixture). Rows whose length is not a multiple "
        "of 256 fall back from Q4_K to Q5_0 and from Q6_K to Q8_0, as in llama.cpp.",
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
    gguf.set_defaults(run=_export_gguf)

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
        help="fp32, fp16, int8, int8_dynamic (ORT's dynamic int8 path), int4, int4_mixed (int4 with the head "
        "and the most error-prone matrices at 8 bits)",
    )
    onnx.add_argument("--out", default=None, help="output folder (default: CHECKPOINT-onnx-QUANT beside it)")
    onnx.add_argument("--block-size", type=int, default=32, help="int8/int4: values per scale (power of 2)")
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
    onnx.set_defaults(run=_export_onnx)

    info = commands.add_parser(
        "info",
        help="describe a model",
        description="Architecture, parameter count, context length and the size each export type (fp32, "
        "fp16, int8, int4) would take; for a GGUF file, its tensor types, size and tokenizer.",
    )
    info.add_argument("model", help="checkpoint directory or .gguf file")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument(
        "--load",
        action="store_true",
        help="also load the model as an app would: time to import the runtime's engine and to load, the "
        "resident memory each adds, and the time to first token for a short prompt",
    )
    info.add_argument("--runtime", default="auto", help="with --load: the runtime (auto: the usual one)")
    info.add_argument("--device", default="auto", help="with --load: auto, cpu, cuda, cuda:N, mps, metal")
    info.set_defaults(run=_info)

    server = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve one model with OpenAI's HTTP API: POST /v1/completions and "
        '/v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models. '
        "Requests queue and run one at a time; a client that disconnects cancels its generation. Only "
        "this machine can connect unless --host says otherwise. Needs: pip install 'edgelm[serve]'.",
    )
    server.add_argument("model", help="checkpoint directory, ONNX folder or .gguf file")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, the network too)"
    )
    server.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    server.add_argument(
        "--runtime",
        default="auto",
        help="auto (torch for checkpoints, onnxruntime for ONNX folders, llamacpp for GGUF), or a plugin",
    )
    server.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N, mps (torch), coreml or dml (onnxruntime), metal (llama.cpp)",
    )
    server.set_defaults(run=_serve)
    _add_compare_and_check(commands)
    return parser


def _add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `compare` and `check` share: the text, the windows, the repetitions, where it runs."""
    parser.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="UTF-8 evaluation text (default: the held-out split of the built-in corpus)",
    )
    parser.add_argument(
        "--ctx", type=int, default=None, help="window length in tokens (default: the context)"
    )
    parser.add_argument(
        "--windows", type=int, default=None, help="evaluation windows (default: about 4096 tokens' worth)"
    )
    parser.add_argument(
        "--repetitions", type=int, default=5, help="latency runs, mean ± std (default: 5; 0: accuracy only)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps, metal")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every runtime (default: compare gives every runtime os.cpu_count(); "
        "check leaves each runtime its own default)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="folder for the reference's cached log-probs (default: REFERENCE/.edgelm-cache)",
    )


def _add_compare_and_check(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="export a checkpoint to every format and check each against it",
        description="Export the checkpoint to each target, check each against the checkpoint itself on the "
        "same token windows (PPL ratio, KL divergence, same top p, RMS Δp; pp and tg tokens/s, load time, "
        "time to first token, peak memory), and write report.md, report.json and charts. Targets: "
        "FORMAT:LEVEL (gguf:q8_0, gguf:q4_k_m, onnx:int4, ...), torch (the checkpoint itself) or an "
        "existing artifact's path. A target that fails is a row with its error; the others go on.",
    )
    compare.add_argument("checkpoint", help="the reference checkpoint directory")
    compare.add_argument("--out", default=None, help="report folder (default: CHECKPOINT-report)")
    compare.add_argument(
        "--targets",
        default=None,
        help="comma-separated targets (default: every installed format at its usual levels)",
    )
    _add_evaluation_flags(compare)
    compare.set_defaults(run=_compare)

    check = commands.add_parser(
        "check",
        help="check one artifact against a reference; exit 1 when a gate fails",
        description="Run a checkpoint, ONNX folder or GGUF file on the reference's token windows and "
        "compare: accuracy with llama-perplexity's statistics, and llama-bench-style speed. Exit status 1 "
        "when a gate fails (each failed gate is printed), when the artifact's tokenizer gives other ids "
        "than the reference's, or when the check cannot run.",
    )
    check.add_argument("artifact", help="checkpoint directory, ONNX folder or .gguf file")
    check.add_argument("--reference", required=True, help="the reference checkpoint directory")
    check.add_argument(
        "--runtime", default="auto", help="the artifact's runtime (default: auto, the usual one)"
    )
    check.add_argument("--max-kld", type=float, default=None, help="gate: mean KLD at most this (nats)")
    check.add_argument(
        "--min-top1", type=float, default=None, help="gate: same top p at least this fraction (0.9 = 90 %%)"
    )
    check.add_argument(
        "--max-ppl-ratio", type=float, default=None, help="gate: PPL(Q)/PPL(base) at most this"
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _add_evaluation_flags(check)
    check.set_defaults(run=_check)


def _train(args: argparse.Namespace) -> None:
    try:
        from edgelm.training.train import TrainConfig, resume, train
    except ModuleNotFoundError as e:
        raise missing_dependency(e.name or "torch", "torch") from None

    if args.resume:
        out = args.out or f"runs/{args.preset}"
        result = resume(out, steps=args.steps, device=args.device)
        print(f"resumed to step {result.step}: validation loss {result.val_loss:.3f}; checkpoint in {out}")
        return

    flags = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "warmup": args.warmup,
        "context": args.context,
        "vocab_size": args.vocab_size,
        "eval_every": args.eval_every,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
    }
    cfg = TrainConfig.for_preset(
        args.preset,
        out=args.out or f"runs/{args.preset}",
        corpus=tuple(args.corpus),
        device=args.device,
        **{k: v for k, v in flags.items() if v is not None},
    )
    result = train(cfg, overwrite=args.overwrite)
    print(
        f"trained {result.step} steps ({result.tokens:,} tokens): train loss {result.train_loss:.3f}, "
        f"validation loss {result.val_loss:.3f}; checkpoint in {cfg.out}"
    )


def _generate(args: argparse.Namespace) -> None:
    from edgelm.generation.api import load

    with load(args.model, runtime=args.runtime, device=args.device) as model:
        pieces = model.stream(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _import(args: argparse.Namespace) -> None:
    from edgelm.importer import import_model

    out = import_model(Path(args.source), Path(args.out))
    print(f"imported {args.source} into {out}")


def _export_gguf(args: argparse.Namespace) -> None:
    from edgelm.export.gguf import export_gguf, export_gguf_via_llama_cpp

    out = Path(args.out) if args.out else None
    if args.via == "llama.cpp":
        if args.calibration:
            raise EdgelmError("--calibration applies to edgelm's quantizer, not --via llama.cpp")
        path = export_gguf_via_llama_cpp(Path(args.checkpoint), out, args.quant)
    else:
        hessians = None
        if args.calibration:
            from edgelm.quant.calibration import activation_covariance, read_calibration_text

            text = read_calibration_text(Path(args.calibration))
            hessians = activation_covariance(Path(args.checkpoint), text)
        path = export_gguf(Path(args.checkpoint), out, args.quant, hessians)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _export_onnx(args: argparse.Namespace) -> None:
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
        hessians = None
        if args.calibration:
            from edgelm.quant.calibration import activation_covariance, read_calibration_text

            text = read_calibration_text(Path(args.calibration))
            hessians = activation_covariance(Path(args.checkpoint), text)
        folder = export_onnx(Path(args.checkpoint), out, args.quant, options, hessians)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.1f} MB)")


def _info(args: argparse.Namespace) -> None:
    from edgelm.files import human_size
    from edgelm.formats.artifact import artifact_kind
    from edgelm.info import describe_checkpoint, describe_gguf, describe_onnx, load_rows

    describe = {"checkpoint": describe_checkpoint, "gguf": describe_gguf, "onnx": describe_onnx}
    summary = describe[artifact_kind(Path(args.model))](Path(args.model))
    if args.load:
        from edgelm.info import measure_load

        summary["load"] = measure_load(Path(args.model), args.runtime, args.device)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=summary["path"], show_header=False)
    for key, value in summary.items():
        if key in ("path", "export_sizes", "load"):
            continue
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.2f} M)"
        elif key == "file_size" and value is not None:
            value = human_size(value)
        table.add_row(key.replace("_", " "), str(value))
    for export, size in summary.get("export_sizes", {}).items():
        table.add_row(f"{export} export", f"≈ {human_size(size)}")
    if "load" in summary:
        for key, value in load_rows(summary["load"]):
            table.add_row(key, value)
    Console().print(table)


def _serve(args: argparse.Namespace) -> None:
    from edgelm.serve import serve

    serve(Path(args.model), host=args.host, port=args.port, runtime=args.runtime, device=args.device)


def _compare(args: argparse.Namespace) -> None:
    from edgelm.evaluation.compare import compare
    from edgelm.evaluation.report import print_table

    targets = [t for t in args.targets.split(",") if t.strip()] if args.targets else None
    result = compare(
        Path(args.checkpoint),
        Path(args.out) if args.out else None,
        targets,
        Path(args.text) if args.text else None,
        ctx=args.ctx,
        windows=args.windows,
        repetitions=args.repetitions,
        device=args.device,
        threads=args.threads,
        cache_dir=args.cache_dir,
    )
    print_table(result.results)
    failed = sum(r.error is not None for r in result.results)
    print(
        f"{len(result.results) - failed} of {len(result.results)} targets checked; "
        f"report: {result.report_md} (and report.json{', charts' if result.charts else ''} beside it)"
    )


def _check(args: argparse.Namespace) -> None:
    from edgelm.evaluation.check import check
    from edgelm.evaluation.compare import ProgressDisplay
    from edgelm.evaluation.report import check_rows

    with ProgressDisplay(True, ["check"]) as display:
        result = check(
            Path(args.artifact),
            Path(args.reference),
            Path(args.text) if args.text else None,
            ctx=args.ctx,
            windows=args.windows,
            repetitions=args.repetitions,
            runtime=args.runtime,
            device=args.device,
            threads=args.threads,
            cache_dir=args.cache_dir,
            max_kld=args.max_kld,
            min_top1=args.min_top1,
            max_ppl_ratio=args.max_ppl_ratio,
            progress=display.callback("check"),
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(f"{args.artifact} against {args.reference}"), show_header=False)
        for key, value in check_rows(result):
            table.add_row(key, Text(value))
        Console().print(table)
    if not result.passed:
        for line in result.failures():
            print(f"edgelm: check failed: {line}", file=sys.stderr)
        raise SystemExit(1)


def _version() -> str:
    from edgelm._version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; an EdgelmError becomes one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EdgelmError as e:
        print(f"edgelm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a disk that is full, a folder that is not writable, ...
        print(f"edgelm: error: {e.filename or ''}: {e.strerror or e}".replace(": : ", ": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgelm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
