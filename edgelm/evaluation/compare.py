"""`edgelm compare`: export a checkpoint to many targets, check each against the same reference, report.

    checkpoint ──reference log-probs (once, cached)──┐
        ├─export gguf:q4_0 ──▶ file ──check (own process)──┤
        ├─export onnx:int4 ──▶ folder ──check (own process)──┤──▶ report.md, report.json, charts
        └─torch (the checkpoint itself) ──check──────────────┘

A target is `FORMAT:LEVEL` (`gguf:q4_k_m`, `onnx:int4`), `torch` (the checkpoint itself in PyTorch: the
identical target, KLD 0), or the path of an artifact that already exists. Each target is exported into the
output folder and checked in a fresh process, so that its load time is a cold start, its peak memory is its
own, and a runtime that crashes costs only its own row; a target that fails for any reason is reported with
its error while the others go on. Without `targets`, every format whose exporter and runtime are installed
is compared at its usual levels (`DEFAULT_LEVELS`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.evaluation.check import CheckResult, artifact_quant, check
from edgelm.evaluation.progress import ProgressDisplay
from edgelm.evaluation.reference import EvaluationText, Reference, ReferenceInfo, compute_reference
from edgelm.evaluation.report import report_markdown, report_record, summary, write_charts
from edgelm.files import write_json_atomic
from edgelm.formats.artifact import artifact_kind

# exports a checkpoint at a level into a folder: (checkpoint, out, level) -> the artifact's path
Exporter = Callable[[Path, Path, str], Path]


def gguf_exporter() -> tuple[Exporter, Collection[str]]:
    """The GGUF exporter and its levels, imported only when a GGUF target is exported."""
    from edgelm.export.gguf import MIXTURES, export_gguf

    return export_gguf, MIXTURES


def onnx_exporter() -> tuple[Exporter, Collection[str]]:
    """The ONNX exporter (into a folder of its own per level) and its levels, imported only when used."""
    from edgelm.export.onnx import PRECISIONS, export_onnx

    def export(checkpoint: Path, out: Path, level: str) -> Path:
        return export_onnx(checkpoint, out / f"{checkpoint.name}-onnx-{level}", level)

    return export, PRECISIONS


@dataclass(frozen=True)
class TargetFormat:
    """An export format as a comparison target: its exporter, its levels, and what it needs installed."""

    name: str
    exporter: Callable[[], tuple[Exporter, Collection[str]]] | None  # None for the checkpoint itself
    default_levels: tuple[str, ...]
    modules: tuple[str, ...]  # Python modules that exporting and running it import, the exporter's first
    extra: str  # the pip extra that installs them


FORMATS: dict[str, TargetFormat] = {
    "torch": TargetFormat("torch", None, ("fp32",), ("torch",), "torch"),
    "gguf": TargetFormat(
        "gguf",
        gguf_exporter,
        ("f16", "q8_0", "q4_k_m", "q4_0"),
        ("edgelm.export.gguf", "gguf", "llama_cpp"),
        "llamacpp",
    ),
    "onnx": TargetFormat(
        "onnx",
        onnx_exporter,
        ("fp32", "int8", "int4", "int4_mixed"),  # fp16 is for GPU providers
        ("edgelm.export.onnx", "onnx", "onnxruntime"),
        "onnx",
    ),
}


@dataclass(frozen=True)
class Target:
    """One thing to check: a format at a level, or an existing artifact (`path`)."""

    spec: str  # as written: "gguf:q4_0", "torch", "runs/x.gguf"
    format: str | None  # a FORMATS key, or None for an existing artifact
    level: str | None
    path: Path | None = None


def parse_target(spec: str) -> Target:
    """`FORMAT:LEVEL`, `torch`, or the path of an existing artifact; an unknown format is an error."""
    spec = spec.strip()
    if spec == "torch" or spec == "torch:fp32":
        return Target("torch", "torch", "fp32")
    if Path(spec).exists():
        return Target(spec, None, None, Path(spec))
    name, _, level = spec.partition(":")
    if name not in FORMATS or name == "torch" or not level:
        raise EdgelmError(
            f"target {spec!r}: give FORMAT:LEVEL (gguf:q4_k_m, onnx:int4, ...), torch, or an existing "
            f"artifact's path; formats: {', '.join(FORMATS)}"
        )
    return Target(spec, name, level.lower())


def format_available(fmt: TargetFormat) -> bool:
    """Whether the format's exporter module and every dependency can be imported (nothing is imported)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in fmt.modules)
    except (ImportError, ValueError):
        return False


def default_targets() -> list[str]:
    """Every available format at its default levels."""
    return [
        "torch" if fmt.name == "torch" else f"{fmt.name}:{level}"
        for fmt in FORMATS.values()
        if format_available(fmt)
        for level in fmt.default_levels
    ]


def export_target(target: Target, checkpoint: Path, out: Path) -> Path:
    """The artifact for `target`: the checkpoint itself, an existing path, or a fresh export into `out`."""
    if target.path is not None:
        return target.path
    fmt = FORMATS[target.format or ""]
    if fmt.exporter is None:
        return checkpoint
    try:
        export, levels = fmt.exporter()
    except ModuleNotFoundError as e:
        missing = e.name or fmt.modules[0]
        if missing.startswith("edgelm"):
            raise EdgelmError(f"{target.spec}: this edgelm has no {fmt.modules[0]} exporter") from None
        raise EdgelmError(
            f"{missing} is not installed; install it with: pip install 'edgelm[{fmt.extra}]'"
        ) from None
    if target.level not in levels:
        raise EdgelmError(f"{target.spec}: unknown {fmt.name} level; choose one of {', '.join(levels)}")
    for name in fmt.modules:  # running it needs the runtime's library too
        if importlib.util.find_spec(name) is None:
            raise EdgelmError(f"{name} is not installed; install it with: pip install 'edgelm[{fmt.extra}]'")
    return export(checkpoint, out, target.level or "")


# ---------------------------------------------------------------------------------------------------------
# running the checks


@dataclass(frozen=True)
class Comparison:
    """Everything `compare` measured and wrote."""

    checkpoint: str
    reference: ReferenceInfo
    results: tuple[CheckResult, ...]
    report_md: Path
    report_json: Path
    charts: tuple[Path, ...]
    charts_note: str | None  # why there are no charts, when there are none


def compare(
    checkpoint: str | Path,
    out: str | Path | None = None,
    targets: Sequence[str] | None = None,
    text: str | Path | EvaluationText | None = None,
    *,
    ctx: int | None = None,
    windows: int | None = None,
    repetitions: int = 5,
    device: str = "auto",
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    isolate: bool = True,
    show_progress: bool = True,
) -> Comparison:
    """Export `checkpoint` to each target in `out`, check each against the checkpoint, write the report.

    `targets` defaults to `default_targets()`; `text` (a UTF-8 file) to the held-out split of the built-in
    corpus; `threads` to os.cpu_count() for every runtime alike. `isolate=False` runs the checks in this
    process (faster, for tests; load times and memory are then not those of a fresh process). Returns the
    results; report.md, report.json and the charts are in `out` (default: `<checkpoint>-report`).
    """
    checkpoint = Path(checkpoint)
    if artifact_kind(checkpoint) != "checkpoint":
        raise EdgelmError(f"{checkpoint}: compare needs a checkpoint directory as its reference")
    out = Path(out) if out is not None else checkpoint.with_name(f"{checkpoint.name}-report")
    specs = list(targets) if targets else default_targets()
    if not specs:
        raise EdgelmError("no targets: install an export format's extra (pip install 'edgelm[all]')")
    parsed = [parse_target(s) for s in specs]
    evaluation = text if isinstance(text, EvaluationText) or text is None else EvaluationText.from_file(text)
    threads = threads or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    options = {"repetitions": repetitions, "device": device, "threads": threads}
    settings = {
        "targets": [t.spec for t in parsed],
        "text": str(text) if text is not None and not isinstance(text, EvaluationText) else None,
        "ctx": ctx,
        "windows": windows,
        **options,
    }

    with ProgressDisplay(show_progress, ["reference", *(t.spec for t in parsed)]) as display:
        reference = compute_reference(
            checkpoint,
            evaluation,
            ctx,
            windows,
            device=device,
            cache_dir=cache_dir,
            progress=display.callback("reference"),
            threads=threads,
        )
        display.done("reference", f"PPL {reference_ppl_text(reference)}")
        results = []
        for target in parsed:
            result = _run_target(target, checkpoint, out, reference, options, isolate, display)
            results.append(result)
            display.done(target.spec, summary(result))

    return write_report(checkpoint, out, reference.info, results, settings)


def write_report(
    checkpoint: Path,
    out: Path,
    reference: ReferenceInfo,
    results: list[CheckResult],
    settings: dict[str, Any],
) -> Comparison:
    """Write the charts, report.json and report.md into `out`."""
    charts, note = write_charts(results, out)
    report_json = out / "report.json"
    write_json_atomic(report_json, report_record(checkpoint, reference, results, settings))
    report_md = out / "report.md"
    report_md.write_text(report_markdown(checkpoint, reference, results, charts, note), encoding="utf-8")
    return Comparison(str(checkpoint), reference, tuple(results), report_md, report_json, charts, note)


def reference_ppl_text(reference: Reference) -> str:
    """The reference's own perplexity on the scored positions, for the progress display."""
    import numpy as np

    nll = np.concatenate(
        [
            -np.take_along_axis(reference.logp[i], reference.next_ids(i)[:, None], -1)[:, 0]
            for i in range(len(reference.windows))
        ]
    )
    return f"{math.exp(float(nll.astype(np.float64).mean())):.2f}"


def _run_target(
    target: Target,
    checkpoint: Path,
    out: Path,
    reference: Reference,
    options: dict[str, Any],
    isolate: bool,
    display: ProgressDisplay,
) -> CheckResult:
    """Export and check one target; every failure becomes a failed result."""
    display.status(target.spec, "exporting")
    try:
        artifact = export_target(target, checkpoint, out)
    except Exception as e:  # any exporter failure is this target's row
        return CheckResult.failed(target.spec, _message(e), format=target.format, quant=target.level)
    quant = target.level
    if target.path is not None:
        with contextlib.suppress(Exception):
            quant = artifact_quant(artifact)
    kwargs = {**options, "target": target.spec, "quant": quant}
    if not isolate:
        try:
            return check(artifact, reference, progress=display.callback(target.spec), **kwargs)
        except Exception as e:
            return CheckResult.failed(target.spec, _message(e), artifact=str(artifact), quant=quant)
    log = out / "logs" / f"{_safe_name(target.spec)}.log"
    return _check_in_child(target.spec, artifact, reference, kwargs, log, display)


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, EdgelmError) else f"{type(e).__name__}: {e}"


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_") or "target"


def _check_in_child(
    spec: str,
    artifact: Path,
    reference: Reference,
    kwargs: dict[str, Any],
    log: Path,
    display: ProgressDisplay,
) -> CheckResult:
    """Run `check` in a fresh Python process (`python -c`, so no script's main module is run again): the job
    goes to it pickled on stdin; progress and the result come back pickled on its stdout; whatever the
    runtimes print goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    job = pickle.dumps((str(artifact), reference, kwargs, str(log)), protocol=pickle.HIGHEST_PROTOCOL)
    command = [sys.executable, "-c", "from edgelm.evaluation.compare import _child; _child()"]
    failed = {"artifact": str(artifact), "quant": kwargs.get("quant"), "reference": reference.info}
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdin is not None and process.stdout is not None  # both are pipes, as asked
    outcome: tuple[str, Any] | None = None
    try:
        with contextlib.suppress(BrokenPipeError):  # a child that dies at once: its exit code says why
            process.stdin.write(job)
            process.stdin.close()
        while outcome is None:
            header = process.stdout.read(8)
            if len(header) < 8:
                break
            kind, payload = pickle.loads(process.stdout.read(struct.unpack("<Q", header)[0]))
            if kind == "progress":
                display.update(spec, *payload)
            else:
                outcome = (kind, payload)
    except BaseException:
        process.kill()
        raise
    finally:
        process.stdout.close()
        code = process.wait()
        if log.stat().st_size == 0:
            log.unlink()
    if outcome is None:
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        output = f"; its output is in {log}" if log.exists() else ""
        return CheckResult.failed(spec, f"the check's process died ({cause}){output}", **failed)
    kind, payload = outcome
    return CheckResult.failed(spec, payload, **failed) if kind == "error" else payload


def _child() -> None:
    """The check in a child process (see `_check_in_child`)."""
    channel = os.fdopen(os.dup(1), "wb")
    artifact, reference, kwargs, log = pickle.load(sys.stdin.buffer)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)  # llama.cpp and ONNX Runtime print to the process's own stdout and stderr
    os.close(fd)

    def send(kind: str, payload: Any) -> None:
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        channel.write(struct.pack("<Q", len(data)) + data)
        channel.flush()

    try:
        send("result", check(artifact, reference, progress=lambda *p: send("progress", p), **kwargs))
    except Exception as e:  # reported as this target's failure
        import traceback

        traceback.print_exc()
        send("error", _message(e))
    channel.close()
