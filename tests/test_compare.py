"""`edgelm compare`: every target against one reference, a failed target as a row, the report's schema."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT

from edgelm.errors import EdgelmError
from edgelm.evaluation import compare as comparison
from edgelm.evaluation.check import CheckResult
from edgelm.evaluation.compare import Comparison, compare, default_targets, export_target, parse_target
from edgelm.evaluation.progress import ProgressDisplay
from edgelm.evaluation.reference import EvaluationText, Reference, compute_reference
from edgelm.evaluation.report import pareto_front, place_labels, write_charts

# the report.json schema, written out so that any change to it is a deliberate one
TOP_KEYS = {
    "schema",
    "edgelm_version",
    "created",
    "checkpoint",
    "machine",
    "settings",
    "reference",
    "targets",
}
RECORD_KEYS = {
    "target",
    "status",
    "passed",
    "error",
    "artifact",
    "format",
    "quant",
    "runtime",
    "device",
    "provider",
    "threads",
    "file_size",
    "peak_rss",
    "tokenizer",
    "accuracy",
    "latency",
    "gates",
    "reference",
}
TOKENIZER_KEYS = {"match", "reference_tokens", "target_tokens", "first_difference", "detail"}
ACCURACY_KEYS = {
    "positions",
    "ppl_ref",
    "ppl",
    "ppl_ratio",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "kld_max",
    "same_top_p",
    "rms_dp",
}
ESTIMATES = {"ppl_ref", "ppl", "ppl_ratio", "kld_mean", "same_top_p", "rms_dp"}
LATENCY_KEYS = {"load_cold_s", "load_warm_s", "pp_tokens", "pp_tps", "tg_tokens", "tg_tps", "ttft_ms"}
TIMINGS = {"load_warm_s", "pp_tps", "tg_tps", "ttft_ms"}
GATE_KEYS = {"name", "limit", "value", "passed", "message"}
REFERENCE_KEYS = {
    "path",
    "sha256",
    "runtime",
    "device",
    "text_source",
    "text_sha256",
    "text_tokens",
    "ctx",
    "windows",
    "positions",
    "cache",
}


@pytest.fixture(scope="module")
def compared(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """One comparison of the trained tiny model, each target in its own process, with two bad targets."""
    out = tmp_path_factory.mktemp("report")
    broken = out.parent / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 64)
    targets = ["torch", "gguf:q8_0", "gguf:q4_0", "onnx:int8", "onnx:int4", "gguf:q3_x", str(broken)]
    return compare(trained_run, out, targets, windows=4, repetitions=1, show_progress=False)


def by_target(result: Comparison) -> dict[str, CheckResult]:
    return {r.target: r for r in result.results}


@pytest.mark.slow
def test_every_target_against_one_reference(compared: Comparison) -> None:
    results = by_target(compared)
    torch, q8, q4 = results["torch"].accuracy, results["gguf:q8_0"].accuracy, results["gguf:q4_0"].accuracy
    assert torch.kld_mean.value == 0 and torch.same_top_p.value == 1 and torch.ppl_ratio.value == 1
    assert q4.kld_mean.value > q8.kld_mean.value > 0
    assert q4.same_top_p.value <= q8.same_top_p.value < 1
    assert len({r.accuracy.ppl_ref.value for r in compared.results if r.accuracy}) == 1  # one reference
    for name in ("torch", "gguf:q8_0", "gguf:q4_0"):
        r = results[name]
        assert r.passed and r.tokenizer.match and r.latency.tg_tps.mean > 0 and r.peak_rss > 0
        assert r.threads >= 1 and r.latency.load_warm_s.runs == 1
    assert results["gguf:q8_0"].runtime == "llamacpp" and results["torch"].runtime == "torch"
    assert results["gguf:q4_0"].file_size < results["gguf:q8_0"].file_size < results["torch"].file_size
    assert Path(results["gguf:q4_0"].artifact).parent == compared.report_md.parent  # exported into --out


@pytest.mark.slow
def test_failed_targets_are_rows(compared: Comparison) -> None:
    failed = [r for r in compared.results if r.error]
    assert [r.target.rsplit("/", 1)[-1] for r in failed] == ["gguf:q3_x", "broken.gguf"]
    assert "unknown gguf level" in failed[0].error and "q4_k_m" in failed[0].error
    assert "broken.gguf" in failed[1].error
    assert all(not r.passed and r.accuracy is None for r in failed)
    text = compared.report_md.read_text()
    assert "| gguf:q3_x |" in text and "failed: " in text


@pytest.mark.slow
def test_onnx_int4_is_further_than_int8(compared: Comparison) -> None:
    results = by_target(compared)
    int8, int4 = results["onnx:int8"], results["onnx:int4"]
    assert int8.error is None and int4.error is None, (int8.error, int4.error)
    assert int4.accuracy.kld_mean.value > int8.accuracy.kld_mean.value > 0
    assert int8.runtime == "onnxruntime" and int8.quant == "int8" and int8.provider
    assert int4.file_size < int8.file_size


@pytest.mark.slow
def test_report_json_schema_is_stable(compared: Comparison) -> None:
    report = json.loads(compared.report_json.read_text())
    assert set(report) == TOP_KEYS and report["schema"] == "edgelm.compare/1"
    assert set(report["reference"]) == REFERENCE_KEYS and report["reference"]["positions"] == 4 * 63
    assert [r["target"] for r in report["targets"]] == [r.target for r in compared.results]
    for record in report["targets"]:
        assert set(record) == RECORD_KEYS
        if record["status"] == "failed":
            assert isinstance(record["error"], str) and record["accuracy"] is None and not record["passed"]
            continue
        assert set(record["tokenizer"]) == TOKENIZER_KEYS and set(record["accuracy"]) == ACCURACY_KEYS
        assert set(record["latency"]) == LATENCY_KEYS and set(record["reference"]) == REFERENCE_KEYS
        assert all(set(record["accuracy"][k]) == {"value", "error"} for k in ESTIMATES)
        assert all(set(record["latency"][k]) == {"mean", "std", "runs"} for k in TIMINGS)
        assert all(set(g) == GATE_KEYS for g in record["gates"])
        assert record["format"] in ("checkpoint", "gguf", "onnx") and record["runtime"] and record["device"]


@pytest.mark.slow
def test_report_markdown_and_charts(compared: Comparison, monkeypatch: pytest.MonkeyPatch) -> None:
    text = compared.report_md.read_text()
    header = "| target | runtime | size | PPL ratio | mean KLD | same top p | pp128 t/s | tg128 t/s |"
    assert text.splitlines()[2] == header
    assert "| torch | torch · cpu |" in text and "| 1.0000 | 0 | 100.0 % |" in text
    assert [p.name for p in compared.charts] == ["kld_vs_size.png", "tg_vs_kld.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in compared.charts)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    charts, note = write_charts(compared.results, compared.report_md.parent)
    assert charts == () and "matplotlib" in note


def test_targets_and_their_availability(monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> None:
    assert parse_target("gguf:Q4_K_M").level == "q4_k_m" and parse_target("torch").format == "torch"
    assert parse_target(str(checkpoint)).path == checkpoint
    for bad in ("gguf", "tflite:int8", "onnx:"):
        with pytest.raises(EdgelmError, match="FORMAT:LEVEL"):
            parse_target(bad)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        comparison.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    assert not any(t.startswith("onnx:") for t in default_targets()) and "torch" in default_targets()
    with pytest.raises(EdgelmError, match=r"onnxruntime is not installed.*edgelm\[onnx\]"):
        export_target(parse_target("onnx:int4"), checkpoint, checkpoint.parent)
    with pytest.raises(EdgelmError, match=r"gguf:q9_9: unknown gguf level; choose one of .*q4_k_m"):
        export_target(parse_target("gguf:q9_9"), checkpoint, checkpoint.parent)


def test_importing_the_comparison_needs_no_exporter_dependency() -> None:
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in ("onnx", "onnxruntime", "gguf", "llama_cpp"))
    code = f"import sys; {blocked}; import edgelm.evaluation.compare; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path.cwd())
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


class Abort:
    """Unpickled in the check's process, it kills that process (SIGABRT), as a crashing runtime would."""

    def __reduce__(self) -> tuple:
        return (os.abort, ())


def test_a_crashing_check_is_a_failed_row(checkpoint: Path, tmp_path: Path) -> None:
    display = ProgressDisplay(False, [])
    reference = checking_reference(checkpoint, tmp_path)
    log = tmp_path / "logs" / "crash.log"
    result = comparison._check_in_child("crash", checkpoint, reference, {"crash": Abort()}, log, display)
    assert result.error.startswith("the check's process died (signal SIGABRT)") and not result.passed
    assert result.reference == reference.info and result.accuracy is None


def checking_reference(checkpoint: Path, tmp_path: Path) -> Reference:
    text = tmp_path / "eval.txt"
    text.write_text(SAMPLE_TEXT * 12)
    return compute_reference(checkpoint, EvaluationText.from_file(text), windows=1, cache_dir=tmp_path)


def test_pareto_front() -> None:
    points = [(0.0, 10.0), (0.1, 30.0), (0.05, 20.0), (0.2, 25.0), (0.3, 40.0)]  # (KLD, tokens/s)
    assert pareto_front(points) == [0, 2, 1, 4]
    sizes = [(5.0, -0.001), (1.2, -0.004), (1.1, -0.02), (1.3, -0.003), (2.0, -0.005)]  # (MB, -KLD)
    assert pareto_front(sizes) == [2, 1, 3, 0]


def test_labels_of_crowded_points_do_not_overlap() -> None:
    """Eight targets of nearly one size and KLD (a compare of q4 levels): each label moves until it covers
    no other label and no point, inside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [1.0, 1.02, 1.04, 1.01, 1.03, 2.0, 2.01, 3.0]
    ys = [0.5, 0.51, 0.49, 0.52, 0.5, 0.2, 0.21, 0.1]
    ax.scatter(xs, ys)
    ax.set_xlim(0.5, 3.5)
    ax.set_ylim(0, 1)
    notes = place_labels(ax, [f"gguf:q4_level_{i}" for i in range(len(xs))], xs, ys)
    renderer = fig.canvas.get_renderer()
    boxes = [note.get_window_extent(renderer) for note in notes]
    assert len(notes) == len(xs)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)


def test_command_line(checkpoint: Path, tmp_path: Path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text(SAMPLE_TEXT * 12)
    base = [sys.executable, "-m", "edgelm", "compare", str(checkpoint), "--text", str(text)]
    targets = "torch,gguf:q8_0"
    command = [
        *base,
        "--targets",
        targets,
        "--windows",
        "2",
        "--repetitions",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "targets checked; report: " in result.stdout and (tmp_path / "r" / "report.json").is_file()
    records = json.loads((tmp_path / "r" / "report.json").read_text())["targets"]
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    assert records[0]["accuracy"]["kld_mean"]["value"] == 0

    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    result = subprocess.run([*base[:-1], str(short), "--targets", "torch"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("edgelm: error: ")
    assert "fewer than one window" in result.stderr and len(result.stderr.strip().splitlines()) == 1
