"""`edgelm serve` under load, on a machine whose cores other work also wants (as a desktop app's are).

    python benchmarks/serve_load.py [--requests 200] [--tokens 8] [--busy 2] [--cache /tmp/edgelm-bench]

The model has SmolLM-135M's shape with random weights (benchmarks/onnx_speed.py's checkpoint), exported as
GGUF Q4_K_M and ONNX int4. Each server is `edgelm serve` in its own process:

    gguf                llama.cpp, threads chosen as it runs (the cores other processes leave free)
    gguf --threads N    llama.cpp on N threads whatever else runs (N: every core, the old default)
    onnx                ONNX Runtime, its own thread pool

While --busy processes spin on the CPU (0: a quiet machine), --requests completions of --tokens tokens
(temperature 0) are sent at once, and the table shows the time until the last answer and the latency of
the median and the 99th-percentile request. Then one 16 MB prompt is sent while /v1/models is asked every
50 ms: how long the refusal took, the slowest /v1/models answer meanwhile, and the server's resident
memory after it (peak in brackets).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

BIG_PROMPT_BYTES = 16 << 20


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes spinning on the CPU while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0 if count else 0.0)
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


@contextmanager
def server(artifact: Path, extra: list[str]) -> Iterator[tuple[str, int]]:
    """`edgelm serve ARTIFACT` on a free port: its base URL and process id, until the block ends."""
    command = [
        sys.executable,
        "-m",
        "edgelm",
        "serve",
        str(artifact),
        "--port",
        "0",
    ]
    process = subprocess.Popen(
        [*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if found := re.search(r"at (http://\S+)/v1", line):
                threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
                yield found.group(1), process.pid
                return
        raise SystemExit(f"edgelm serve {artifact} stopped before it served")
    finally:
        process.terminate()
        process.wait()


def post(url: str, body: bytes) -> tuple[int | str, float]:
    """POST a JSON body: the status ("reset": the server closed the connection while the body was being
    sent, as it does after refusing a body by its declared length) and the seconds until the answer."""
    started = time.perf_counter()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, ConnectionError):
        status = "reset"
    return status, time.perf_counter() - started


def load_figures(base: str, requests: int, tokens: int) -> dict[str, float]:
    """All requests at once: the wall time until the last answer, and the latency percentiles."""
    body = json.dumps({"prompt": "def fibonacci(n):", "max_tokens": tokens, "temperature": 0}).encode()
    post(f"{base}/v1/completions", body)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(lambda _: post(f"{base}/v1/completions", body), range(requests)))
    wall = time.perf_counter() - started
    if failed := [status for status, _ in answers if status != 200]:
        raise SystemExit(f"{len(failed)} requests failed: {sorted(set(failed))}")
    latency = np.array([seconds for _, seconds in answers])
    return {"wall": wall, "p50": float(np.median(latency)), "p99": float(np.percentile(latency, 99))}


def big_prompt_figures(base: str, pid: int) -> dict[str, Any]:
    """A 16 MB prompt: its status and time, the slowest /v1/models meanwhile, the server's memory after."""
    body = json.dumps({"prompt": "x " * (BIG_PROMPT_BYTES // 2), "max_tokens": 1}).encode()
    result: dict[str, Any] = {}

    def send() -> None:
        result["status"], result["time"] = post(f"{base}/v1/completions", body)

    thread = threading.Thread(target=send)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        started = time.perf_counter()
        with urllib.request.urlopen(f"{base}/v1/models", timeout=600) as answer:
            answer.read()
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.05)
    status = Path(f"/proc/{pid}/status").read_text()
    memory = {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+ kB)", status)}
    return {**result, "models_max": slowest, "rss": memory.get("VmRSS", 0), "peak": memory.get("VmHWM", 0)}


def artifacts(cache: Path) -> dict[str, Path]:
    """The 135M-shaped checkpoint's GGUF Q4_K_M file and ONNX int4 folder (exported once)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from onnx_speed import bench_checkpoint

    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    checkpoint = bench_checkpoint(cache, "135m", None)
    gguf, onnx = checkpoint.parent / "serve-q4_k_m.gguf", checkpoint.parent / "serve-onnx-int4"
    if not gguf.is_file():
        export_gguf(checkpoint, gguf, "q4_k_m")
    if not onnx.is_dir():
        export_onnx(checkpoint, onnx, "int4")
    return {"gguf": gguf, "onnx": onnx}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument(
        "--busy", type=int, default=2, help="processes spinning meanwhile (0: a quiet machine)"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgelm-bench")
    args = parser.parse_args()
    paths = artifacts(args.cache)
    cores = str(os.cpu_count() or 1)
    servers = {
        "gguf (free cores)": (paths["gguf"], []),
        f"gguf --threads {cores}": (paths["gguf"], ["--threads", cores]),
        "onnx": (paths["onnx"], []),
    }
    print(
        f"{args.requests} requests of {args.tokens} tokens at once, {args.busy} busy processes, {cores} cores"
    )
    columns = ("all s", "p50 s", "p99 s", "16 MB prompt", "/v1/models max", "RSS after")
    print(f"{'server':<20} {columns[0]:>7} {columns[1]:>7} {columns[2]:>7}   " + " ".join(columns[3:]))
    for name, (path, extra) in servers.items():
        with server(path, extra) as (base, pid), busy_processes(args.busy):
            load = load_figures(base, args.requests, args.tokens)
            big = big_prompt_figures(base, pid)
        print(
            f"{name:<20} {load['wall']:7.2f} {load['p50']:7.2f} {load['p99']:7.2f}   "
            f"{big['status']} in {big['time']:6.3f} s {big['models_max']:13.3f} s "
            f"{big['rss'] / 1e9:6.2f} GB ({big['peak'] / 1e9:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
