"""Activation statistics for importance-weighted quantization (llama.cpp calls them an importance matrix).

For a linear weight W (out, in) applied to activations x (in,), the output error of a quantized Wq is
||(W - Wq) x||². Averaged over calibration tokens and keeping only the diagonal of E[x xᵀ], that is
sum over columns c of E[x_c²] * ||W[:, c] - Wq[:, c]||²: the mean squared input activation of each column is
the weight that `edgelm.quant.blocks`'s `importance=` parameter expects; the whole E[x xᵀ] is what GPTQ's
error feedback needs (its `hessian=`).

    text ──tokenize──▶ [BOS t1 .. t(C-1)] [BOS tC ..] ..   windows of C = context tokens, at most max_tokens
                              │
                   Transformer forward, pre-hooks on the nn.Linear modules
                              │
          sum of x xᵀ (float64) / tokens  ──▶  {"model.layers.0.self_attn.q_proj.weight": (in, in), ..}

This module needs torch (the `torch` extra); it imports it only when activation statistics are measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgelm.checkpoint import load_checkpoint
from edgelm.errors import EdgelmError, missing_dependency
from edgelm.files import read_text
from edgelm.values import is_int

if TYPE_CHECKING:
    import torch

    from edgelm.model.transformer import Transformer

# the module of a layer whose input is measured → the weights of that layer that read the same input
SHARED_INPUTS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
HEAD = "lm_head.weight"  # its input is the final norm's output
# the default window: the model's context up to this, so that a model with a context of 128k tokens is not run
# over one window of 100k tokens (activations of gigabytes); llama.cpp's imatrix uses 512
DEFAULT_CONTEXT = 2048


def read_calibration_text(path: Path) -> str:
    """The text of a UTF-8 file without its byte-order mark (see `read_text`); an empty one is refused."""
    text = read_text(path, f"calibration text {path}", drop_bom=True)
    if not text.strip():
        raise EdgelmError(f"calibration text {path}: empty (give text like what the model will see)")
    return text


def calibration_windows(
    ids: Sequence[int], bos_id: int | None, context: int, max_tokens: int
) -> list[list[int]]:
    """Non-overlapping windows of at most `context` tokens, each BOS followed by the next context - 1 ids of
    the text (as llama.cpp's imatrix starts every chunk with BOS), at most `max_tokens` tokens in all. A
    tokenizer without BOS (Qwen2) gets windows of text alone, as it sees them at inference.

    Only the last window may be shorter than `context`."""
    prefix = [] if bos_id is None else [bos_id]
    _check_at_least_two("context", context)
    _check_at_least_two("max_tokens", max_tokens)
    step = context - len(prefix)  # text tokens per window
    windows = []
    budget = max_tokens
    for start in range(0, len(ids), step):
        if budget < len(prefix) + 1:  # a window needs BOS and at least one token of text
            break
        piece = list(ids[start : start + min(step, budget - len(prefix))])
        windows.append([*prefix, *piece])
        budget -= len(piece) + len(prefix)
    return windows


def activation_covariance(
    checkpoint: Path, text: str, context: int | None = None, max_tokens: int = 100_000
) -> dict[str, np.ndarray]:
    """The second moment H = E[x xᵀ] of the input activations of every linear weight, keyed by the weight's HF
    name: "model.layers.0.self_attn.q_proj.weight" → float32 (in_features, in_features), accumulated in
    float64. Its diagonal, the mean squared input of each column, is the `importance=` of
    `edgelm.quant.blocks`; H itself is its `hessian=` (GPTQ's error feedback).

    Keys: the q/k/v/o, gate, up and down projections of every layer and "lm_head.weight" (whose input is the
    final norm's output; reported for a tied model too, since the exporters quantize the output matrix from
    the embeddings). q/k/v share one input and gate/up another, so their arrays are equal. The embedding
    matrix "model.embed_tokens.weight" is a lookup table with no activation input and has no entry.

    Measured by running the checkpoint's PyTorch model (float32, CPU) over `text`, tokenized with the
    checkpoint's tokenizer and cut into non-overlapping windows of `context` tokens (default the model's
    context, at most DEFAULT_CONTEXT) that each start with BOS, at most `max_tokens` tokens in all (see
    `calibration_windows`); every token, BOS included, counts. H holds in_features² values per weight: about
    4 * (4 * hidden² + intermediate²) bytes per layer.
    """
    model, windows = _model_and_windows(checkpoint, text, context, max_tokens)
    return _measure(model, windows)


def _model_and_windows(
    checkpoint: Path, text: str, context: int | None, max_tokens: int
) -> tuple[Transformer, list[list[int]]]:
    """Check the arguments, load the checkpoint's model (float32, eval) and cut the text into windows."""
    if context is not None:
        _check_at_least_two("context", context)
    _check_at_least_two("max_tokens", max_tokens)
    if not isinstance(text, str):
        raise EdgelmError(f"calibration text must be a str, not {type(text).__name__}")
    if not text.strip():
        raise EdgelmError("calibration text is empty: give a text like what the model will see")
    _import_torch()
    from edgelm.model.transformer import Transformer, load_weights  # imports torch

    config, tensors, tokenizer = load_checkpoint(checkpoint)
    context = min(config.max_position_embeddings, DEFAULT_CONTEXT) if context is None else context
    if context > config.max_position_embeddings:
        raise EdgelmError(
            f"context={context} exceeds the model's context of {config.max_position_embeddings} tokens "
            "(give a smaller context)"
        )
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise EdgelmError(
            f"calibration text is only {len(ids)} token(s): too short to measure activations "
            "(give at least a few sentences; thousands of tokens are better)"
        )
    model = Transformer(config)
    load_weights(model, tensors)
    del tensors
    model.eval()
    return model, calibration_windows(ids, tokenizer.bos_id, context, max_tokens)


def _sum_of_outer_products(x: torch.Tensor) -> torch.Tensor:
    """x (tokens, in) → the sum over tokens of x xᵀ, float64 (in, in)."""
    x = x.double()
    return x.T @ x


def _measure(model: Transformer, windows: list[list[int]]) -> dict[str, np.ndarray]:
    """Run the windows through the model and return the mean over tokens of x xᵀ by weight name."""
    import torch

    sums: dict[str, torch.Tensor] = {}  # module name → sum of x xᵀ over the tokens so far, float64

    def accumulate(name: str, x: torch.Tensor) -> None:
        total = _sum_of_outer_products(x.reshape(-1, x.shape[-1]))  # from (B*T, in)
        sums[name] = sums[name] + total if name in sums else total

    def pre_hook(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        return lambda _module, args: accumulate(name, args[0])

    layers = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    measured = [f"{layer}.{m}" for layer in layers for m in SHARED_INPUTS]
    handles = [model.get_submodule(name).register_forward_pre_hook(pre_hook(name)) for name in measured]
    head = model.lm_head
    model.lm_head = torch.nn.Identity()  # type: ignore[assignment]  # the forward then returns the head's input: no (T, vocab) logits
    tokens = 0
    try:
        with torch.inference_mode():
            for window in windows:
                accumulate("lm_head", model(torch.tensor([window])))  # (1, T, hidden)
                tokens += len(window)
    finally:
        model.lm_head = head
        for handle in handles:
            handle.remove()
    means = {name: (total / tokens).numpy().astype(np.float32) for name, total in sums.items()}
    if not all(np.isfinite(m).all() for m in means.values()):
        raise EdgelmError("activations overflowed to infinity or NaN (check the checkpoint's weights)")
    result = {
        f"{layer}.{reader}.weight": means[f"{layer}.{m}"].copy()
        for layer in layers
        for m, readers in SHARED_INPUTS.items()
        for reader in readers
    }
    result[HEAD] = means["lm_head"]
    return result


def _check_at_least_two(name: str, value: object) -> None:
    """Refuse a token count that is not an int >= 2 (a window holds BOS and at least one token of text)."""
    if not is_int(value):
        raise EdgelmError(f"{name} must be an integer number of tokens, not {value!r}")
    if value < 2:
        raise EdgelmError(
            f"{name}={value} is too small: a window needs at least 2 tokens (BOS and one token of text)"
        )


def _import_torch() -> None:
    """Import torch, or raise the EdgelmError that names the extra to install."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        raise missing_dependency("torch", "torch") from None
