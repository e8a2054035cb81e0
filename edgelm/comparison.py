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
import dataclasses
import datetime
import importlib
import importlib.util
import math
import os
import pickle
import platform
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.checking import (
    CheckResult,
    EvaluationText,
    Reference,
    ReferenceInfo,
    artifact_quant,
    check,
    compute_reference,
)
from edgelm.errors import EdgelmError
from edgelm.files import write_json_atomic
from edgelm.runtimes.base import artifact_kind

SCHEMA = "edgelm.compare/1"


@dataclass(frozen=True)
class TargetFormat:
    """An export format as a comparison target: its exporter, its levels, and what it needs installed."""

    name: str
    exporter: str | None  # "module:function"; None for the checkpoint itself
    levels_attr: str | None  # the exporter module's table of levels
    default_levels: tuple[str, ...]
    modules: tuple[str, ...]  # Python modules that exporting and running it import
    extra: str  # the pip extra that installs them


FORMATS: dict[str, TargetFormat] = {
    "torch": TargetFormat("torch", None, None, ("fp32",), ("torch",), "torch"),
    "gguf": TargetFormat(
        "gguf",
        "edgelm.export.gguf:export_gguf",
        "MIXTURES",
        ("f16", "q8_0", "q4_k_m", "q4_0"),
        ("gguf", "llama_cpp"),
        "llamacpp",
    ),
    "onnx": TargetFormat(
        "onnx",
        "edgelm.export.onnx:export_onnx",
        "PRECISIONS",
        ("fp32", "int8", "int4", "int4_mixed"),  # fp16 is for GPU providers
        ("onnx", "onnxruntime"),
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
    modules = list(fmt.modules)
    if fmt.exporter:
        modules.append(fmt.exporter.split(":")[0])
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
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
    module_name, function = fmt.exporter.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if missing.startswith("edgelm"):
            raise EdgelmError(f"{target.spec}: this edgelm has no {module_name} exporter") from None
        raise EdgelmError(
            f"{missing} is not installed; install it with: pip install 'edgelm[{fmt.extra}]'"
        ) from None
    levels = getattr(module, fmt.levels_attr or "", None)
    if levels is not None and target.level not in levels:
        raise EdgelmError(f"{target.spec}: unknown {fmt.name} level; choose one of {', '.join(levels)}")
    for name in fmt.modules:  # running it needs the runtime's library too
        if importlib.util.find_spec(name) is None:
            raise EdgelmError(f"{name} is not installed; install it with: pip install 'edgelm[{fmt.extra}]'")
    export = getattr(module, function)
    if fmt.name == "onnx":
        return export(checkpoint, out / f"{checkpoint.name}-onnx-{target.level}", target.level)
    return export(checkpoint, out, target.level)


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

    charts, note = write_charts(results, out)
    report_json = out / "report.json"
    write_json_atomic(report_json, report_record(checkpoint, reference.info, results, settings))
    report_md = out / "report.md"
    report_md.write_text(report_markdown(checkpoint, reference.info, results, charts, note), encoding="utf-8")
    return Comparison(str(checkpoint), reference.info, tuple(results), report_md, report_json, charts, note)


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
    command = [sys.executable, "-c", "from edgelm.comparison import _child; _child()"]
    failed = {"artifact": str(artifact), "quant": kwargs.get("quant"), "reference": reference.info}
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
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


# ---------------------------------------------------------------------------------------------------------
# progress display


class ProgressDisplay:
    """Progress on stderr: on a terminal, a live rich display of rows (the reference, each target) and what
    each is doing; elsewhere (a log, a CI job) one line per finished row. Silent when `enabled` is False."""

    def __init__(self, enabled: bool, rows: Sequence[str]) -> None:
        self.enabled = enabled
        self.rows = list(rows)
        self.tasks: dict[str, Any] = {}
        self.progress: Any = None
        self.console: Any = None

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:<18}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self.progress.start()
            for row in self.rows:
                self.tasks[row] = self.progress.add_task(row, total=None, status="waiting", start=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def callback(self, row: str) -> Callable[[str, int, int], None]:
        """A `progress` callback for `check` that updates `row`."""
        return lambda stage, done, total: self.update(row, stage, done, total)

    def update(self, row: str, stage: str, done: int, total: int) -> None:
        """Show `stage` at `done` of `total` on `row`."""
        if row in self.tasks:
            task = self.tasks[row]
            self.progress.start_task(task)
            self.progress.update(task, total=total, completed=done, status=stage)

    def status(self, row: str, text: str) -> None:
        """Show `text` on `row`, without a count."""
        if row in self.tasks:
            self.progress.start_task(self.tasks[row])
            self.progress.update(self.tasks[row], status=text)

    def done(self, row: str, text: str) -> None:
        """Mark `row` finished with a one-line summary."""
        if row in self.tasks:
            task = self.tasks[row]
            self.progress.update(task, total=1, completed=1, status=text)
            self.progress.stop_task(task)
        elif self.console is not None:
            self.console.print(f"{row}: {text}", highlight=False)


# ---------------------------------------------------------------------------------------------------------
# the report


def summary(result: CheckResult) -> str:
    """One line for the progress display."""
    from rich.markup import escape

    if result.error:
        return f"[red]failed[/red]: {escape(result.error[:100])}"
    acc, lat = result.accuracy, result.latency
    parts = [f"KLD {_number(acc.kld_mean.value)}"] if acc else []
    if lat:
        parts.append(f"tg {lat.tg_tps.mean:,.0f} t/s")
    if result.tokenizer and not result.tokenizer.match:
        parts.append("[red]tokenizer differs[/red]")
    return " · ".join(parts)


def _number(value: float) -> str:
    """A KLD-like value with 3 significant digits; exact zero as 0."""
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def human_size(n: int | None) -> str:
    """Bytes in decimal units."""
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def table_rows(results: Sequence[CheckResult]) -> tuple[list[str], list[list[str]]]:
    """The main table: header and one row per target (size, PPL ratio, KLD, same top p, pp, tg)."""
    pp = next((r.latency.pp_tokens for r in results if r.latency), 512)
    tg = next((r.latency.tg_tokens for r in results if r.latency), 128)
    header = [
        "target",
        "runtime",
        "size",
        "PPL ratio",
        "mean KLD",
        "same top p",
        f"pp{pp} t/s",
        f"tg{tg} t/s",
    ]
    rows = []
    for r in results:
        where = f"{r.runtime} · {r.device}" if r.runtime else "—"
        if r.error:
            rows.append([r.target, where, human_size(r.file_size), f"failed: {r.error}", "", "", "", ""])
            continue
        acc, lat = r.accuracy, r.latency
        name = r.target if r.tokenizer is None or r.tokenizer.match else f"{r.target} (tokenizer differs!)"
        rows.append(
            [
                name,
                where,
                human_size(r.file_size),
                f"{acc.ppl_ratio.value:.4f}" if acc else "—",
                _number(acc.kld_mean.value) if acc else "—",
                f"{100 * acc.same_top_p.value:.1f} %" if acc else "—",
                f"{lat.pp_tps.mean:,.0f} ± {lat.pp_tps.std:,.0f}" if lat else "—",
                f"{lat.tg_tps.mean:,.0f} ± {lat.tg_tps.std:,.0f}" if lat else "—",
            ]
        )
    return header, rows


def detail_rows(results: Sequence[CheckResult]) -> tuple[list[str], list[list[str]]]:
    """The details table: every accuracy metric with its ±, load times, TTFT, memory, threads, provider."""
    header = [
        "target",
        "PPL",
        "PPL ratio",
        "KLD mean",
        "KLD median",
        "KLD p99",
        "KLD max",
        "same top p",
        "RMS Δp",
        "load cold / warm",
        "TTFT",
        "peak RSS",
        "threads",
        "provider",
    ]
    rows = []
    for r in results:
        if r.error:
            continue
        acc, lat = r.accuracy, r.latency
        row = [r.target]
        if acc:
            row += [
                f"{acc.ppl.value:.3f} ± {acc.ppl.error:.3f}",
                f"{acc.ppl_ratio.value:.5f} ± {acc.ppl_ratio.error:.5f}",
                f"{_number(acc.kld_mean.value)} ± {_number(acc.kld_mean.error)}",
                _number(acc.kld_median),
                _number(acc.kld_p99),
                _number(acc.kld_max),
                f"{100 * acc.same_top_p.value:.2f} ± {100 * acc.same_top_p.error:.2f} %",
                f"{100 * acc.rms_dp.value:.3f} ± {100 * acc.rms_dp.error:.3f} %",
            ]
        else:
            row += ["—"] * 8
        if lat:
            row += [
                f"{lat.load_cold_s * 1000:,.0f} / {lat.load_warm_s.mean * 1000:,.0f} ms",
                f"{lat.ttft_ms.mean:,.1f} ± {lat.ttft_ms.std:,.1f} ms",
            ]
        else:
            row += ["—", "—"]
        row += [human_size(r.peak_rss), str(r.threads or "—"), r.provider or "—"]
        rows.append(row)
    return header, rows


def check_rows(result: CheckResult) -> list[tuple[str, str]]:
    """A single check as (name, value) rows for a person, in llama.cpp's vocabulary."""
    rows = [
        (
            "artifact",
            f"{result.artifact} ({result.format}, {result.quant or 'quantization unknown'}, "
            f"{human_size(result.file_size)})",
        ),
        (
            "ran in",
            f"{result.runtime} on {result.device}"
            + (f" ({result.provider})" if result.provider else "")
            + (f", {result.threads} threads" if result.threads else ""),
        ),
    ]
    ref = result.reference
    if ref is not None:
        rows.append(
            (
                "reference",
                f"{ref.path} ({ref.runtime} on {ref.device}); {ref.text_source}: {ref.windows} windows "
                f"of {ref.ctx} tokens, {ref.positions:,} scored",
            )
        )
    if result.tokenizer is not None:
        rows.append(
            (
                "tokenizer",
                "the same ids as the reference"
                if result.tokenizer.match
                else f"DIFFERS: {result.tokenizer.detail}",
            )
        )
    acc = result.accuracy
    if acc is not None:
        rows += [
            ("PPL(base)", f"{acc.ppl_ref.value:.4f} ± {acc.ppl_ref.error:.4f}"),
            ("PPL(Q)", f"{acc.ppl.value:.4f} ± {acc.ppl.error:.4f}"),
            ("PPL(Q)/PPL(base)", f"{acc.ppl_ratio.value:.6f} ± {acc.ppl_ratio.error:.6f}"),
            ("Mean KLD", f"{acc.kld_mean.value:.6f} ± {acc.kld_mean.error:.6f}"),
            ("Median / 99.0% / Maximum KLD", f"{acc.kld_median:.6f} / {acc.kld_p99:.6f} / {acc.kld_max:.6f}"),
            ("Same top p", f"{100 * acc.same_top_p.value:.3f} ± {100 * acc.same_top_p.error:.3f} %"),
            ("RMS Δp", f"{100 * acc.rms_dp.value:.3f} ± {100 * acc.rms_dp.error:.3f} %"),
        ]
    lat = result.latency
    if lat is not None:
        rows += [
            (f"pp{lat.pp_tokens}", f"{lat.pp_tps.mean:,.1f} ± {lat.pp_tps.std:,.1f} t/s"),
            (f"tg{lat.tg_tokens}", f"{lat.tg_tps.mean:,.1f} ± {lat.tg_tps.std:,.1f} t/s"),
            ("time to first token", f"{lat.ttft_ms.mean:,.1f} ± {lat.ttft_ms.std:,.1f} ms"),
            (
                "load cold / warm",
                f"{lat.load_cold_s * 1000:,.0f} ms / {lat.load_warm_s.mean * 1000:,.0f} ± "
                f"{lat.load_warm_s.std * 1000:,.0f} ms",
            ),
        ]
    rows.append(("peak RSS", human_size(result.peak_rss)))
    for gate in result.gates:
        if gate.name != "tokenizer":
            rows.append(("gate", ("pass  " if gate.passed else "FAIL  ") + gate.message))
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(
    checkpoint: Path,
    reference: ReferenceInfo,
    results: Sequence[CheckResult],
    charts: Sequence[Path],
    charts_note: str | None,
) -> str:
    """report.md: the table first, then what was measured and how, the details, and the charts."""
    main = _markdown_table(*table_rows(results))
    details = _markdown_table(*detail_rows(results))
    tokenizer_notes = [
        f"- **{r.target}**: its tokenizer differs from the reference's: {r.tokenizer.detail}"
        for r in results
        if r.tokenizer is not None and not r.tokenizer.match
    ]
    lines = [
        f"# {checkpoint.name}: edge formats against the reference",
        "",
        main,
        "",
        f"Reference: `{reference.path}` in {reference.runtime} on {reference.device} (sha256 "
        f"{reference.sha256[:12]}…). Text: {reference.text_source}, {reference.text_tokens:,} tokens; "
        f"{reference.windows} windows of {reference.ctx} tokens, the second half of each scored: "
        f"{reference.positions:,} positions.",
        "",
        "PPL ratio = PPL(target)/PPL(reference); mean KLD = KL(reference ‖ target) of the next-token "
        "distributions in nats; same top p = how often both models' most likely next token agree; pp and tg "
        "= prefill and decode tokens/s (llama-bench style, mean ± std). GGUF files run in llama.cpp with an "
        "F32 KV cache, so that only the weights' quantization is measured.",
        "",
        *(["## Tokenizers", "", *tokenizer_notes, ""] if tokenizer_notes else []),
        "## Details",
        "",
        "± is one standard error for the accuracy metrics (as llama-perplexity prints them) and one standard "
        "deviation for times. Load cold = the first load in a fresh process, including importing the "
        "runtime's library; warm = a reload. TTFT = prefill of the pp prompt and the choice of the first "
        "token. Peak RSS = that process's resident memory high-water mark (Python, numpy and the reference's "
        "log-probs included).",
        "",
        details,
        "",
        "## Charts",
        "",
    ]
    if charts:
        lines += [f"![{p.stem}]({p.name})" for p in charts]
    else:
        lines.append(charts_note or "No chart: no target has both an accuracy and a speed.")
    return "\n".join(lines) + "\n"


def report_record(
    checkpoint: Path, reference: ReferenceInfo, results: Sequence[CheckResult], settings: dict[str, Any]
) -> dict[str, Any]:
    """report.json: schema name, versions, machine, settings, reference, and one record per target (the
    same record `edgelm check --json` prints)."""
    from edgelm import __version__

    return {
        "schema": SCHEMA,
        "edgelm_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": dict(settings),
        "reference": dataclasses.asdict(reference),
        "targets": [r.to_dict() for r in results],
    }


def write_charts(results: Sequence[CheckResult], out: Path) -> tuple[tuple[Path, ...], str | None]:
    """kld_vs_size.png and tg_vs_kld.png (the Pareto view); none, with the reason, without matplotlib."""
    points = [r for r in results if r.error is None and r.accuracy is not None]
    if not points:
        return (), "No chart: no target was checked."
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (), "No charts: they need matplotlib (pip install matplotlib, or edgelm's torch extra)."

    kld = [max(r.accuracy.kld_mean.value, 0.0) for r in points]
    threshold = min([k for k in kld if k > 0], default=1e-6) / 2
    palette = {"checkpoint": "tab:gray", "gguf": "tab:blue", "onnx": "tab:green"}
    paths = []

    def scatter(ax: Any, chosen: Sequence[CheckResult], xs: list[float], ys: list[float]) -> None:
        """One color per format (legend), each point labelled with its target."""
        for kind in dict.fromkeys(r.format for r in chosen):
            mine = [i for i, r in enumerate(chosen) if r.format == kind]
            label = "torch (reference)" if kind == "checkpoint" else kind
            color = palette.get(kind or "", "tab:purple")
            ax.scatter([xs[i] for i in mine], [ys[i] for i in mine], color=color, label=label, zorder=3)
        for r, x, y in zip(chosen, xs, ys, strict=True):
            ax.annotate(r.target, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.legend(fontsize=8)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sizes = [(r.file_size or 0) / 1e6 for r in points]
    scatter(ax, points, sizes, kld)
    ax.set_yscale("symlog", linthresh=threshold)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KLD (nats, lower is better)")
    ax.set_title("accuracy against size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(out / "kld_vs_size.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    timed = [(r, k) for r, k in zip(points, kld, strict=True) if r.latency is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [k for _, k in timed]
        ys = [r.latency.tg_tps.mean for r, _ in timed]
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", drawstyle="steps-post")
        scatter(ax, [r for r, _ in timed], xs, ys)
        ax.set_xscale("symlog", linthresh=threshold)
        ax.set_xlabel("mean KLD (nats, lower is better)")
        ax.set_ylabel(f"tg{timed[0][0].latency.tg_tokens} tokens/s (higher is better)")
        ax.set_title("decode speed against accuracy (orange: the Pareto front)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        paths.append(out / "tg_vs_kld.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return tuple(paths), None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (error, speed) that no other point beats on both, by increasing error."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def print_table(results: Sequence[CheckResult], console: Any = None) -> None:
    """The main table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    header, rows = table_rows(results)
    table = Table(*header)
    for column in table.columns[:2]:
        column.no_wrap = True
    for column in table.columns[2:]:
        column.justify = "right"
    for row, result in zip(rows, results, strict=True):
        style = "red" if result.error or (result.tokenizer and not result.tokenizer.match) else None
        table.add_row(*(Text(cell) for cell in row), style=style)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: wide enough that nothing is cut
            console = Console(width=160)
    console.print(table)
