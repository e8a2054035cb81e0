"""`edgelm check`: one artifact against a reference; exit 1 when a gate fails."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgelm.cli.flags import MODEL_HELP, add_evaluation


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `check` subcommand and its flags."""
    check = commands.add_parser(
        "check",
        help="check one artifact against a reference; exit 1 when a gate fails",
        description="Run a checkpoint, ONNX folder or GGUF file on the reference's token windows and "
        "compare: accuracy with llama-perplexity's statistics, and llama-bench-style speed. Exit status 1 "
        "when a gate fails (each failed gate is printed), when the artifact's tokenizer gives other ids "
        "than the reference's, or when the check cannot run.",
    )
    check.add_argument("artifact", help=MODEL_HELP)
    check.add_argument("--reference", required=True, help="the reference checkpoint directory")
    check.add_argument(
        "--runtime", default="auto", help="the artifact's runtime (default: auto, the usual one)"
    )
    check.add_argument("--max-kld", type=float, default=None, help="gate: mean KLD at most this (nats)")
    check.add_argument(
        "--min-top1", type=float, default=None, help="gate: same top p at least this fraction (0.9 = 90 %%)"
    )
    check.add_argument(
        "--max-ppl-ratio", type=float, default=None, help="gate: PPL(Q)/PPL(base) at most this"
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_evaluation(check)
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Check the artifact, print the result; exit 1 when a gate fails."""
    from edgelm.evaluation.check import check
    from edgelm.evaluation.progress import ProgressDisplay
    from edgelm.evaluation.report import check_rows

    with ProgressDisplay(True, ["check"]) as display:
        result = check(
            Path(args.artifact),
            Path(args.reference),
            Path(args.text) if args.text else None,
            ctx=args.ctx,
            windows=args.windows,
            repetitions=args.repetitions,
            runtime=args.runtime,
            device=args.device,
            threads=args.threads,
            cache_dir=args.cache_dir,
            max_kld=args.max_kld,
            min_top1=args.min_top1,
            max_ppl_ratio=args.max_ppl_ratio,
            progress=display.callback("check"),
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(f"{args.artifact} against {args.reference}"), show_header=False)
        for key, value in check_rows(result):
            table.add_row(key, Text(value))
        Console().print(table)
    if not result.passed:
        for line in result.failures():
            print(f"edgelm: check failed: {line}", file=sys.stderr)
        raise SystemExit(1)
