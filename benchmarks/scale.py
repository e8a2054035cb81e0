"""Real model sizes on this machine: wall time and peak memory of import, export and calibration, each step
a fresh `edgelm` process, with llama.cpp's own quantizer on the same weights as the anchor.

    python benchmarks/scale.py [--shape smollm2-135m|smollm2-1.7b|llama3.1-8b] [--threads N] [--cache DIR]
                               [--calibration-tokens N] [--steps STEP,...] [--keep]

The source is a Hugging Face folder of random bf16 weights of the shape (SmolLM2-135M: 30 layers, hidden
576, MLP 1536, 9/3 heads; SmolLM2-1.7B: 24 layers, hidden
2048, MLP 8192, 32 heads, vocabulary 49152, tied; Llama-3.1-8B: 32 layers, hidden 4096, MLP 14336, 32/8
heads, vocabulary 128256, untied), written once under --cache (the system's temporary folder by default),
tensor by tensor. The steps:

    import          edgelm import SOURCE                     (bf16 kept: disk against the source)
    gguf bf16       edgelm export gguf --quant bf16          (llama.cpp's quantizer reads this file)
    gguf TYPE       edgelm export gguf --quant TYPE          for q8_0, q4_0, q4_k_m; beside it llama.cpp's
                    llama_model_quantize on the BF16 file, same type and threads: the ratio is ours/theirs
    gguf q4_k_m+cal edgelm export gguf --quant q4_k_m --calibration (--calibration-tokens of stdlib text)
    onnx int4       edgelm export onnx --quant int4
    gguf f32        edgelm export gguf --quant f32           (not by default: 4x the source on disk)

The exports read the source folder, which is in the layout of an edgelm checkpoint and holds the bits the
import writes. What a step writes is removed once measured (but the BF16 file, until the last step that
needs it), so that an 8 B model's steps fit on a disk with 70 GB free; --keep keeps everything.

Peak memory is the process's own high-water mark of resident memory (Linux's VmHWM, read while it runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgelm.model.config import ModelConfig
    from edgelm.tokenizer import Tokenizer

SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=130000.0,
        tie_word_embeddings=True,
    ),
    "llama3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}
QUANTS = ("q8_0", "q4_0", "q4_k_m")
STEPS = ("import", "gguf-bf16", *(f"gguf-{q}" for q in QUANTS), "gguf-q4_k_m-cal", "onnx-int4", "gguf-f32")
DEFAULT_STEPS = STEPS[:-1]
ANCHORED = tuple(f"gguf-{q}" for q in QUANTS)  # the steps llama.cpp's quantizer also runs, on the BF16 file


@dataclass(frozen=True)
class Measured:
    """One step: wall seconds, peak resident memory in bytes, size of what it wrote in bytes."""

    wall: float
    peak: int
    size: int


def source_folder(cache: Path, shape: str) -> Path:
    """A Hugging Face folder of random bf16 weights of the shape (written once, one tensor at a time)."""
    from edgelm.checkpoint import tensor_shapes, write_generation_config, write_weights
    from edgelm.model.config import ModelConfig

    folder = cache / shape / "source"
    if (folder / "config.json").is_file():
        return folder
    config = ModelConfig(**SHAPES[shape])  # type: ignore[arg-type]
    print(f"writing {folder} ({config.num_parameters / 1e9:.2f} B parameters, bf16) ...", flush=True)
    tokenizer = bench_tokenizer(cache, config)
    shapes = tensor_shapes(config)
    rng = np.random.default_rng(0)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name, tensor_shape in shapes.items():
            if len(tensor_shape) == 1:
                yield name, np.ones(tensor_shape, np.float32)
            else:
                yield name, rng.standard_normal(tensor_shape, np.float32) * np.float32(0.02)

    write_weights(folder, config, shapes, tensors(), dtypes=dict.fromkeys(shapes, "BF16"))
    tokenizer.save(folder, context_length=config.max_position_embeddings)
    config.save(folder, "bfloat16")
    write_generation_config(folder, config)
    return folder


def bench_tokenizer(cache: Path, config: ModelConfig) -> Tokenizer:
    """A byte-level BPE of the model's vocabulary size trained on the built-in corpus (once)."""
    from edgelm.tokenizer import Tokenizer, train_tokenizer
    from edgelm.training.data import builtin_corpus, read_documents

    folder = cache / f"tokenizer-{config.vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        print(
            f"training a {config.vocab_size}-token BPE tokenizer on the built-in corpus (once) ...",
            flush=True,
        )
        texts = [d.text for d in read_documents(builtin_corpus(), skip_undecodable=True)]
        folder.mkdir(parents=True, exist_ok=True)
        train_tokenizer(texts, config.vocab_size).save(folder, context_length=config.max_position_embeddings)
    return Tokenizer.load(folder)


def run(command: list[str], output: Path) -> Measured:
    """Run a command in its own process; its wall time, peak RSS and the size of `output` (file or folder)."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        peak = max(peak, high_water_mark(process.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    files = [output] if output.is_file() else [p for p in output.rglob("*") if p.is_file()]
    return Measured(wall, peak, sum(p.stat().st_size for p in files))


def high_water_mark(pid: int) -> int:
    """A running process's peak resident memory in bytes so far (Linux's VmHWM; 0 once it has ended). A
    child's ru_maxrss would not do: it starts from the forking parent's resident set."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def edgelm(*args: str) -> list[str]:
    """The command line of an edgelm subcommand in this python."""
    return [sys.executable, "-m", "edgelm", *args]


def llama_cpp_quantize(f32: Path, out: Path, quant: str, threads: int) -> list[str]:
    """The command that runs llama.cpp's own quantizer on the F32 file (the type's llama.cpp file type)."""
    script = (
        "import sys, llama_cpp\n"
        "from edgelm.export.gguf_types import MIXTURES\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = int(MIXTURES[{quant!r}].file_type); p.nthread = {threads}\n"
        f"sys.exit(llama_cpp.llama_model_quantize({str(f32)!r}.encode(), {str(out)!r}.encode(), p))\n"
    )
    return [sys.executable, "-c", script]


def calibration_text(tokens: int) -> Path:
    """About `tokens` tokens of the standard library's source (roughly 3.5 characters a token), in a file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("argparse.py", "typing.py", "inspect.py"))
    path = Path(tempfile.gettempdir()) / f"edgelm-calibration-{tokens}.txt"
    path.write_text(text[: int(tokens * 3.5)])
    return path


def measure(args: argparse.Namespace) -> dict[str, tuple[Measured, Measured | None]]:
    """Each chosen step in turn; (ours, llama.cpp's) per step."""
    source = source_folder(args.cache, args.shape)
    work = args.cache / args.shape / "work"
    work.mkdir(exist_ok=True)
    threads = ["--threads", str(args.threads)]
    bf16 = work / "gguf-bf16.gguf"
    results: dict[str, tuple[Measured, Measured | None]] = {}
    for i, step in enumerate(args.steps):
        print(f"-- {step}", flush=True)
        if step == "import":
            out = work / "checkpoint"
            shutil.rmtree(out, ignore_errors=True)
            results[step] = run(edgelm("import", str(source), "--out", str(out)), out), None
            remove(out, args.keep)
            continue
        fmt, quant = step.split("-", 1)
        calibrated = quant.endswith("-cal")
        quant = quant.removesuffix("-cal")
        extra = ["--calibration", str(calibration_text(args.calibration_tokens))] if calibrated else []
        out = work / (f"{step}.gguf" if fmt == "gguf" else step)
        command = edgelm("export", fmt, str(source), "--quant", quant, "--out", str(out), *threads, *extra)
        ours = run(command, out)
        theirs = None
        if fmt == "gguf" and quant in QUANTS and not calibrated:
            anchor = work / f"llama.cpp-{quant}.gguf"
            theirs = run(llama_cpp_quantize(bf16, anchor, quant, args.threads), anchor)
            remove(anchor, args.keep)
        results[step] = ours, theirs
        if out != bf16 or not any(s in args.steps[i + 1 :] for s in ANCHORED):
            remove(out, args.keep)
    remove(bf16, args.keep)
    return results


ANCHORED = tuple(
    f"gguf-{q}" for q in QUANTS
)  # the steps that llama.cpp's quantizer also runs, on the BF16 file


def remove(path: Path, keep: bool) -> None:
    """Delete a step's output (a file or folder), unless asked to keep it."""
    if keep:
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def print_table(results: dict[str, tuple[Measured, Measured | None]], source_bytes: int) -> None:
    """step | wall | peak RSS | size | llama.cpp wall, RSS | time ratio."""
    print(f"\n{'step':<17} {'wall s':>8} {'peak RSS':>9} {'size':>9}   {'llama.cpp':>18} {'time ratio':>10}")
    for step, (ours, theirs) in results.items():
        anchor = f"{theirs.wall:7.1f} s {theirs.peak / 1e9:5.2f} GB" if theirs else ""
        ratio = f"{ours.wall / theirs.wall:9.2f}x" if theirs else ""
        size = f"{ours.size / 1e9:6.2f} GB"
        if step == "import":
            size += f" ({ours.size / source_bytes:.3f}x source)"
        print(f"{step:<17} {ours.wall:8.1f} {ours.peak / 1e9:6.2f} GB {size:>9}   {anchor:>18} {ratio:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-1.7b")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgelm-scale")
    parser.add_argument("--calibration-tokens", type=int, default=4000)
    parser.add_argument(
        "--steps", type=lambda s: s.split(","), default=list(DEFAULT_STEPS), help=", ".join(STEPS)
    )
    parser.add_argument("--keep", action="store_true", help="keep what each step writes")
    args = parser.parse_args()
    if unknown := [s for s in args.steps if s not in STEPS]:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if any(s in ANCHORED for s in args.steps) and "gguf-bf16" not in args.steps:
        args.steps.insert(args.steps.index(next(s for s in args.steps if s in ANCHORED)), "gguf-bf16")
    results = measure(args)
    source = args.cache / args.shape / "source"
    print_table(results, sum(p.stat().st_size for p in source.glob("model*.safetensors")))


if __name__ == "__main__":
    main()
