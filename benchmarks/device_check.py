"""Every runtime on the GPU, checked against PyTorch in float32 on the CPU, in one command of a few minutes.

    python benchmarks/device_check.py [--layers 8] [--prompt 256] [--decode 64] [--threads N] [--keep DIR]

It builds a small random Llama checkpoint (a BPE tokenizer trained on a slice of the built-in corpus),
exports it as ONNX fp16 (CUDA's GroupQueryAttention runs float16 only) and fp32, and as GGUF F16, then runs:

    torch        checkpoint   cuda, float32 and float16
    onnxruntime  ONNX fp16    cuda (CUDAExecutionProvider)
    llamacpp     GGUF F16     cuda (all layers offloaded)

Each one gets the same token ids, a prompt (all of its logits kept) then single decode steps, and is
compared with the reference on every position: max |Δlogit| and top-1 agreement. Speed is pp (one prompt's
forward pass) and tg (decode steps, each choosing the next token greedily) in tokens/s, the median of three
runs after a warm-up. A device whose stack is missing (torch without CUDA, onnxruntime without
CUDAExecutionProvider, llama-cpp-python without GPU offload) is reported as skipped with the fix.

On a machine without CUDA it says what it would check and runs the same artifacts on the CPU instead (ONNX
fp32 and fp16, GGUF F16), so the script itself is exercised everywhere. It exits 1 when a parity bound fails.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgelm
from edgelm.model.config import ModelConfig
from edgelm.runtimes.base import Runtime

SEED = 0
RUNS = 3
RUNTIMES = ("torch", "onnxruntime", "llamacpp")


@dataclass(frozen=True)
class Check:
    """One runtime on one artifact and device, and the parity it must reach."""

    runtime: str
    artifact: str  # a key of the artifacts dict: "checkpoint", "onnx-fp16", ...
    device: str
    options: dict[str, Any]
    max_delta: float  # max |Δlogit| allowed against the float32 CPU reference
    min_top1: float  # top-1 agreement required

    @property
    def label(self) -> str:
        dtype = self.options.get("dtype")
        return f"{self.artifact}{' ' + dtype if dtype else ''}"


# float32 on any device agrees to rounding; float16 weights/activations to ~1e-2 on logits of std ~2
FP32 = {"max_delta": 1e-3, "min_top1": 0.99}
FP16 = {"max_delta": 0.25, "min_top1": 0.95}


def gpu_checks() -> list[Check]:
    return [
        Check("torch", "checkpoint", "cuda", {}, **FP32),
        Check("torch", "checkpoint", "cuda", {"dtype": "float16"}, **FP16),
        Check("onnxruntime", "onnx-fp16", "cuda", {}, **FP16),
        Check("llamacpp", "gguf-f16", "cuda", {"context": 2048}, **FP16),
    ]


def cpu_checks() -> list[Check]:
    return [
        Check("onnxruntime", "onnx-fp32", "cpu", {}, **FP32),
        Check("onnxruntime", "onnx-fp16", "cpu", {}, **FP16),
        Check("llamacpp", "gguf-f16", "cpu", {"context": 2048}, **FP16),
    ]


def cuda_support() -> dict[str, str | None]:
    """Per runtime: None when it can use CUDA here, else the reason and the fix."""
    reasons: dict[str, str | None] = {name: f"{name} is not installed" for name in RUNTIMES}
    try:
        import torch

        reasons["torch"] = None
        if not torch.cuda.is_available():
            reasons["torch"] = f"torch {torch.__version__} sees no CUDA device"
    except ModuleNotFoundError:
        pass
    try:
        import onnxruntime as ort

        reasons["onnxruntime"] = None
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reasons["onnxruntime"] = (
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
            )
    except ModuleNotFoundError:
        pass
    try:
        import llama_cpp

        reasons["llamacpp"] = None
        if not llama_cpp.llama_supports_gpu_offload():
            reasons["llamacpp"] = (
                'llama-cpp-python has no GPU offload (CMAKE_ARGS="-DGGML_CUDA=on" pip install '
                "--force-reinstall --no-cache-dir llama-cpp-python)"
            )
    except ModuleNotFoundError:
        pass
    if not has_cuda_device():  # a CUDA build of onnxruntime lists its provider on any machine
        reasons = {
            name: reason or "no CUDA device (nvidia-smi lists none)" for name, reason in reasons.items()
        }
    return reasons


def has_cuda_device() -> bool:
    """torch sees a CUDA device, or nvidia-smi lists a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ModuleNotFoundError:
        pass
    if shutil.which("nvidia-smi") is None:
        return False
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and "GPU" in result.stdout


# ------------------------------------------------------------------------------------------- artifacts


def build(directory: Path, layers: int) -> dict[str, Path]:
    """The random checkpoint and its exports under `directory`."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx
    from edgelm.tokenizer import train_tokenizer
    from edgelm.training.data import builtin_corpus, read_documents
    from edgelm.training.random_checkpoint import random_checkpoint

    texts = [d.text for d in read_documents(builtin_corpus()[:150], skip_undecodable=True)]
    tokenizer = train_tokenizer(texts, 4096)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    # the head wider, so that the logits spread (std ~2) and top-1 is not a near tie
    checkpoint = directory / "checkpoint"
    random_checkpoint(checkpoint, config, tokenizer, SEED, 0.05, embedding_std=0.1, vector_range=(0.8, 1.2))
    return {
        "checkpoint": checkpoint,
        "onnx-fp32": export_onnx(checkpoint, directory / "onnx-fp32", "fp32"),
        "onnx-fp16": export_onnx(checkpoint, directory / "onnx-fp16", "fp16"),
        "gguf-f16": export_gguf(checkpoint, directory / "model-f16.gguf", "f16"),
    }


# ------------------------------------------------------------------------------------------ measurement


def logits_of(runtime: Runtime, ids: list[int], prompt: int) -> np.ndarray:
    """The prompt's logits (all positions), then one row per single-token decode step: (len(ids), vocab)."""
    runtime.reset()
    rows = [runtime.forward(ids[:prompt], all_logits=True)]
    rows += [runtime.forward([token]) for token in ids[prompt:]]
    return np.concatenate(rows).astype(np.float32)


def speed(runtime: Runtime, ids: list[int], prompt: int, decode: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s over RUNS runs after a warm-up."""
    pp, tg = [], []
    for run in range(RUNS + 1):
        runtime.reset()
        start = time.perf_counter()
        runtime.forward(ids[:prompt])
        prefill = time.perf_counter() - start
        runtime.reset()
        token = int(runtime.forward(ids[:1])[-1].argmax())
        start = time.perf_counter()
        for _ in range(decode):
            token = int(runtime.forward([token])[-1].argmax())
        generate = time.perf_counter() - start
        if run:
            pp.append(prompt / prefill)
            tg.append(decode / generate)
    return statistics.median(pp), statistics.median(tg)


def choose_checks() -> list[Check]:
    """The GPU checks whose runtime reaches a CUDA device (saying why each other one is skipped); where none
    does, the CPU checks, so that the script still runs end to end."""
    reasons = cuda_support()
    import onnxruntime
    import torch

    print(
        f"torch {torch.__version__} (CUDA device: {'yes' if torch.cuda.is_available() else 'no'}), "
        f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    )
    if all(reason is not None for reason in reasons.values()):  # no runtime reaches a CUDA device
        print("no CUDA here. On a CUDA machine this checks:")
        for check in gpu_checks():
            print(
                f"  {check.runtime:<12} {check.label:<20} on {check.device}: max |Δlogit| ≤ "
                f"{check.max_delta:g}, top-1 ≥ {check.min_top1:.2f}, pp/tg tokens/s"
            )
        print("running the CPU paths instead, to exercise this script.")
        return cpu_checks()
    checks = []
    for check in gpu_checks():
        if reasons[check.runtime] is None:
            checks.append(check)
        else:
            print(f"skipped: {check.runtime} on cuda: {reasons[check.runtime]}")
    return checks


def run_check(
    check: Check,
    artifact: Path,
    threads: dict[str, int],
    reference: np.ndarray,
    ids: list[int],
    prompt: int,
    decode: int,
) -> bool:
    """Run `artifact` as `check` says and print its row (logit error, top-1, speed); whether it passed."""
    try:
        options = check.options | threads
        with edgelm.load(artifact, runtime=check.runtime, device=check.device, **options) as model:
            got = logits_of(model.runtime, ids, prompt)
            rates = speed(model.runtime, ids, prompt, decode)
    except Exception as e:  # one runtime's failure is a result, not the end of the check
        print(f"{check.runtime:<12} {check.label:<20} {check.device:<6} FAILED: {e}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return False
    delta = float(np.abs(got - reference).max())
    top1 = float((got.argmax(-1) == reference.argmax(-1)).mean())
    ok = delta <= check.max_delta and top1 >= check.min_top1
    verdict = "ok" if ok else f"FAIL (bounds: ≤ {check.max_delta:g}, ≥ {check.min_top1:.2f})"
    print(
        f"{check.runtime:<12} {check.label:<20} {check.device:<6} {delta:12.2e} {top1:6.3f} "
        f"{rates[0]:11.1f} {rates[1]:10.1f}  {verdict}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (pp)")
    parser.add_argument("--decode", type=int, default=64, help="decode steps (tg)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    parser.add_argument("--keep", type=Path, help="build the artifacts here and keep them")
    args = parser.parse_args()

    checks = choose_checks()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        start = time.perf_counter()
        artifacts = build(directory, args.layers)
        vocab = ModelConfig.load(artifacts["checkpoint"]).vocab_size
        print(
            f"built {args.layers} layers, vocabulary {vocab}, in {time.perf_counter() - start:.0f} s: "
            f"{', '.join(artifacts)}"
        )
        rng = np.random.default_rng(SEED)
        ids = rng.integers(2, vocab, args.prompt + args.decode).tolist()
        threads = {} if args.threads is None else {"threads": args.threads}
        with edgelm.load(artifacts["checkpoint"], device="cpu", **threads) as model:
            reference = logits_of(model.runtime, ids, args.prompt)
            base_speed = speed(model.runtime, ids, args.prompt, args.decode)

        pp, tg = f"pp{args.prompt}", f"tg{args.decode}"
        print(
            f"\n{'runtime':<12} {'artifact':<20} {'device':<6} {'max |Δlogit|':>12} {'top-1':>6} "
            f"{pp + ' t/s':>11} {tg + ' t/s':>10}  verdict"
        )
        print(
            f"{'torch':<12} {'checkpoint':<20} {'cpu':<6} {'reference':>12} {'':>6} "
            f"{base_speed[0]:11.1f} {base_speed[1]:10.1f}"
        )
        failed = sum(
            not run_check(check, artifacts[check.artifact], threads, reference, ids, args.prompt, args.decode)
            for check in checks
        )
    print(f"\n{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
