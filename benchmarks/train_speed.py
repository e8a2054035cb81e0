"""Training step speed: edgelm's model against transformers' LlamaForCausalLM (same config, batch, optimizer).

    python benchmarks/train_speed.py [--preset tiny] [--batch-size 16] [--context 256] [--steps 10]

Prints tokens/s of each (mean ± std over the timed steps), edgelm / transformers, and the model FLOP/s
(6 × parameters × tokens plus the attention's 12 × layers × context × hidden per token, as in PaLM's MFU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgelm.model.config import preset
from edgelm.model.transformer import Transformer, weights_of
from edgelm.training.train import next_token_loss


def step_times(
    model: torch.nn.Module, loss_of: Callable, batch: tuple, steps: int, warmup: int = 3
) -> list[float]:
    """Seconds per forward + backward + AdamW step, after `warmup` untimed steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = loss_of(model, *batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def hf_loss(model: LlamaForCausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    config = preset(args.preset, max_position_embeddings=args.context)
    torch.manual_seed(0)
    ours = Transformer(config)
    ours.init_weights()
    hf_config = {k: v for k, v in config.to_hf_dict().items() if k != "architectures"}
    # PretrainedConfig takes attn_implementation; LlamaConfig's annotations leave it out
    theirs = LlamaForCausalLM(LlamaConfig(**hf_config, attn_implementation="sdpa"))  # type: ignore[call-arg]
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in weights_of(ours).items()}, strict=False)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.context))
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.context))
    tokens = args.batch_size * args.context
    attention_flops = 12 * config.num_hidden_layers * config.hidden_size * args.context
    flops_per_token = 6 * config.num_parameters + attention_flops

    print(
        f"preset {args.preset}: {config.num_parameters / 1e6:.2f} M parameters, "
        f"batch {args.batch_size} × "
        f"{args.context} tokens, {torch.get_num_threads()} threads, {args.steps} timed steps"
    )
    print(f"{'model':<14} {'tokens/s':>18} {'GFLOP/s':>9}")
    results: dict[str, list[float]] = {}
    # interleave the two so that a change in machine load affects both alike
    for _ in range(2):
        for name, model, loss_of in (("edgelm", ours, next_token_loss), ("transformers", theirs, hf_loss)):
            rates = [tokens / t for t in step_times(model, loss_of, (x, y), args.steps // 2 or 1)]
            results.setdefault(name, []).extend(rates)
    for name, rates in results.items():
        mean, std = statistics.mean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0
        print(f"{name:<14} {mean:>10,.0f} ± {std:>5,.0f} {mean * flops_per_token / 1e9:>9.1f}")
    ratio = statistics.mean(results["edgelm"]) / statistics.mean(results["transformers"])
    print(f"edgelm / transformers: {ratio:.2f}x (target ≥ 1.0)")


if __name__ == "__main__":
    main()
