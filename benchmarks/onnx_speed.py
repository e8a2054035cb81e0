"""ONNX prefill and decode speed on CPU: edgelm's exporter and runtime against onnxruntime-genai, optimum and
PyTorch, on one Llama of a real model's shape, in one run.

    python benchmarks/onnx_speed.py [--shape 135m|1.7b] [--layers N] [--threads 2] [--repeats 3]
                                    [--cache /tmp/edgelm-bench] [--skip ROWS] [--profile]
                                    [--accuracy RUN [--windows 32] [--no-speed]]

The model has SmolLM-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads, vocabulary 49152,
tied embeddings) or, with --shape 1.7b, SmolLM2-1.7B's (24 layers, hidden 2048, MLP 8192, 32 heads and KV
heads), and random weights (std 0.02); speed does not depend on what the weights say. It is written once as
an edgelm checkpoint under --cache, and so is every export of it that a row not --skip'ped needs:

    edgelm fp32/int8/int4   edgelm.export.onnx.export_onnx            run by edgelm's OnnxRuntime.forward
    genai fp32/int8/int4    python -m onnxruntime_genai.models.builder  run by onnxruntime_genai.Generator
    optimum fp32            edgelm.export.optimum.export_via_optimum    run by ORTModelForCausalLM.generate,
                                                                        in the optimum python (a subprocess)
    torch fp32              the checkpoint                              run by edgelm's TorchRuntime.forward

Batch 1, --threads intra-op threads each. pp128 and pp512 time one prompt's forward pass (the prompt's logits
included); tg128 times 128 greedy decode steps after a one-token prompt (each step: one forward pass and the
choice of the next token). The configurations take turns within each round (one untimed warm-up round,
then --repeats timed ones), so that a drift in the machine's load affects them alike; the table shows the
median and, in brackets, the spread (max - min) of the rounds, and each ratio is against onnxruntime-genai at
the same precision (fp32 for optimum and torch), measured in the same rounds.

--profile then runs each edgelm and genai graph alone in a plain ONNX Runtime session with its profiler on,
and prints the kernel time per op type of a decode step: where the graphs differ, and how much of a step
is ONNX Runtime's kernels (the rest of a row's tg128 is its generation loop).

--accuracy RUN (an edgelm training run, which holds its validation tokens) exports RUN's checkpoint the same
ways, plus optimum int8/int4 (ONNX Runtime's own quantizers), and prints each ONNX model's perplexity on
held-out windows relative to the float32 PyTorch model's, llama.cpp's PPL(Q)/PPL(base); every graph runs in
edgelm's OnnxRuntime there, so that the number belongs to the graph and its weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # edgelm is imported where used: the optimum worker runs this file in another python
    from edgelm.model.config import ModelConfig
    from edgelm.runtimes.base import Runtime

PROMPTS = (128, 512)  # prefill lengths: pp128, pp512
DECODE = 128  # tg128
SEED = 0
PROFILE_PAST, PROFILE_STEPS = 128, 32  # --profile: decode steps after this many positions


# ------------------------------------------------------------------------------------------- the model


# hidden, MLP, layers, heads, KV heads of each --shape (head_dim 64, vocabulary 49152, tied embeddings)
SHAPES = {"135m": (576, 1536, 30, 9, 3), "1.7b": (2048, 8192, 24, 32, 32)}  # SmolLM-135M, SmolLM2-1.7B


def bench_config(shape: str, layers: int | None) -> ModelConfig:
    """SmolLM-135M's or SmolLM2-1.7B's shape, with `layers` layers (None: its own)."""
    from edgelm.model.config import ModelConfig

    hidden, mlp, own_layers, heads, kv_heads = SHAPES[shape]
    return ModelConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers or own_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def bench_root(cache: Path, shape: str, layers: int | None) -> Path:
    """Where the shape's checkpoint and exports are kept."""
    config = bench_config(shape, layers)
    name = "llama135m" if shape == "135m" else f"llama{shape}"
    return cache / f"{name}-{config.num_hidden_layers}L"


def bench_checkpoint(cache: Path, shape: str, layers: int | None) -> Path:
    """The random checkpoint of the shape under `cache` (written once), with a BPE tokenizer trained on
    the built-in corpus (the model's vocabulary stays 49152 whatever the tokenizer reaches)."""
    from edgelm.tokenizer import Tokenizer
    from edgelm.training.random_checkpoint import random_checkpoint

    directory = bench_root(cache, shape, layers) / "checkpoint"
    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer_dir = cache / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        from edgelm.tokenizer import train_tokenizer
        from edgelm.training.data import builtin_corpus, read_documents

        print("training a 49152-token BPE tokenizer on the built-in corpus (once) ...", flush=True)
        texts = [d.text for d in read_documents(builtin_corpus(), skip_undecodable=True)]
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        train_tokenizer(texts, 49152).save(tokenizer_dir, context_length=2048)
    config = bench_config(shape, layers)
    print(f"writing {directory} ({config.num_parameters / 1e6:.0f}M parameters) ...", flush=True)
    tokenizer = Tokenizer.load(tokenizer_dir)
    random_checkpoint(directory, config, tokenizer, SEED, std=0.02, vector_range=(1.0, 1.0))
    return directory


# ------------------------------------------------------------------------------------------ the exports


def built(folder: Path, build: Callable[[Path], object]) -> Path:
    """`folder` if a finished export is there, else build it into a temporary name and rename it."""
    from edgelm.formats.onnx import MODEL_FILE

    if (folder / MODEL_FILE).is_file():
        return folder
    print(f"building {folder.name} ...", flush=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.replace(folder)
    return folder


def build_genai(checkpoint: Path, out: Path, precision: str) -> None:
    """onnxruntime-genai's model builder for CPU; config.json is copied in so that edgelm can open it too."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "hf-cache")]
    result = subprocess.run(
        command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"the model builder failed:\n{result.stderr[-3000:]}")
    shutil.copyfile(checkpoint / "config.json", out / "config.json")


def exports(
    checkpoint: Path,
    root: Path,
    optimum_python: Path | None,
    optimum_quants: tuple[str, ...] = ("fp32",),
    skipped: frozenset[str] = frozenset(),
) -> dict[str, Path]:
    """Every ONNX folder of the benchmark but the `skipped` rows, by row name, built under `root` when
    missing."""
    from edgelm.export.onnx import export_onnx

    builders: dict[str, Callable[[Path], object]] = {}
    for quant in ("fp32", "int8", "int4"):
        builders[f"edgelm {quant}"] = partial(export_onnx, checkpoint, quant=quant)
    for quant in ("fp32", "int8", "int4"):
        builders[f"genai {quant}"] = partial(build_genai, checkpoint, precision=quant)
    if optimum_python is not None:
        from edgelm.export.optimum import export_via_optimum

        for quant in optimum_quants:
            builders[f"optimum {quant}"] = partial(export_via_optimum, checkpoint, quant=quant)
    return {
        name: built(root / name.replace(" ", "-"), build)
        for name, build in builders.items()
        if name not in skipped
    }


def find_optimum_python() -> tuple[Path | None, str]:
    """The optimum environment's python, or None and the reason."""
    from edgelm.errors import EdgelmError
    from edgelm.export.optimum import optimum_python, probe

    try:
        python = optimum_python()
        probe(python)
    except EdgelmError as e:
        return None, str(e)
    return python, ""


# ---------------------------------------------------------------------------------------------- runners


class Runner:
    """One configuration: `prefill` and `decode` return the seconds they took."""

    def prefill(self, ids: list[int]) -> float:
        raise NotImplementedError

    def decode(self, first: int, steps: int) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EdgelmRunner(Runner):
    """An edgelm Runtime (OnnxRuntime or TorchRuntime) through its `forward`."""

    def __init__(self, path: Path, runtime: str, threads: int) -> None:
        import edgelm

        self.model = edgelm.load(path, runtime=runtime, device="cpu", threads=threads)
        self.runtime = self.model.runtime

    def prefill(self, ids: list[int]) -> float:
        self.runtime.reset()
        start = time.perf_counter()
        self.runtime.forward(ids)
        return time.perf_counter() - start

    def decode(self, first: int, steps: int) -> float:
        rt = self.runtime
        rt.reset()
        token = int(rt.forward([first])[-1].argmax())
        start = time.perf_counter()
        for _ in range(steps):
            token = int(rt.forward([token])[-1].argmax())
        return time.perf_counter() - start

    def close(self) -> None:
        self.model.close()


class GenaiRunner(Runner):
    """onnxruntime-genai's Generator, greedy, with --threads intra-op threads (set in genai_config.json)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime_genai as og

        config_path = path / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"]["session_options"]
        if (options.get("intra_op_num_threads"), options.get("inter_op_num_threads")) != (threads, 1):
            options |= {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config_path.write_text(json.dumps(config, indent=4))
        self.og = og
        self.model = og.Model(str(path))

    def _generator(self, length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> float:
        generator = self._generator(len(ids) + 1)
        start = time.perf_counter()
        generator.append_tokens(np.array([ids], np.int32))
        return time.perf_counter() - start

    def decode(self, first: int, steps: int) -> float:
        generator = self._generator(steps + 3)
        generator.append_tokens(np.array([[first]], np.int32))
        generator.generate_next_token()  # picks from the prompt's logits; each later call runs one step
        start = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        return time.perf_counter() - start

    def close(self) -> None:
        del self.model


class OptimumRunner(Runner):
    """ORTModelForCausalLM in the optimum python: this script run with --optimum-worker, one JSON line per
    request and per answer."""

    def __init__(self, python: Path, path: Path, threads: int) -> None:
        command = [str(python), __file__, "--optimum-worker", str(path), "--threads", str(threads)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
        self._ask({"op": "ready"})

    def _ask(self, request: dict) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the optimum worker died (exit {self.process.wait()}); see its stderr above")
        return json.loads(line)["seconds"]

    def prefill(self, ids: list[int]) -> float:
        return self._ask({"op": "prefill", "ids": ids})

    def decode(self, first: int, steps: int) -> float:
        return self._ask({"op": "decode", "first": first, "steps": steps})

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def optimum_worker(path: Path, threads: int) -> None:
    """Answer OptimumRunner's requests with ORTModelForCausalLM (runs in the optimum python, no edgelm)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM  # type: ignore[import-not-found]  # its own venv

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    torch.set_num_threads(threads)
    model = ORTModelForCausalLM.from_pretrained(
        path, provider="CPUExecutionProvider", session_options=options, use_cache=True
    )
    for line in sys.stdin:
        request = json.loads(line)
        seconds = 0.0
        if request["op"] == "prefill":
            ids = torch.tensor([request["ids"]])
            start = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            seconds = time.perf_counter() - start
        elif request["op"] == "decode":
            ids = torch.tensor([[request["first"]]])
            # generate() runs one forward pass per new token, the one-token prompt's included; a random
            # model may stop early at EOS, so the time is scaled to `steps` passes. (min_new_tokens would
            # add a logits processor that costs more than the forward pass on a 49152-token vocabulary.)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    pad_token_id=0,
                    do_sample=False,
                    max_new_tokens=request["steps"],
                )
            new_tokens = out.shape[1] - ids.shape[1]
            seconds = (time.perf_counter() - start) * request["steps"] / new_tokens
        print(json.dumps({"seconds": seconds}), flush=True)


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class Row:
    """One configuration of the table, with the genai row it is compared to."""

    name: str
    engine: str
    folder: Path
    make: Callable[[], Runner]
    baseline: str | None
    times: dict[str, list[float]] = field(default_factory=dict)  # "pp128" ... → tokens/s per round


def measure(rows: list[Row], repeats: int, vocab: int) -> None:
    """Prefill and decode tokens/s of every row, the rows taking turns within each round."""
    rng = np.random.default_rng(SEED)
    prompts = {n: rng.integers(2, vocab, n).tolist() for n in PROMPTS}
    runners = {}
    for row in rows:
        print(f"loading {row.name} ({row.engine}) ...", flush=True)
        runners[row.name] = row.make()
    try:
        for round_ in range(repeats + 1):
            print(f"round {round_}/{repeats}{' (warm-up)' if round_ == 0 else ''} ...", flush=True)
            for row in rows:
                runner = runners[row.name]
                results = {f"pp{n}": n / runner.prefill(ids) for n, ids in prompts.items()}
                results[f"tg{DECODE}"] = DECODE / runner.decode(prompts[PROMPTS[0]][0], DECODE)
                if round_:
                    for test, rate in results.items():
                        row.times.setdefault(test, []).append(rate)
    finally:
        for runner in runners.values():
            runner.close()


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.")) / 1e6


def print_table(rows: list[Row]) -> None:
    """Medians (spread) in tokens/s, and ratios to the row's onnxruntime-genai baseline."""
    tests = [f"pp{n}" for n in PROMPTS] + [f"tg{DECODE}"]
    by_name = {row.name: row for row in rows}
    header = f"{'model':<14} {'runtime':<24} {'size MB':>8}"
    header += "".join(f" {t + ' t/s':>17}" for t in tests) + "".join(f" {t + ' ×genai':>12}" for t in tests)
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row.name:<14} {row.engine:<24} {folder_mb(row.folder):8.1f}"
        for test in tests:
            rates = row.times[test]
            line += f" {statistics.median(rates):9.1f} ({max(rates) - min(rates):5.1f})"
        for test in tests:
            if row.baseline is None or row.baseline not in by_name:
                line += f" {'':>12}"
                continue
            base = statistics.median(by_name[row.baseline].times[test])
            line += f" {statistics.median(row.times[test]) / base:11.2f}x"
        print(line)


def decode_profile(folders: dict[str, Path], config: ModelConfig, threads: int, rounds: int) -> None:
    """ONNX Runtime's profiler on each folder's graph alone (a plain session, no generation loop): the
    kernel time of each op type in a decode step after PROFILE_PAST positions, median over rounds taken
    in turns, and the step's wall time; so that where edgelm's graph and genai's differ is seen per op."""
    import collections
    import json
    import tempfile

    import onnxruntime as ort

    per_op: dict[str, dict[str, list[float]]] = {name: collections.defaultdict(list) for name in folders}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(rounds):
            for name, folder in folders.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(work) / name.replace(" ", "-"))
                session = ort.InferenceSession(str(folder / "model.onnx"), options)
                feeds = decode_feeds(session, config, PROFILE_PAST)
                for _ in range(4):  # warm-up steps
                    session.run(None, feeds)
                start = time.perf_counter()
                for _ in range(PROFILE_STEPS):
                    session.run(None, feeds)
                per_op[name]["(wall)"].append((time.perf_counter() - start) / PROFILE_STEPS * 1e6)
                totals: collections.Counter[str] = collections.Counter()
                for event in json.loads(Path(session.end_profiling()).read_text()):
                    if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                        totals[event["args"]["op_name"]] += event["dur"]
                steps = PROFILE_STEPS + 4
                for op, micros in totals.items():
                    per_op[name][op].append(micros / steps)
                per_op[name]["(kernels)"].append(sum(totals.values()) / steps)
    ops = sorted(
        {op for ops in per_op.values() for op in ops},
        key=lambda op: -max(statistics.median(per_op[name].get(op, [0.0])) for name in folders),
    )
    print(f"\ndecode step after {PROFILE_PAST} positions, µs (median of {rounds}), ONNX Runtime's profiler")
    print(f"{'op type':<36}" + "".join(f" {name:>14}" for name in folders))
    for op in ops:
        cells = [statistics.median(per_op[name][op]) if op in per_op[name] else 0.0 for name in folders]
        print(f"{op:<36}" + "".join(f" {cell:14.0f}" for cell in cells))


def decode_feeds(session: Any, config: ModelConfig, past: int) -> dict[str, np.ndarray]:
    """Inputs of one decode step after `past` positions (zeros in the KV cache), by the graph's names."""
    feeds: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.array([[5]], np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, past + 1), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.array([[past]], np.int64)
        elif value.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in value.type else np.float32
            shape = (1, config.num_key_value_heads, past, config.head_dim)
            feeds[value.name] = np.zeros(shape, dtype)
        else:
            raise SystemExit(f"{value.name}: an input the profile does not know how to feed")
    return feeds


# ------------------------------------------------------------------------------------------- accuracy


def accuracy(run: Path, cache: Path, optimum_python: Path | None, windows: int) -> None:
    """Perplexity of every ONNX export of `run` on held-out windows, relative to the float32 torch model."""
    import edgelm
    from edgelm.training.data import load_tokens, validation_windows

    with edgelm.load(run, device="cpu") as reference:
        context = min(reference.config.max_position_embeddings, 512)
        held_out = validation_windows(load_tokens(run / "data").val, context, windows)
        base = perplexity(reference.runtime, held_out)
    root = cache / f"accuracy-{run.resolve().name}"
    folders = exports(run, root, optimum_python, ("fp32", "int8", "int4"))
    print(f"\n{run}: {held_out.size:,} held-out tokens in {len(held_out)} windows; torch fp32 PPL {base:.3f}")
    print(f"{'model':<14} {'PPL':>9} {'PPL(Q)/PPL(fp32)':>17}")
    for name, folder in folders.items():
        with edgelm.load(folder, runtime="onnxruntime", device="cpu") as model:
            value = perplexity(model.runtime, held_out)
        print(f"{name:<14} {value:9.3f} {value / base:17.4f}")


def perplexity(runtime: Runtime, windows: np.ndarray) -> float:
    """exp of the mean next-token negative log-likelihood over the windows."""
    nll, count = 0.0, 0
    for window in windows:
        runtime.reset()
        logits = runtime.forward(window[:-1].tolist(), all_logits=True).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= log_p[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return float(np.exp(nll / count))


# ------------------------------------------------------------------------------------------------- main


def speed(args: argparse.Namespace, optimum_python: Path | None) -> None:
    """The speed table on the benchmark model."""
    root = bench_root(args.cache, args.shape, args.layers)
    if args.rebuild:
        for path in root.glob("*"):
            if path.name != "checkpoint":
                shutil.rmtree(path)
    checkpoint = bench_checkpoint(args.cache, args.shape, args.layers)
    skipped = frozenset(name.strip() for name in args.skip.split(",") if name.strip())
    folders = exports(checkpoint, root, optimum_python, skipped=skipped)

    t = args.threads
    engines = {"edgelm": "edgelm OnnxRuntime", "genai": "onnxruntime-genai", "optimum": "ORTModelForCausalLM"}
    rows = []
    for name, folder in folders.items():
        kind, quant = name.split()
        runner: Callable[[], Runner]
        if kind == "edgelm":
            runner = partial(EdgelmRunner, folder, "onnxruntime", t)
        elif kind == "genai":
            runner = partial(GenaiRunner, folder, t)
        else:
            assert optimum_python is not None  # optimum rows exist only with an optimum python
            runner = partial(OptimumRunner, optimum_python, folder, t)
        rows.append(Row(name, engines[kind], folder, runner, None if kind == "genai" else f"genai {quant}"))
    torch_runner = partial(EdgelmRunner, checkpoint, "torch", t)
    rows.append(Row("torch fp32", "edgelm TorchRuntime", checkpoint, torch_runner, "genai fp32"))
    rows = [row for row in rows if row.name not in skipped]

    from edgelm.model.config import ModelConfig

    config = ModelConfig.load(checkpoint)
    import onnxruntime
    import onnxruntime_genai

    print(
        f"{checkpoint}: {config.num_parameters / 1e6:.0f}M parameters, {config.num_hidden_layers} layers; "
        f"batch 1, {t} threads, {args.repeats} rounds; onnxruntime {onnxruntime.__version__}, "
        f"onnxruntime-genai {onnxruntime_genai.__version__}"
    )
    measure(rows, args.repeats, config.vocab_size)
    print_table(rows)
    if args.profile:
        profiled = {row.name: row.folder for row in rows if row.name.split()[0] in ("edgelm", "genai")}
        decode_profile(profiled, config, t, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="135m", help="SmolLM-135M's or SmolLM2-1.7B's")
    parser.add_argument("--layers", type=int, default=None, help="layers of the model (default: the shape's)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/edgelm-bench"), help="models built here")
    parser.add_argument("--rebuild", action="store_true", help="export everything again")
    parser.add_argument("--skip", default="", help="rows to leave out, e.g. 'torch fp32,optimum fp32'")
    parser.add_argument("--accuracy", type=Path, metavar="RUN", help="also: perplexity ratios on RUN")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows for --accuracy")
    parser.add_argument("--no-speed", action="store_true", help="only the accuracy section")
    parser.add_argument("--profile", action="store_true", help="also: decode kernel time per op type")
    parser.add_argument("--optimum-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.optimum_worker:
        optimum_worker(args.optimum_worker, args.threads)
        return

    optimum_python, why_not = find_optimum_python()
    if optimum_python is None:
        print(f"optimum: skipped ({why_not})")
    if not args.no_speed:
        speed(args, optimum_python)
    if args.accuracy:
        accuracy(args.accuracy, args.cache, optimum_python, args.windows)


if __name__ == "__main__":
    main()
