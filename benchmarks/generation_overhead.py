"""What edgelm's generation loop costs above the engine it drives, and how fast a model starts.

    python benchmarks/generation_overhead.py [--presets tiny,small] [--tokens 128] [--threads 2]
    python benchmarks/generation_overhead.py --presets /tmp/edgelm-bench/llama135m-30L/checkpoint

For each preset (random weights: speed does not depend on them), or checkpoint folder (such as the model of
SmolLM-135M's shape that benchmarks/onnx_speed.py writes), it exports an int4 ONNX folder and a Q4_0
GGUF file, then runs decode steps two ways, interleaved over rounds, and times each step's engine call
inside those same steps (ONNX Runtime's run_with_iobinding; llama.cpp's llama_decode), so that the
engine's own run-to-run noise, larger than the loop's cost, cancels:
  runtime  edgelm's Runtime.forward([token]) (id checks, binding, logits copy)
  generate edgelm's Model.stream per new token (sampling, incremental decoding, stop checks)
and prints, per token (median over rounds), the engine's time and each way's time outside it as a share of
the engine's (target for generate: <= 5 %).
Then the time from nothing to the first generated token: `edgelm.load` + generate(1 token) against
llama-cpp-python's `Llama(...)` + create_completion(max_tokens=1), for the same GGUF file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import edgelm
from edgelm.export.gguf import export_gguf
from edgelm.export.onnx import export_onnx
from edgelm.model.config import preset
from edgelm.runtimes import llamacpp
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


def timed(call: Callable[..., Any], inside: list[float]) -> Callable[..., Any]:
    """`call`, adding the seconds each call takes to inside[0]."""

    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            inside[0] += time.perf_counter() - start

    return wrapper


class TimedSession:
    """An ONNX Runtime session whose run_with_iobinding adds its seconds to inside[0]."""

    def __init__(self, session: Any, inside: list[float]) -> None:
        self.run_with_iobinding = timed(session.run_with_iobinding, inside)


@contextlib.contextmanager
def engine_time(model: edgelm.Model) -> Iterator[list[float]]:
    """[seconds spent in the engine's own call] while the block runs."""
    inside = [0.0]
    runtime = model.runtime
    if isinstance(runtime, OnnxRuntime):
        session = runtime.session
        runtime.session = TimedSession(session, inside)
        try:
            yield inside
        finally:
            runtime.session = session
    else:
        decode = llamacpp.llama_cpp.llama_decode
        llamacpp.llama_cpp.llama_decode = timed(decode, inside)
        try:
            yield inside
        finally:
            llamacpp.llama_cpp.llama_decode = decode


def runtime_steps(model: edgelm.Model, tokens: int) -> tuple[float, float]:
    """(engine, outside) seconds per Runtime.forward of one token, over `tokens` of them."""
    runtime = model.runtime
    runtime.reset()
    runtime.forward(model.tokenizer.encode(PROMPT, add_bos=True))
    with engine_time(model) as inside:
        start = time.perf_counter()
        for _ in range(tokens):
            runtime.forward([5])
        wall = time.perf_counter() - start
    return inside[0] / tokens, (wall - inside[0]) / tokens


def generate_steps(model: edgelm.Model, tokens: int) -> tuple[float, float]:
    """(engine, outside) seconds per new token of a greedy generation of `tokens` + 1 (EOS ignored),
    counted from the first token on (the prompt's prefill left out)."""
    model.runtime.reset()
    stream = model.stream(PROMPT, max_new_tokens=tokens + 1, temperature=0)
    with stream, engine_time(model) as inside:
        next(stream, "")
        inside[0] = 0.0
        start = time.perf_counter()
        "".join(stream)
        wall = time.perf_counter() - start
    steps = max(stream.completion_tokens - 1, 1)
    return inside[0] / steps, (wall - inside[0]) / steps


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
    header = ("preset", "artifact", "engine ms", "runtime +ms", "generate +ms", "loop cost")
    print("{:24} {:10} {:>9} {:>11} {:>12} {:>9}".format(*header))
    for name in args.presets.split(","):
        checkpoint = Path(name) if Path(name).is_dir() else preset_checkpoint(name, cache)
        name = "-".join(checkpoint.parts[-2:]) if Path(name).is_dir() else name
        onnx = export_onnx(checkpoint, cache / f"{name}-onnx-int4", "int4")
        gguf = export_gguf(checkpoint, cache, "q4_0")
        for kind, path in (("onnx int4", onnx), ("gguf q4_0", gguf)):
            engine, runtime, generate = [], [], []
            with edgelm.load(path, threads=args.threads) as model:
                for _ in range(args.rounds):
                    runtime.append(runtime_steps(model, args.tokens)[1])
                    inside, outside = generate_steps(model, args.tokens)
                    engine.append(inside)
                    generate.append(outside)
            ms = [statistics.median(column) * 1e3 for column in (engine, runtime, generate)]
            share = statistics.median(o / e for o, e in zip(generate, engine, strict=True))
            print(f"{name:24} {kind:10} {ms[0]:9.3f} {ms[1]:11.3f} {ms[2]:12.3f} {share:9.1%}")
        ours, theirs = time_to_first_token(gguf, args.threads)
        print(
            f"{name:24} load + first token: edgelm {ours:.3f} s, llama-cpp-python {theirs:.3f} s "
            f"(ratio {ours / theirs:.2f})"
        )


if __name__ == "__main__":
    main()
