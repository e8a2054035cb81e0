"""`edgelm compare`: export a checkpoint to every format and check each against it."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgelm.cli.flags import add_evaluation


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `compare` subcommand and its flags."""
    compare = commands.add_parser(
        "compare",
        help="export a checkpoint to every format and check each against it",
        description="Export the checkpoint to each target, check each against the checkpoint itself on the "
        "same token windows (PPL ratio, KL divergence, same top p, RMS Δp; pp and tg tokens/s, load time, "
        "time to first token, peak memory), and write report.md, report.json and charts. Targets: "
        "FORMAT:LEVEL (gguf:q8_0, gguf:q4_k_m, onnx:int4, ...), torch (the checkpoint itself) or an "
        "existing artifact's path. A target that fails is a row with its error; the others go on.",
    )
    compare.add_argument("checkpoint", help="the reference checkpoint directory")
    compare.add_argument("--out", default=None, help="report folder (default: CHECKPOINT-report)")
    compare.add_argument(
        "--targets",
        default=None,
        help="comma-separated targets (default: every installed format at its usual levels)",
    )
    add_evaluation(compare)
    compare.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Export and check every target; print the table and where the report is."""
    from edgelm.evaluation.compare import compare
    from edgelm.evaluation.report import print_table

    targets = [t for t in args.targets.split(",") if t.strip()] if args.targets else None
    result = compare(
        Path(args.checkpoint),
        Path(args.out) if args.out else None,
        targets,
        Path(args.text) if args.text else None,
        ctx=args.ctx,
        windows=args.windows,
        repetitions=args.repetitions,
        device=args.device,
        threads=args.threads,
        cache_dir=args.cache_dir,
    )
    print_table(result.results)
    failed = sum(r.error is not None for r in result.results)
    print(
        f"{len(result.results) - failed} of {len(result.results)} targets checked; "
        f"report: {result.report_md} (and report.json{', charts' if result.charts else ''} beside it)"
    )
