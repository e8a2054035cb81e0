"""`edgelm train`: train a model and its tokenizer into a checkpoint folder."""

from __future__ import annotations

import argparse

from edgelm.errors import missing_dependency

# flags that override the preset's TrainConfig fields when given
CONFIG_FLAGS = (
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "context",
    "vocab_size",
    "eval_every",
    "val_fraction",
    "seed",
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `train` subcommand and its flags."""
    train = commands.add_parser(
        "train",
        help="train a model on a corpus",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a Llama-style model and its tokenizer. The output folder is a checkpoint "
        "(Hugging Face layout) that every other command accepts. Several processes or GPUs: "
        "torchrun --nproc_per_node N -m edgelm train ...",
    )
    train.add_argument(
        "--corpus",
        nargs="+",
        default=[],
        metavar="PATH",
        help="text files, folders or globs (.txt .md .py .jsonl with a 'text' field); "
        "default: the Python standard library's source files",
    )
    train.add_argument(
        "--preset",
        default="tiny",
        help="model size: tiny (~1.3M parameters, CPU minutes), small (~22M), base (~100M, GPU)",
    )
    train.add_argument("--out", default=None, help="run folder (default: runs/PRESET)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    train.add_argument("--batch-size", type=int, help="sequences per micro-step and process")
    train.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--warmup", type=int, help="warm-up steps before the cosine decay")
    train.add_argument("--context", type=int, help="context length (default: the preset's)")
    train.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size (default: the preset's)")
    train.add_argument("--eval-every", type=int, help="steps between validation and checkpoints")
    train.add_argument("--val-fraction", type=float, help="share of documents held out for validation")
    train.add_argument("--seed", type=int, help="seed for initialisation and batches")
    train.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings (only --steps and "
        "--device may change)",
    )
    mode.add_argument("--overwrite", action="store_true", help="start again in a folder that holds a run")
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Train (or resume) and print the final losses."""
    try:
        from edgelm.training.train import TrainConfig, resume, train
    except ModuleNotFoundError as e:
        raise missing_dependency(e.name or "torch", "torch") from None

    out = args.out or f"runs/{args.preset}"
    if args.resume:
        resumed = resume(out, steps=args.steps, device=args.device)
        print(f"resumed to step {resumed.step}: validation loss {resumed.val_loss:.3f}; checkpoint in {out}")
        return
    given = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    cfg = TrainConfig.for_preset(args.preset, out=out, corpus=tuple(args.corpus), device=args.device, **given)
    result = train(cfg, overwrite=args.overwrite)
    print(
        f"trained {result.step} steps ({result.tokens:,} tokens): train loss {result.train_loss:.3f}, "
        f"validation loss {result.val_loss:.3f}; checkpoint in {cfg.out}"
    )
