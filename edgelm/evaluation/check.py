"""The shared check: one artifact against a reference, for accuracy and speed, through the Runtime protocol.

    text ──reference tokenizer──▶ ids ──▶ windows ──reference runtime──▶ log-probs (cached on disk)
                                              │                                 │
                                              └──target runtime──▶ log-probs ──┴──▶ Accuracy
    target runtime ──▶ load / pp / tg / time to first token ──▶ Latency

**Evaluation text.** By default the held-out split of the built-in corpus (the documents a model trained on
the built-in corpus never saw; the split of the run's trainer_state.json when it has one); or any UTF-8 file.
It is tokenized once, by the reference's tokenizer, and every target sees the same ids. Each target's own
tokenizer also encodes the text; if it gives other ids, the check reports where (a failed `tokenizer` gate)
rather than silently accepting a model that would see different tokens in use.

**Windows.** Non-overlapping chunks of `ctx` tokens (default: the reference's context length) spread evenly
over the text; the first token of each becomes BOS when the tokenizer adds one, as in llama-perplexity. As
there, only the second half of each window is scored — positions ctx/2 … ctx−2, each predicting the next
token — so that every scored token has at least half a context before it; PPL is therefore comparable with
what `llama-perplexity -c ctx` prints. The first half is fed in one call (logits of the last token only),
the scored half in chunks with all logits: the KV-cache path of every runtime is exercised.

**Reference cache.** The reference's log-probabilities at the scored positions are stored in full, as
float32: windows × (ctx/2 − 1) × vocab values (16 × 127 × 4096 × 4 bytes = 33 MB for the tiny preset),
so KL divergence is exact (no top-k truncation, which misjudges the flat distributions of small models) and
a target identical to the reference gets KLD 0 exactly. The cache lives in `<reference>/.edgelm-cache/`,
keyed by the reference's hash, the text's hash, ctx, window count, runtime and device; a reference that
would need more than 2 GiB is refused with a hint to lower --ctx or --windows.

**llama.cpp** runs with `kv_cache="f32"`, so that a GGUF file's KV cache (F16 by default) does not add its
own error to the quantization of its weights.

**Latency** is measured llama-bench style after one warm-up round: pp (prefill of min(512, ctx) tokens) and
tg128 (128 tokens decoded one at a time from an empty context) in tokens/s, and the time to first token
(prefill of the pp prompt plus the choice of the first token), each mean ± std over `repetitions` runs.
Load time is cold (the first load in the process that runs the check — with `edgelm compare` a fresh
process, so it includes importing the runtime's library) and warm (mean ± std of `repetitions` reloads).
Peak RSS is the resident-memory high-water mark of that process while the target ran (on Linux reset before
the target loads; elsewhere the process's lifetime peak).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.evaluation.memory import peak_rss_bytes, reset_peak_rss
from edgelm.evaluation.metrics import (
    Accuracy,
    PositionStats,
    Timing,
    accuracy,
    position_stats,
    timing,
)
from edgelm.evaluation.reference import (
    EvaluationText,
    Progress,
    Reference,
    ReferenceInfo,
    compute_reference,
    open_checked,
    scored_log_probs,
)
from edgelm.formats.artifact import artifact_kind
from edgelm.formats.onnx import read_provenance
from edgelm.runtimes.base import Runtime
from edgelm.tokenizer import Tokenizer

PP_TOKENS = 512
TG_TOKENS = 128


# ---------------------------------------------------------------------------------------------------------
# the target


@dataclass(frozen=True)
class TokenizerCheck:
    """Whether the target's own tokenizer encodes the evaluation text as the reference's does."""

    match: bool
    reference_tokens: int
    target_tokens: int
    first_difference: int | None  # index of the first token that differs
    detail: str | None  # what differs there, for a person


def compare_tokenizers(reference_ids: np.ndarray, tokenizer: Tokenizer, text: str) -> TokenizerCheck:
    """Encode `text` with `tokenizer` and compare with the reference's ids."""
    ours = np.asarray(tokenizer.encode(text), dtype=np.int64)
    ref = np.asarray(reference_ids, dtype=np.int64)
    n = min(ours.size, ref.size)
    differ = np.flatnonzero(ours[:n] != ref[:n])
    if differ.size == 0 and ours.size == ref.size:
        return TokenizerCheck(True, int(ref.size), int(ours.size), None, None)
    first = int(differ[0]) if differ.size else n
    ref_piece = repr(text_of(tokenizer, ref[first : first + 1]))
    our_piece = repr(text_of(tokenizer, ours[first : first + 1]))
    detail = (
        f"{ref.size} reference tokens, {ours.size} from the target's tokenizer; they part at token {first}: "
        f"reference id {ref[first] if first < ref.size else '(end)'}, "
        f"target id {ours[first] if first < ours.size else '(end)'} {our_piece} (reference text {ref_piece})"
    )
    return TokenizerCheck(False, int(ref.size), int(ours.size), first, detail)


def text_of(tokenizer: Tokenizer, ids: np.ndarray) -> str:
    """Decoded ids, or '' for ids outside the tokenizer's vocabulary."""
    try:
        return tokenizer.decode(int(i) for i in ids)
    except EdgelmError:
        return ""


def evaluate(runtime: Runtime, reference: Reference, progress: Progress | None = None) -> Accuracy:
    """The accuracy statistics of a loaded runtime on the reference's windows."""
    ctx = reference.windows.shape[1]
    if runtime.config.max_position_embeddings < ctx:
        raise EdgelmError(
            f"the target's context is {runtime.config.max_position_embeddings} tokens, shorter than the "
            f"evaluation window of {ctx}; use a smaller ctx"
        )
    blocks = []
    for i, window in enumerate(reference.windows):
        if progress:
            progress("accuracy", i, len(reference.windows))
        logp = scored_log_probs(runtime, window)
        if logp.shape != reference.logp.shape[1:]:
            raise EdgelmError(
                f"the target gives logits over {logp.shape[-1]} tokens, the reference over "
                f"{reference.logp.shape[-1]}; they do not share a vocabulary"
            )
        blocks.append(position_stats(reference.logp[i], logp, reference.next_ids(i)))
    if progress:
        progress("accuracy", len(reference.windows), len(reference.windows))
    return accuracy(PositionStats.concatenate(blocks))


# ---------------------------------------------------------------------------------------------------------
# latency


@dataclass(frozen=True)
class Latency:
    """llama-bench-style speed of one runtime, and its load times."""

    load_cold_s: float  # first load in the process
    load_warm_s: Timing  # reloads
    pp_tokens: int  # prompt length of "pp"
    pp_tps: Timing  # prefill tokens/s
    tg_tokens: int  # tokens of "tg"
    tg_tps: Timing  # decode tokens/s
    ttft_ms: Timing  # prefill of the pp prompt + first token


def speed_round(runtime: Runtime, prompt: Sequence[int], decode: Sequence[int]) -> tuple[float, float, float]:
    """One llama-bench round: (pp tokens/s, tg tokens/s, time to first token in s).

    pp: prefill of `prompt` from an empty sequence; time to first token: the same prefill and the choice of
    the first token from its logits; tg: the tokens of `decode` fed one at a time from an empty sequence.
    """
    runtime.reset()
    start = time.perf_counter()
    runtime.forward(prompt)
    prefill = time.perf_counter() - start
    runtime.reset()
    start = time.perf_counter()
    int(np.argmax(runtime.forward(prompt)[-1]))
    first_token = time.perf_counter() - start
    runtime.reset()
    start = time.perf_counter()
    for token in decode:
        runtime.forward([token])
    generate = time.perf_counter() - start
    return len(prompt) / prefill, len(decode) / generate, first_token


def bench_tokens(window: np.ndarray, context: int) -> tuple[list[int], list[int]]:
    """The pp prompt (min(512, ctx) tokens) and the tg tokens (min(128, ctx) tokens) from a window."""
    tokens = np.asarray(window).tolist()
    prompt = tokens[: min(PP_TOKENS, context, len(tokens))]
    n_tg = min(TG_TOKENS, context)
    decode = [tokens[i % len(tokens)] for i in range(n_tg)]
    return prompt, decode


def measure_speed(
    runtime: Runtime,
    prompt: Sequence[int],
    decode: Sequence[int],
    repetitions: int = 5,
    progress: Progress | None = None,
) -> tuple[Timing, Timing, Timing]:
    """pp and tg tokens/s and the time to first token in ms, mean ± std over `repetitions` rounds after
    one warm-up round."""
    rounds = []
    for i in range(repetitions + 1):
        if progress:
            progress("latency", i, repetitions + 1)
        rounds.append(speed_round(runtime, prompt, decode))
    if progress:
        progress("latency", repetitions + 1, repetitions + 1)
    pp, tg, ttft = zip(*rounds[1:], strict=True)
    return timing(pp), timing(tg), timing([t * 1000 for t in ttft])


# ---------------------------------------------------------------------------------------------------------
# check


@dataclass(frozen=True)
class Gate:
    """A pass/fail threshold and how the target fared."""

    name: str  # "max_kld", "min_top1", "max_ppl_ratio", "tokenizer"
    limit: float | None
    value: float | None
    passed: bool
    message: str


@dataclass(frozen=True)
class CheckResult:
    """One artifact checked against the reference. `error` is set (and accuracy/latency may be None) when
    the check could not run; `passed` is False then, as when the tokenizer differs or a gate fails."""

    target: str  # what was asked for: "gguf:q4_0", or the artifact's path
    artifact: str | None
    format: str | None  # "checkpoint", "gguf", "onnx"
    quant: str | None
    runtime: str | None
    device: str | None
    provider: str | None  # the execution provider that ran it, where the runtime has one
    threads: int | None
    file_size: int | None
    peak_rss: int | None
    reference: ReferenceInfo | None
    tokenizer: TokenizerCheck | None
    accuracy: Accuracy | None
    latency: Latency | None
    gates: tuple[Gate, ...] = ()
    error: str | None = None

    @property
    def passed(self) -> bool:
        """No error, the same tokens, and every gate passed."""
        return self.error is None and all(g.passed for g in self.gates)

    def failures(self) -> list[str]:
        """One line for each reason the check did not pass."""
        lines = [f"error: {self.error}"] if self.error else []
        return lines + [g.message for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (see RECORD_KEYS): plain types, nested groups None when absent."""
        record = dataclasses.asdict(self)
        record["gates"] = [dataclasses.asdict(g) for g in self.gates]
        record["status"] = "ok" if self.error is None else "failed"
        record["passed"] = self.passed
        return {key: record[key] for key in RECORD_KEYS}

    @classmethod
    def failed(cls, target: str, error: str, **known: Any) -> CheckResult:
        """A result for a target whose check could not run."""
        fields = {f.name: None for f in dataclasses.fields(cls)} | {"gates": (), "target": target}
        return cls(**{**fields, **known, "error": error})


RECORD_KEYS = (
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
)


def gates(
    result_accuracy: Accuracy | None,
    tokenizer: TokenizerCheck | None,
    max_kld: float | None = None,
    min_top1: float | None = None,
    max_ppl_ratio: float | None = None,
) -> tuple[Gate, ...]:
    """The tokenizer gate (always) and the threshold gates that were given."""
    found: list[Gate] = []
    if tokenizer is not None:
        found.append(
            Gate(
                "tokenizer",
                None,
                None,
                tokenizer.match,
                "tokenizer: the same ids as the reference"
                if tokenizer.match
                else f"tokenizer: differs from the reference's ({tokenizer.detail})",
            )
        )
    if result_accuracy is None:
        return tuple(found)
    checks = (
        ("max_kld", max_kld, result_accuracy.kld_mean.value, "mean KLD", lambda v, lim: v <= lim),
        ("min_top1", min_top1, result_accuracy.same_top_p.value, "same top p", lambda v, lim: v >= lim),
        (
            "max_ppl_ratio",
            max_ppl_ratio,
            result_accuracy.ppl_ratio.value,
            "PPL(Q)/PPL(base)",
            lambda v, lim: v <= lim,
        ),
    )
    for name, limit, value, label, ok in checks:
        if limit is None:
            continue
        passed = bool(ok(value, limit))
        relation = ("≤" if passed else ">") if name != "min_top1" else ("≥" if passed else "<")
        found.append(
            Gate(
                name, float(limit), float(value), passed, f"{name}: {label} {value:.6g} {relation} {limit:g}"
            )
        )
    return tuple(found)


def check(
    artifact: str | Path,
    reference: str | Path | Reference,
    text: str | Path | EvaluationText | None = None,
    *,
    ctx: int | None = None,
    windows: int | None = None,
    repetitions: int = 5,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    max_kld: float | None = None,
    min_top1: float | None = None,
    max_ppl_ratio: float | None = None,
    target: str | None = None,
    quant: str | None = None,
    progress: Progress | None = None,
) -> CheckResult:
    """Check `artifact` (a checkpoint, GGUF file or ONNX folder) against `reference` on `text`.

    `reference`: a checkpoint (or any artifact; run with its usual runtime on `device`), or a `Reference`
    already computed (which brings its own text and windows: `text`, `ctx`, `windows` and `cache_dir` are
    then not used). `text`: a UTF-8 file or an `EvaluationText`; by default the held-out split of the
    built-in corpus. `repetitions=0` skips the latency measurement. `runtime`, `device`, `threads` and
    `options` choose how the artifact runs (llama.cpp gets `kv_cache="f32"` unless `options` say otherwise).
    The gates (`max_kld`, `min_top1` as a fraction, `max_ppl_ratio`) decide `passed` with the tokenizer
    check. Bad input (an artifact that does not load, an empty or too short text) raises `EdgelmError`.
    """
    check_limits(repetitions, max_kld, min_top1, max_ppl_ratio)
    path = Path(artifact)
    kind = artifact_kind(path)
    if not isinstance(reference, Reference):
        evaluation = (
            text if isinstance(text, EvaluationText) or text is None else EvaluationText.from_file(text)
        )
        reference = compute_reference(
            reference,
            evaluation,
            ctx,
            windows,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
            threads=threads,
        )
    known: dict[str, Any] = {
        "artifact": str(path),
        "format": kind,
        "quant": quant or artifact_quant(path, kind),
        "file_size": artifact_size(path, kind),
        "reference": reference.info,
    }

    def load() -> Runtime:
        return open_checked(path, runtime, device, threads, options or {}, reference.windows.shape[1])

    measured = measure_target(load, reference, repetitions, progress)
    return CheckResult(
        target=target or str(path),
        peak_rss=peak_rss_bytes(),
        tokenizer=measured.tokenizer,
        accuracy=measured.accuracy,
        latency=measured.latency,
        gates=gates(measured.accuracy, measured.tokenizer, max_kld, min_top1, max_ppl_ratio),
        **known,
        **measured.runtime,
    )


def check_limits(
    repetitions: int, max_kld: float | None, min_top1: float | None, max_ppl_ratio: float | None
) -> None:
    """Refuse a negative repetition count and gates that are not numbers ≥ 0 (min_top1 a fraction)."""
    if not isinstance(repetitions, int) or repetitions < 0:
        raise EdgelmError(f"repetitions={repetitions!r} must be 0 or more")
    for name, limit in (("max_kld", max_kld), ("min_top1", min_top1), ("max_ppl_ratio", max_ppl_ratio)):
        if limit is not None and not limit >= 0:
            raise EdgelmError(f"{name}={limit!r} must be a number ≥ 0")
    if min_top1 is not None and min_top1 > 1:
        raise EdgelmError(f"min_top1={min_top1} is a fraction: 0.9 means 90 % of positions")


@dataclass(frozen=True)
class Measured:
    """What running the target gave: how it ran, its tokenizer check, accuracy and latency."""

    runtime: dict[str, Any]  # the CheckResult fields runtime, device, provider, threads
    tokenizer: TokenizerCheck
    accuracy: Accuracy
    latency: Latency | None


def measure_target(
    load: Callable[[], Runtime], reference: Reference, repetitions: int, progress: Progress | None
) -> Measured:
    """Load the target cold (peak RSS reset first), check its tokenizer and accuracy, measure its speed
    and then its warm reloads (none when `repetitions` is 0)."""
    reset_peak_rss()
    if progress:
        progress("load", 0, 1)
    start = time.perf_counter()
    rt = load()
    load_cold = time.perf_counter() - start
    try:
        facts = {
            "runtime": rt.name,
            "device": rt.device,
            "provider": rt.provider,
            "threads": rt.threads,
        }
        tokenizer = compare_tokenizers(reference.text_ids, rt.tokenizer, reference.text.text)
        result_accuracy = evaluate(rt, reference, progress)
        speeds = None
        if repetitions:
            prompt, decode = bench_tokens(reference.windows[0], rt.config.max_position_embeddings)
            speeds = measure_speed(rt, prompt, decode, repetitions, progress)
    finally:
        rt.close()
    warm = warm_loads(load, repetitions, progress)
    latency = None
    if speeds is not None:
        pp, tg, ttft = speeds
        latency = Latency(load_cold, timing(warm), len(prompt), pp, len(decode), tg, ttft)
    return Measured(facts, tokenizer, result_accuracy, latency)


def warm_loads(load: Callable[[], Runtime], repetitions: int, progress: Progress | None) -> list[float]:
    """Seconds of each of `repetitions` reloads of the target."""
    warm = []
    for i in range(repetitions):
        if progress:
            progress("load", i, repetitions)
        start = time.perf_counter()
        again = load()
        warm.append(time.perf_counter() - start)
        again.close()
    return warm


def artifact_size(path: Path, kind: str | None = None) -> int:
    """Bytes on disk: a file's size; a checkpoint's config, weights and tokenizer files; an ONNX folder's
    files (model, external data, tokenizer, configs)."""
    path = Path(path)
    kind = kind or artifact_kind(path)
    if path.is_file():
        return path.stat().st_size
    if kind == "checkpoint":
        from edgelm.checkpoint import weight_files

        files = {*weight_files(path), *(p for p in path.glob("*.json") if p.is_file())}
        return sum(p.stat().st_size for p in files)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def artifact_quant(path: Path, kind: str | None = None) -> str | None:
    """The quantization an artifact says it has: a GGUF file's edgelm.quantization (or llama.cpp file
    type), an ONNX folder's edgelm.json, "fp32" for a checkpoint (the torch runtime runs it in float32)."""
    kind = kind or artifact_kind(path)
    if kind == "checkpoint":
        return "fp32"
    if kind == "gguf":
        from edgelm.formats.gguf import file_type_name
        from edgelm.formats.gguf_reader import read_gguf

        metadata = read_gguf(path).metadata
        if isinstance(metadata.get("edgelm.quantization"), str):
            return metadata["edgelm.quantization"]
        file_type = metadata.get("general.file_type")
        return file_type_name(file_type) if isinstance(file_type, int) else None
    info = read_provenance(Path(path))
    value = info.get("quant", info.get("quantization"))
    if isinstance(value, dict):
        value = next((value[k] for k in ("quant", "level", "method", "type", "name") if k in value), None)
    return str(value) if value is not None else None
