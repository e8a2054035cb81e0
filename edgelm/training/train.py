"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, evaluation, checkpoints, resume, DDP.

One process: `edgelm train ...`. Several (GPUs or nodes): `torchrun --nproc_per_node N -m edgelm train ...`;
DDP uses NCCL on CUDA and gloo on CPU. The run folder is itself a checkpoint directory, plus
`trainer_state.json`, `optimizer.safetensors` (for --resume), `log.jsonl`, `loss.png` and the token cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from edgelm.checkpoint import WEIGHTS, WEIGHTS_INDEX, read_metadata, save_checkpoint
from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling, write_json_atomic
from edgelm.model.config import ModelConfig, preset
from edgelm.model.device import resolve_device
from edgelm.model.transformer import Transformer, load_weights, weights_of
from edgelm.training.data import (
    DEFAULT_VAL_FRACTION,
    TokenData,
    batch_windows,
    load_tokens,
    prepare_tokens,
    validation_windows,
)

STATE = "trainer_state.json"
SAVING = "save"  # the staging folder of a save in progress: temporary_sibling(out / SAVING)
OPTIMIZER = "optimizer.safetensors"
LOG = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (the model's shape comes from `preset` and the overrides)."""

    out: str
    corpus: tuple[str, ...] = ()  # files, folders or globs; empty = the built-in corpus
    preset: str = "tiny"
    vocab_size: int | None = None  # default: the preset's
    context: int | None = None  # default: the preset's max_position_embeddings
    steps: int = 400
    batch_size: int = 16  # sequences per micro-step and process
    grad_accum: int = 1
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 32
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = 1337
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise EdgelmError(f"{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.warmup < 0 or not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise EdgelmError("lr must be > 0, warmup >= 0, min-lr-ratio in [0, 1], grad-clip >= 0")

    @classmethod
    def for_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The training defaults that suit a model preset, with some fields replaced."""
        preset(name)  # an unknown name fails here, with the list of presets
        return cls(**{"preset": name, **PRESET_DEFAULTS.get(name, {}), **overrides})

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset's model with the run's context length and its tokenizer's vocabulary size."""
        overrides: dict[str, Any] = {"vocab_size": vocab_size}
        if self.context:
            overrides["max_position_embeddings"] = self.context
        return preset(self.preset, **overrides)


# what differs from TrainConfig's defaults (which suit "tiny") for the larger presets
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "small": {"lr": 1e-3, "steps": 2000, "warmup": 100, "eval_every": 200},
    "base": {"lr": 6e-4, "steps": 10000, "batch_size": 32, "warmup": 500, "eval_every": 500},
}


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: its last step, losses (nats) and tokens seen."""

    step: int
    train_loss: float
    val_loss: float
    tokens: int


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step (counting from 1)."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    )


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only: not on norms, not on embeddings."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class _Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _start_distributed(device: str) -> tuple[_Distributed, str]:
    """Join the torchrun process group when launched by torchrun; resolve this process's device."""
    if "RANK" not in os.environ:
        return _Distributed(), resolve_device(device)
    ddp = _Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp, device


def train(
    cfg: TrainConfig, overwrite: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Train the model of `cfg` from scratch and save it as a checkpoint in `cfg.out`. A run that fails
    before it logs a step removes the folder it created (a token cache alone is no run; Ctrl-C keeps it,
    to be reused)."""
    out = Path(cfg.out)
    if (out / STATE).exists() and not overwrite:
        raise EdgelmError(
            f"{out} already holds a training run; pass --resume to continue it or --overwrite to start again"
        )
    created = not out.exists()
    try:
        return _run(cfg, out, False, on_step)
    except Exception:
        if created and _main_process() and not _holds_anything(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def resume(
    out: str | Path,
    steps: int | None = None,
    device: str = "auto",
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Continue the run saved in `out` from its last checkpoint, with its own settings: the same batches and
    schedule as if it had never stopped. A new `steps` stretches or shortens the cosine schedule."""
    out = Path(out)
    if _main_process():
        _commit_save(out)  # a kill among the last save's renames: finish them
    if not (out / STATE).is_file():
        raise EdgelmError(f"{out}: nothing to resume (no {STATE}); start a run without --resume")
    state = read_json(out / STATE)
    saved = state.get("train_config") if isinstance(state, dict) else None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or not isinstance(saved.get("corpus"), list) or set(saved) - fields:
        raise EdgelmError(f"{out / STATE}: not a trainer state edgelm wrote (no usable train_config)")
    saved |= {"corpus": tuple(saved["corpus"]), "out": str(out), "device": device}
    if steps is not None:
        saved["steps"] = steps
    return _run(TrainConfig(**saved), out, True, on_step)


def _run(
    cfg: TrainConfig, out: Path, resume: bool, on_step: Callable[[dict[str, Any]], None] | None
) -> TrainResult:
    ddp, device = _start_distributed(cfg.device)
    try:
        return _train(cfg, out, resume, ddp, device, on_step)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


@dataclass
class _Loop:
    """What every step of a run uses: its settings, data and folder, the model and optimizer, this process."""

    cfg: TrainConfig
    out: Path
    ddp: _Distributed
    device: str
    data: TokenData
    val: np.ndarray  # validation windows (n, L+1)
    model: Transformer
    ddp_model: Transformer | DistributedDataParallel  # wrapped when there are several processes
    optimizer: torch.optim.AdamW
    autocast: AbstractContextManager[Any]

    @property
    def seq_len(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.ddp.world * self.seq_len


def _train(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    ddp: _Distributed,
    device: str,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    """Set the run up, then step until `cfg.steps`: evaluate and save every `eval_every` steps and at the end,
    log every step."""
    loop, step = _set_up(cfg, out, resume, ddp, device)
    log = _open_log(out / LOG, step) if ddp.main else None
    train_loss, val_loss = float("nan"), float("nan")
    with _Progress(ddp.main, cfg.steps, step) as advance:
        while step < cfg.steps:
            step += 1
            record = _step(loop, step)
            train_loss = record["loss"]
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = _evaluate_and_save(loop, step, record)
            if log:
                _log(loop, log, record)
                advance(record)
            if on_step:
                on_step(record)
    if log:
        log.close()
    return TrainResult(step, train_loss, val_loss, step * loop.tokens_per_step)


def _set_up(cfg: TrainConfig, out: Path, resume: bool, ddp: _Distributed, device: str) -> tuple[_Loop, int]:
    """Tokens, model, optimizer (restored from `out` when resuming) and autocast; and the step done so far."""
    data = _prepare_data(cfg, out, ddp)
    config = cfg.model_config(data.tokenizer.vocab_size)
    val = validation_windows(data.val, config.max_position_embeddings, cfg.eval_windows)
    torch.manual_seed(cfg.seed)
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    step = _load_training_state(out, model, optimizer, device) if resume else 0
    ddp_model = DistributedDataParallel(model) if ddp.world > 1 else model
    autocast: AbstractContextManager[Any] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    )
    return _Loop(cfg, out, ddp, device, data, val, model, ddp_model, optimizer, autocast), step


def _step(loop: _Loop, step: int) -> dict[str, Any]:
    """One optimizer step at the schedule's learning rate over `grad_accum` micro-batches; its log record."""
    started = time.perf_counter()
    lr = learning_rate(loop.cfg, step)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = _accumulate_gradients(loop, step)
    norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), loop.cfg.grad_clip or float("inf"))
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.ddp.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return {
        "step": step,
        "loss": loss_sum.item(),
        "lr": lr,
        "grad_norm": norm.item(),
        "tokens": step * loop.tokens_per_step,
        "tokens_per_s": loop.tokens_per_step / (time.perf_counter() - started),
    }


def _accumulate_gradients(loop: _Loop, step: int) -> torch.Tensor:
    """Backpropagate the micro-batches of `step` (the gradients synchronised across processes on the last one
    only); their mean loss on this process."""
    cfg, ddp = loop.cfg, loop.ddp
    loss_sum = torch.zeros((), device=loop.device)
    for micro in range(cfg.grad_accum):
        x, y = batch_windows(
            loop.data.train, loop.seq_len, cfg.batch_size, cfg.seed, step, micro, ddp.rank, ddp.world
        )
        ids, targets = torch.from_numpy(x).to(loop.device), torch.from_numpy(y).to(loop.device)
        last = micro == cfg.grad_accum - 1
        model = loop.ddp_model
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync, loop.autocast:
            loss = next_token_loss(model, ids, targets) / cfg.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def _evaluate_and_save(loop: _Loop, step: int, record: dict[str, Any]) -> float:
    """Add the validation loss and perplexity to `record`; save the run (on the main process). The loss."""
    val_loss = evaluate(loop.model, loop.val, loop.device, loop.autocast)
    record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    if not math.isfinite(val_loss):  # saving would be refused as damaged weights: say why
        raise EdgelmError(
            f"training diverged by step {step} (validation loss {val_loss}); the last save is kept: "
            "start again with a lower --lr"
        )
    if loop.ddp.main:
        _save(loop.out, loop.cfg, loop.model, loop.optimizer, loop.data, step)
    return val_loss


def _log(loop: _Loop, log: TextIO, record: dict[str, Any]) -> None:
    """Append `record` to the JSONL log; redraw the loss curve when it holds a validation loss."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    if "val_loss" in record:
        plot_loss_curve(loop.out / LOG, loop.out / "loss.png")


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of targets y given ids x, both (B, T): the loss that training minimises."""
    logits = model(x)  # (B, T, vocab)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: Transformer, windows: np.ndarray, device: str, autocast: Any = None) -> float:
    """Mean next-token cross-entropy (nats) over validation windows (n, L+1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), 8):
        chunk = torch.from_numpy(windows[start : start + 8]).to(device)
        with autocast or nullcontext():
            logits = model(chunk[:, :-1])
        losses = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
        )
        total += losses.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def _prepare_data(cfg: TrainConfig, out: Path, ddp: _Distributed) -> TokenData:
    """Tokenize once (on the main process; the others wait and then read the cache). A failure on the main
    process is passed to the others, so that no process waits for a cache that never comes."""
    vocab_size = cfg.vocab_size or preset(cfg.preset).vocab_size
    cache = out / "data"
    failure: list[str | None] = [None]
    if ddp.main:
        try:
            data = prepare_tokens(cache, cfg.corpus, vocab_size, cfg.val_fraction)
        except EdgelmError as e:
            failure[0] = str(e)
    if ddp.world > 1:
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise EdgelmError(failure[0])
    return data if ddp.main else load_tokens(cache)


def _save(
    out: Path,
    cfg: TrainConfig,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    data: TokenData,
    step: int,
) -> None:
    """Write the checkpoint, the optimizer and trainer_state.json into a staging folder, trainer_state.json
    last (it marks the staged save complete), then move them into `out` (`_commit_save`): the previous save
    stays whole until the new one is."""
    staging = temporary_sibling(out / SAVING)
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, model.config, weights_of(model), data.tokenizer, metadata={"step": str(step)})
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.contiguous()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }
    save_file(tensors, str(staging / OPTIMIZER), metadata={"step": str(step)})
    write_json_atomic(
        staging / STATE,
        {"step": step, "train_config": dataclasses.asdict(cfg), "param_groups": state["param_groups"]},
    )
    _commit_save(out)


def _main_process() -> bool:
    """Whether this is the process that writes the run folder (rank 0 under torchrun, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def _holds_anything(out: Path) -> bool:
    """Whether a run folder holds more than a token cache: a save (staged or in place) or a logged step."""
    staged = temporary_sibling(out / SAVING) / STATE
    log = out / LOG
    return (out / STATE).exists() or staged.exists() or (log.is_file() and log.stat().st_size > 0)


def _commit_save(out: Path) -> None:
    """Move a complete staged save into `out`, trainer_state.json last, or drop one a kill cut short
    (it has no trainer_state.json): renames only, which `resume` finishes if a kill falls among them."""
    staging = temporary_sibling(out / SAVING)
    if not staging.is_dir():
        return
    if not (staging / STATE).is_file():
        shutil.rmtree(staging)
        return
    staged = sorted(staging.iterdir(), key=lambda p: p.name == STATE)
    names = {p.name for p in staged}
    # the last save may have been sharded where this one is not, or the other way round
    for kept, stale in ((WEIGHTS, WEIGHTS_INDEX), (WEIGHTS_INDEX, WEIGHTS)):
        if kept in names:
            (out / stale).unlink(missing_ok=True)
    for path in staged:
        path.replace(out / path.name)
    staging.rmdir()


def _load_training_state(out: Path, model: Transformer, optimizer: torch.optim.Optimizer, device: str) -> int:
    """Restore weights and optimizer moments; refuse a save that was interrupted half-way."""
    state = read_json(out / STATE)
    step = state["step"]
    for path in (out / WEIGHTS, out / OPTIMIZER):
        if read_metadata(path).get("step") != str(step):
            raise EdgelmError(
                f"{path} is not from step {step} of {out / STATE}: the last save was "
                "interrupted; start again with --overwrite"
            )
    load_weights(model, {k: v.numpy() for k, v in load_file(str(out / WEIGHTS)).items()})
    tensors = load_file(str(out / OPTIMIZER), device=device)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    return step


def _open_log(path: Path, step: int) -> TextIO:
    """Open the JSONL log for appending, first dropping records past `step` and a last line cut short (left
    by an interrupted run)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a", encoding="utf-8")


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a line that is no whole record (dropped)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf


def plot_loss_curve(log_path: Path, png_path: Path) -> None:
    """Draw training and validation loss against tokens seen into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], label="train", lw=1)
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="tokens", ylabel="cross-entropy (nats)", title=f"{log_path.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = temporary_sibling(png_path)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(png_path)


class _Progress:
    """A rich progress bar with loss and tokens/s on the main process; nothing elsewhere."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  {task.fields[val]}"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.val = ""  # the last validation loss, shown until the next
        self.task = self.bar.add_task(
            "train", total=self.total, completed=self.done, loss="-", speed="-", val=""
        )
        return self._advance

    def _advance(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            self.val = f"val {record['val_loss']:.3f} (ppl {record['val_ppl']:.1f})"
            self.bar.console.print(
                f"step {record['step']}: val loss {record['val_loss']:.4f}, ppl {record['val_ppl']:.2f}"
            )
        self.bar.update(
            self.task,
            completed=record["step"],
            loss=f"{record['loss']:.3f}",
            speed=f"{record['tokens_per_s']:,.0f}",
            val=self.val,
        )

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
