"""What `edgelm compare` and `edgelm check` show of check results: the table, report.md, report.json (schema
SCHEMA, one record per target) and the charts (KLD vs file size; decode tokens/s vs KLD, the Pareto view)."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgelm.evaluation.check import CheckResult
from edgelm.evaluation.reference import ReferenceInfo
from edgelm.files import human_size

SCHEMA = "edgelm.compare/1"


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
    from edgelm._version import __version__

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

    kld = [max(r.accuracy.kld_mean.value, 0.0) for r in points if r.accuracy is not None]
    threshold = min([k for k in kld if k > 0], default=1e-6) / 2
    sizes = [(r.file_size or 0) / 1e6 for r in points]
    paths = [out / "kld_vs_size.png"]
    axes = ("file size (MB)", "mean KLD (nats, lower is better)", "accuracy against size", "y", threshold)
    front = pareto_front([(size, -k) for size, k in zip(sizes, kld, strict=True)])
    _chart(plt, points, sizes, kld, front, paths[0], axes)
    timed = [(r, k) for r, k in zip(points, kld, strict=True) if r.latency is not None]
    if timed:
        xs = [k for _, k in timed]
        latencies = [r.latency for r, _ in timed if r.latency is not None]
        ys = [latency.tg_tps.mean for latency in latencies]
        paths.append(out / "tg_vs_kld.png")
        tg = f"tg{latencies[0].tg_tokens} tokens/s (higher is better)"
        axes = ("mean KLD (nats, lower is better)", tg, "decode speed against accuracy", "x", threshold)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        _chart(plt, [r for r, _ in timed], xs, ys, front, paths[1], axes)
    return tuple(paths), None


FORMAT_COLORS = {"checkpoint": "tab:gray", "gguf": "tab:blue", "onnx": "tab:green"}


def _chart(
    plt: Any,
    chosen: Sequence[CheckResult],
    xs: list[float],
    ys: list[float],
    front: list[int],
    path: Path,
    axes: tuple[str, str, str, str, float],
) -> None:
    """One scatter chart: a color per format (legend), the Pareto front joined in orange and its points
    ringed, each point labelled with its target (`place_labels`). axes: the x and y labels, the title, the
    axis on a symlog scale and its linear threshold."""
    xlabel, ylabel, title, symlog, threshold = axes
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    getattr(ax, f"set_{symlog}scale")("symlog", linthresh=threshold)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (orange: the Pareto front)")
    ax.grid(True, alpha=0.3)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", drawstyle="steps-post")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=160, facecolors="none", color="tab:orange")
    for kind in dict.fromkeys(r.format for r in chosen):
        mine = [i for i, r in enumerate(chosen) if r.format == kind]
        label = "torch (reference)" if kind == "checkpoint" else kind
        color = FORMAT_COLORS.get(kind or "", "tab:purple")
        ax.scatter([xs[i] for i in mine], [ys[i] for i in mine], color=color, label=label, zorder=3)
    ax.legend(fontsize=8)
    fig.tight_layout()  # before the labels are placed: it moves the axes
    place_labels(ax, [r.target for r in chosen], xs, ys)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# where a label may sit beside its point, in points: right, above, left, below, the corners; then further out
LABEL_OFFSETS = [
    (dx * r, dy * r)
    for r in (1, 2, 3)
    for dx, dy in ((5, -3), (-3, 6), (-5, -3), (-3, -12), (5, 6), (-5, 6), (5, -12), (-5, -12))
]


def place_labels(ax: Any, labels: Sequence[str], xs: Sequence[float], ys: Sequence[float]) -> list[Any]:
    """Annotate each point with its label at the first of LABEL_OFFSETS where the text stays inside the
    axes and covers no label placed before it and no point (the last offset when none is free); return
    the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for x, y in zip(xs, ys, strict=True)]
    placed: list[Any] = []
    for label, x, y in zip(labels, xs, ys, strict=True):
        for dx, dy in LABEL_OFFSETS:
            ha = "left" if dx > 0 else "right"
            note = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, ha=ha)
            box = note.get_window_extent(renderer).padded(1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            covers = any(box.overlaps(p.get_window_extent(renderer)) for p in placed) or any(
                box.contains(*dot) for dot in dots
            )
            if (inside and not covers) or (dx, dy) == LABEL_OFFSETS[-1]:
                break
            note.remove()
        placed.append(note)
    return placed


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) that no other point beats on both (lower cost, higher value), by
    increasing cost: (KLD, tokens/s), or (size, -KLD)."""
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
