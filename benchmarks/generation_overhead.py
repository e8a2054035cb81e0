"""What edgelm's generation loop costs above the engine it drives, and how fast a model starts.

    python benchmarks/generation_overhead.py [--presets tiny,small] [--tokens 128] [--threads 2]
    python benchmarks/generation_overhead.py --presets /tmp/edgelm-bench/llama135m-30L/checkpoint

For each preset (random weights: speed does not depend on them), or checkpoint folder (such as the model of
SmolLM-135M's shape that benchmarks/onnx_speed.py writes), it exports an int4 ONNX folder and a Q4_0
GGUF file, then times one decode step three ways, interleaved over rounds (median per token):
  engine   the bare engine call: ONNX Runtime's run_with_iobinding on edgelm's bound buffers; llama.cpp's
           llama_decode of one token (through llama-cpp-python's `Llama.eval`, its thinnest public call)
  runtime  edgelm's Runtime.forward([token]) (id checks, binding, logits copy)
  generate edgelm's Model.generate per new token (sampling, incremental decoding, stop checks)
and prints generate's overhead above the engine as a share of the decode step (target: <= 5 %).
Then the time from nothing to the first generated token: `edgelm.load` + generate(1 token) against
llama-cpp-python's `Llama(...)` + create_completion(max_tokens=1), for the same GGUF file.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import edgelm
from edgelm.export.gguf import export_gguf
from edgelm.export.onnx import export_onnx
from edgelm.model.config import preset
from edgelm.runtimes.onnxruntime import OnnxRuntime
from edgelm.tokenizer import train_tokenizer
from edgelm.training.random_checkpoint import random_checkpoint

PROMPT = "def read_config(path):\n    "


def preset_checkpoint(name: str, directory: Path) -> Path:
    """The preset with random weights and a tokenizer of its vocabulary size, trained on the stdlib."""
    import sysconfig

    folder = directory / name
    if (folder / "config.json").is_file():
        return folder
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80]]
    config = preset(name)
    tokenizer = train_tokenizer(text, vocab_size=config.vocab_size)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    return random_checkpoint(folder, config, tokenizer, std=0.02, vector_range=(1.0, 1.0))


def per_token(step: Callable[[], object], tokens: int) -> float:
    """Seconds per call of `step`, over `tokens` calls."""
    start = time.perf_counter()
    for _ in range(tokens):
        step()
    return (time.perf_counter() - start) / tokens


def onnx_engine(model: edgelm.Model, tokens: int) -> float:
    """ONNX Runtime's own call on the runtime's bound inputs and outputs, one new position at a time."""
    runtime = model.runtime
    assert isinstance(runtime, OnnxRuntime)  # its bound buffers are this class's own, not the protocol's
    runtime.reset()
    runtime.forward(model.tokenizer.encode(PROMPT, add_bos=True))
    binding, session = runtime._binding, runtime.session
    binding.bind_cpu_input("input_ids", np.array([[5]], np.int64))
    binding.bind_ortvalue_output("logits", runtime._decode_logits)
    position = runtime.position

    def step() -> None:
        nonlocal position
        position += 1
        binding.bind_cpu_input("attention_mask", runtime._mask[:, :position])
        session.run_with_iobinding(binding)

    return per_token(step, tokens)


def llama_engine(path: Path, threads: int, tokens: int) -> float:
    """llama.cpp's decode of one token at a time through llama-cpp-python's `Llama.eval`."""
    import llama_cpp

    llama = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, verbose=False)
    llama.eval(llama.tokenize(PROMPT.encode()))
    seconds = per_token(lambda: llama.eval([5]), tokens)
    llama.close()
    return seconds


def runtime_step(model: edgelm.Model, tokens: int) -> float:
    runtime = model.runtime
    runtime.reset()
    runtime.forward(model.tokenizer.encode(PROMPT, add_bos=True))
    return per_token(lambda: runtime.forward([5]), tokens)


def generate_step(model: edgelm.Model, tokens: int) -> float:
    """Seconds per new token of a greedy generation that runs to `tokens` (EOS disabled by ignoring it);
    both generations prefill the whole prompt (the runtime reset: no prefix reuse)."""
    model.runtime.reset()
    prefill = time.perf_counter()
    model.generate(PROMPT, max_new_tokens=1, temperature=0)
    prefill = time.perf_counter() - prefill
    model.runtime.reset()
    start = time.perf_counter()
    stream = model.stream(PROMPT, max_new_tokens=tokens + 1, temperature=0)
    with stream:
        "".join(stream)
    produced = stream.completion_tokens
    return (time.perf_counter() - start - prefill) / max(produced - 1, 1)


def time_to_first_token(path: Path, threads: int) -> tuple[float, float]:
    """(edgelm, llama-cpp-python) seconds from nothing to the first generated token of the GGUF file."""
    import llama_cpp

    start = time.perf_counter()
    with edgelm.load(path, threads=threads) as model:
        model.generate(PROMPT, max_new_tokens=1, temperature=0)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    llama = llama_cpp.Llama(str(path), n_threads=threads, verbose=False)
    llama.create_completion(PROMPT, max_tokens=1, temperature=0)
    theirs = time.perf_counter() - start
    llama.close()
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small", help="preset names or checkpoint folders")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "edgelm-bench-overhead"))
    args = parser.parse_args()
    cache = Path(args.cache)
    header = ("preset", "artifact", "engine ms", "runtime ms", "generate ms", "overhead")
    print("{:24} {:10} {:>9} {:>10} {:>11} {:>8}".format(*header))
    for name in args.presets.split(","):
        checkpoint = Path(name) if Path(name).is_dir() else preset_checkpoint(name, cache)
        name = "-".join(checkpoint.parts[-2:]) if Path(name).is_dir() else name
        onnx = export_onnx(checkpoint, cache / f"{name}-onnx-int4", "int4")
        gguf = export_gguf(checkpoint, cache, "q4_0")
        for kind, path in (("onnx int4", onnx), ("gguf q4_0", gguf)):
            rows: dict[str, list[float]] = {"engine": [], "runtime": [], "generate": []}
            with edgelm.load(path, threads=args.threads) as model:
                for _ in range(args.rounds):
                    if kind.startswith("onnx"):
                        rows["engine"].append(onnx_engine(model, args.tokens))
                    rows["runtime"].append(runtime_step(model, args.tokens))
                    rows["generate"].append(generate_step(model, args.tokens))
            if kind.startswith("gguf"):
                rows["engine"] = [llama_engine(path, args.threads, args.tokens) for _ in range(args.rounds)]
            engine, runtime, generate = (statistics.median(rows[k]) * 1e3 for k in rows)
            overhead = (generate - engine) / engine
            print(f"{name:24} {kind:10} {engine:9.3f} {runtime:10.3f} {generate:11.3f} {overhead:8.1%}")
        ours, theirs = time_to_first_token(gguf, args.threads)
        print(
            f"{name:24} load + first token: edgelm {ours:.3f} s, llama-cpp-python {theirs:.3f} s "
            f"(ratio {ours / theirs:.2f})"
        )


if __name__ == "__main__":
    main()
