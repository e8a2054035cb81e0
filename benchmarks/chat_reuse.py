"""Chat that answers at once: time to first token across a conversation's turns with and without prefix
reuse, the server's slots, and what JSON mode costs per token.

    python benchmarks/chat_reuse.py [--turns 8] [--turn-tokens 200] [--parts reuse,slots,json]
                                    [--threads 2] [--cache /tmp/edgelm-bench]

The model has SmolLM-135M's shape with random weights (benchmarks/onnx_speed.py's checkpoint) and a
ChatML template; its exports are a GGUF Q4_K_M file and an ONNX int4 folder. Speed does not depend on the
weights. The conversation: user turns of --turn-tokens tokens of standard-library source, 12-token greedy
answers.

    reuse   time to first token of each turn in every runtime, with reuse (a `Model` as an app keeps it)
            and without (the runtime reset before each turn, as edgelm did before), beside
            llama-cpp-python's own `Llama.create_chat_completion(stream=True)` on the same GGUF file
            (which keeps its last prompt's tokens too)
    slots   `edgelm serve GGUF --slots 4` against `--slots 1`: 4 clients each holding a conversation of
            4 turns at once; mean time to first token and the time until the last answer
    json    decode tokens/s of `Model.generate` with a JSON schema ({"type": "object"} with one free
            string) and without, interleaved, and the engine's mask per token (llguidance)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import edgelm
from edgelm.generation.api import Model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER_TOKENS = 12
REPORTED_TURNS = (2, 4, 8)
JSON_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def chat_checkpoint(cache: Path) -> Path:
    """The 135M-shaped checkpoint beside a ChatML template: links to its files, the template added."""
    sys.path.insert(0, str(Path(__file__).parent))
    from onnx_speed import bench_checkpoint

    source = bench_checkpoint(cache, "135m", None)
    folder = source.parent / "chat"
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(exist_ok=True)
        for file in source.iterdir():
            if file.name != "tokenizer_config.json" and not (folder / file.name).exists():
                (folder / file.name).symlink_to(file)
        settings = json.loads((source / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHATML}))
    return folder


def artifacts(cache: Path) -> dict[str, Path]:
    """The checkpoint (torch), its ONNX int4 folder and its GGUF Q4_K_M file, exported once."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    checkpoint = chat_checkpoint(cache)
    gguf, onnx = checkpoint.parent / "chat-q4_k_m.gguf", checkpoint.parent / "chat-onnx-int4"
    if not gguf.is_file():
        export_gguf(checkpoint, gguf, "q4_k_m")
    if not onnx.is_dir():
        export_onnx(checkpoint, onnx, "int4")
    return {"torch": checkpoint, "onnx": onnx, "gguf": gguf}


def user_turns(model: Model, count: int, tokens: int, seed: int = 0) -> list[str]:
    """`count` user messages of about `tokens` tokens each, cut from the standard library's source."""
    from edgelm.training.data import builtin_corpus, read_documents

    texts = [d.text for d in read_documents(builtin_corpus(), skip_undecodable=True) if len(d.text) > 4000]
    turns = []
    for i in range(count):
        ids = model.tokenize(texts[(seed * count + i) % len(texts)])[:tokens]
        turns.append(model.detokenize(ids))
    return turns


def first_token_seconds(pieces: Iterator[Any]) -> float:
    """Seconds until `pieces` gives its first item; the rest is consumed."""
    started = time.perf_counter()
    next(pieces, None)
    seconds = time.perf_counter() - started
    for _ in pieces:
        pass
    return seconds


def edgelm_turns(model: Model, turns: list[str], reuse: bool) -> list[float]:
    """Time to first token of each turn of the conversation (from an empty cache), the runtime reset before
    each turn when not `reuse`."""
    model.runtime.reset()
    messages: list[dict[str, str]] = []
    seconds = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        if not reuse:
            model.runtime.reset()
        with model.chat_stream(messages, ANSWER_TOKENS, temperature=0) as stream:
            pieces: list[str] = []
            seconds.append(first_token_seconds(_recording(stream, pieces)))
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return seconds


def _recording(stream: Iterator[str], pieces: list[str]) -> Iterator[str]:
    for piece in stream:
        pieces.append(piece)
        yield piece


def llama_cpp_turns(gguf: Path, turns: list[str], threads: int) -> list[float]:
    """The same conversation in llama-cpp-python's own chat completion (its template from the file)."""
    import llama_cpp

    llama = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    messages: list[dict[str, str]] = []
    seconds = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        chunks: Any = llama.create_chat_completion(
            messages,  # type: ignore[arg-type]
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            stream=True,
        )
        pieces: list[str] = []
        content = (c["choices"][0]["delta"].get("content") for c in chunks)
        seconds.append(first_token_seconds(_recording((c for c in content if c), pieces)))
        messages.append({"role": "assistant", "content": "".join(pieces)})
    llama.close()
    return seconds


def reuse_table(paths: dict[str, Path], turns: int, turn_tokens: int, threads: int) -> None:
    print(f"\ntime to first token, s (turns of {turn_tokens} tokens; {ANSWER_TOKENS}-token answers)")
    shown = [t for t in REPORTED_TURNS if t <= turns]
    print(f"| runtime | reuse | {' | '.join(f'turn {t}' for t in shown)} | turn {shown[-1]} / turn 2 |")
    print(f"| --- | --- | {' | '.join('---' for _ in shown)} | --- |")
    rows: list[tuple[str, str, list[float]]] = []
    for kind, path in paths.items():
        with edgelm.load(path, device="cpu", threads=threads) as model:
            conversation = user_turns(model, turns, turn_tokens)
            edgelm_turns(model, conversation[:2], reuse=True)  # warm-up
            for reuse in (True, False):
                rows.append(
                    (f"edgelm {kind}", "yes" if reuse else "no", edgelm_turns(model, conversation, reuse))
                )
    rows.append(("llama-cpp-python", "its own", llama_cpp_turns(paths["gguf"], conversation, threads)))
    for name, reused, seconds in rows:
        figures = " | ".join(f"{seconds[t - 1]:.3f}" for t in shown)
        print(f"| {name} | {reused} | {figures} | {seconds[shown[-1] - 1] / seconds[1]:.2f} |")


def slots_table(gguf: Path, turn_tokens: int, threads: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import server

    clients, turns = 4, 4
    with edgelm.load(gguf, device="cpu") as model:
        conversations = [user_turns(model, turns, turn_tokens, seed=c + 1) for c in range(clients)]
    print(f"\nserver: {clients} clients, each a conversation of {turns} turns, at once")
    print("| slots | mean time to first token, s | slowest, s | all answered, s |")
    print("| --- | --- | --- | --- |")
    for slots in (1, clients):
        with server(gguf, ["--slots", str(slots), "--threads", str(threads)]) as (base, _):
            ttfts: list[float] = []
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                for seconds in pool.map(lambda turns: _client(base, turns), conversations):
                    ttfts += seconds
            wall = time.perf_counter() - started
        print(f"| {slots} | {statistics.mean(ttfts):.3f} | {max(ttfts):.3f} | {wall:.1f} |")


def _client(base: str, turns: list[str]) -> list[float]:
    """One client's conversation through /v1/chat/completions, streamed: its times to first content."""
    messages: list[dict[str, str]] = []
    seconds = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        body = {"messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0, "stream": True}
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        first, pieces = None, []
        with urllib.request.urlopen(request, timeout=600) as answer:
            for line in answer:
                if not line.startswith(b"data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    first = first or time.perf_counter() - started
                    pieces.append(delta["content"])
        seconds.append(first if first is not None else time.perf_counter() - started)
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return seconds


def json_table(paths: dict[str, Path], threads: int, tokens: int = 128, rounds: int = 3) -> None:
    from edgelm.generation.constraint import JsonConstraint
    from edgelm.generation.generate import stop_token_ids

    print(f"\nJSON mode: decode tokens/s over {tokens} tokens (median of {rounds}, interleaved)")
    print("| runtime | free text | JSON schema | ratio | mask per token, µs |")
    print("| --- | --- | --- | --- | --- |")
    for kind in ("gguf", "onnx"):
        with edgelm.load(paths[kind], device="cpu", threads=threads) as model:
            rates: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):
                for constrained in (False, True):
                    rates[constrained].append(_decode_rate(model, tokens, constrained))
            free, schema = statistics.median(rates[False]), statistics.median(rates[True])
            constraint = JsonConstraint(model.tokenizer, JSON_SCHEMA, stop_token_ids(model.runtime))
            mask = _mask_seconds(constraint, model.config.vocab_size, model.tokenize('{"text":"'))
        print(f"| {kind} | {free:.1f} | {schema:.1f} | {schema / free:.2f} | {mask * 1e6:.0f} |")


def _decode_rate(model: Model, tokens: int, constrained: bool) -> float:
    """Tokens/s of one generation after its first piece (the prefill and first token)."""
    stream = model.stream(
        "x", tokens, temperature=0.8, seed=0, json_schema=JSON_SCHEMA if constrained else None
    )
    next(stream, None)
    started, first = time.perf_counter(), stream.completion_tokens
    for _ in stream:
        pass
    return (stream.completion_tokens - first) / (time.perf_counter() - started)


def _mask_seconds(constraint: Any, vocab: int, prefix: list[int], steps: int = 200) -> float:
    """The engine's mask inside the free string, per call."""
    import numpy as np

    for token in prefix:
        constraint.accept(token)
    logits = np.zeros(vocab, np.float32)
    started = time.perf_counter()
    for _ in range(steps):
        constraint.mask(logits)
    return (time.perf_counter() - started) / steps


PARTS: dict[str, Callable[[argparse.Namespace, dict[str, Path]], None]] = {
    "reuse": lambda a, p: reuse_table(p, a.turns, a.turn_tokens, a.threads),
    "slots": lambda a, p: slots_table(p["gguf"], a.turn_tokens, a.threads),
    "json": lambda a, p: json_table(p, a.threads),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=200)
    parser.add_argument("--parts", default=",".join(PARTS), help=", ".join(PARTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgelm-bench")
    args = parser.parse_args()
    paths = artifacts(args.cache)
    for part in args.parts.split(","):
        PARTS[part](args, paths)


if __name__ == "__main__":
    main()
