"""Activation statistics for importance-weighted quantization (llama.cpp calls them an importance matrix).

For a linear weight W (out, in) applied to activations x (in,), the output error of a quantized Wq is
||(W - Wq) x||². Averaged over calibration tokens and keeping only the diagonal of E[x xᵀ], that is
sum over columns c of E[x_c²] * ||W[:, c] - Wq[:, c]||²: the mean squared input activation of each column is
the weight that `edgelm.quant.blocks`'s `importance=` parameter expects; the whole E[x xᵀ] is what GPTQ's
error feedback needs (its `hessian=`).

    text ──tokenize──▶ [BOS t1 .. t(C-1)] [BOS tC ..] ..   windows of C = context tokens, at most max_tokens
                              │ embedded once
                   layer 0, 1, ... read from the checkpoint one at a time, pre-hooks on its nn.Linear modules
                              │
          sum of x xᵀ (float32) / tokens  ──▶  {"model.layers.0.self_attn.q_proj.weight": (in, in), ..}

This module needs torch (the `torch` extra); it imports it only when activation statistics are measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgelm.checkpoint import TensorEntry, checked_entries, row_reader, tensor_reader, tensor_shapes
from edgelm.errors import EdgelmError, missing_dependency
from edgelm.files import read_text
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import Tokenizer
from edgelm.values import is_int

if TYPE_CHECKING:
    import torch

    from edgelm.model.transformer import Block

# the module of a layer whose input is measured → the weights of that layer that read the same input
SHARED_INPUTS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
# Phi-3's fused matrices each have an input of their own
FUSED_INPUTS: dict[str, tuple[str, ...]] = {
    name: (name,) for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
}


def shared_inputs(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """A layer's linear modules whose input is measured → the weights that read that input."""
    return FUSED_INPUTS if config.fused_projections else SHARED_INPUTS


HEAD = "lm_head.weight"  # its input is the final norm's output
# the default window: the model's context up to this, so that a model with a context of 128k tokens is not run
# over one window of 100k tokens (activations of gigabytes); llama.cpp's imatrix uses 512
DEFAULT_CONTEXT = 2048
THROUGH = ("quantized", "float")  # what the activations go on through after a layer is measured


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
    checkpoint: Path,
    text: str,
    context: int | None = None,
    max_tokens: int = 100_000,
    through: str = "quantized",
) -> ActivationCovariance:
    """The second moment H = E[x xᵀ] of the input activations of every linear weight, keyed by the weight's HF
    name: "model.layers.0.self_attn.q_proj.weight" → float32 (in_features, in_features), accumulated in
    float32 (float64 would double the 0.8 GB of Llama-3-8B's MLP input, 14336 wide, for a relative
    error far below GPTQ's 1 % dampening). Its diagonal, the mean squared input of each column, is the
    `importance=` of `edgelm.quant.blocks`; H itself is its `hessian=` (GPTQ's error feedback).

    Keys: the q/k/v/o, gate, up and down projections of every layer and "lm_head.weight" (whose input is the
    final norm's output; reported for a tied model too, since the exporters quantize the output matrix from
    the embeddings). q/k/v share one input and gate/up another, so they map to one array each. The
    embedding matrix "model.embed_tokens.weight" is a lookup table with no activation input and has no entry.

    Measured by running the checkpoint's PyTorch layers (float32, CPU) over `text`, tokenized with the
    checkpoint's tokenizer and cut into non-overlapping windows of `context` tokens (default the model's
    context, at most DEFAULT_CONTEXT) that each start with BOS, at most `max_tokens` tokens in all (see
    `calibration_windows`); every token, BOS included, counts. The result measures a layer when its keys
    are first asked for (`ActivationCovariance`), so memory holds one layer, not the model; `through`
    says whether the activations go on through each layer's quantized values, which the exporter hands
    back (GPTQ's sequential scheme), or through the float model.
    """
    config, entries, windows = calibration_input(checkpoint, text, context, max_tokens)
    return ActivationCovariance(config, tensor_reader(entries), row_reader(entries), windows, through)


def calibration_input(
    checkpoint: Path, text: str, context: int | None, max_tokens: int
) -> tuple[ModelConfig, list[TensorEntry], list[list[int]]]:
    """The checkpoint's config and weight entries, and `text`'s windows (`calibration_windows`) of `context`
    tokens (None: the model's context, at most DEFAULT_CONTEXT), at most `max_tokens` in all; every argument
    checked, with torch, first."""
    if context is not None:
        _check_at_least_two("context", context)
    _check_at_least_two("max_tokens", max_tokens)
    if not isinstance(text, str):
        raise EdgelmError(f"calibration text must be a str, not {type(text).__name__}")
    if not text.strip():
        raise EdgelmError("calibration text is empty: give a text like what the model will see")
    _import_torch()
    config, entries = checked_entries(checkpoint)
    tokenizer = Tokenizer.load(checkpoint)
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
    return config, entries, calibration_windows(ids, tokenizer.bos_id, context, max_tokens)


class ActivationCovariance(Mapping[str, np.ndarray]):
    """E[x xᵀ] of every linear weight's input (see `activation_covariance`), measured one decoder layer at a
    time, when a key of that layer is first asked for.

    The calibration tokens are embedded once; each layer is then read from the checkpoint, run over the
    activations with its inputs measured, and dropped, so memory holds the activations (tokens × hidden),
    one layer and its statistics. Asked in layer order, as the exporters ask, the layers run once; a key of
    an earlier layer starts again from the embeddings. The head's statistic (of the final norm's output)
    is measured once, on the float model, in a pass of its own: both exporters quantize the head before
    the layers (a tied head is the embedding table), so it cannot follow them, and on the float model it
    is the same whatever an earlier export left (the families' tests also gave a lower KLD with it than
    with the head measured through an export's quantized layers).

    `through="quantized"` is GPTQ's sequential scheme: an exporter hands each weight's quantized values to
    `record_quantized`, and the activations go on from a layer through those values, so that each layer
    is measured on the inputs the quantized model gives it; `"float"` measures every layer on the float
    model's activations (one forward pass of the whole model).
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: Callable[[str], np.ndarray],
        rows: Callable[[str, np.ndarray], np.ndarray],
        windows: list[list[int]],
        through: str = "quantized",
    ):
        if through not in THROUGH:
            raise EdgelmError(
                f"through={through!r}: the activations go through {' or '.join(THROUGH)} layers"
            )
        self.config = config
        self.through = through
        self._weights = weights
        self._rows = rows
        self._windows = windows
        self._layer_of: dict[str, int | None] = {
            f"model.layers.{i}.{reader}.weight": i
            for i in range(config.num_hidden_layers)
            for readers in shared_inputs(config).values()
            for reader in readers
        }
        self._layer_of[HEAD] = None
        self._head: np.ndarray | None = None
        self._restart()

    def __getitem__(self, key: str) -> np.ndarray:
        layer = self._layer_of[key]  # a KeyError for a weight that has no activation input
        if layer is None:
            return self._head_covariance()
        if layer != self._measured:
            if layer < self._at:
                self._restart()
            while self._at < layer:
                self._pass_layer()
            self._measure_layer()
        return self._stats[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layer_of)

    def layer_of(self, name: str) -> int | None:
        """The layer whose input weight `name` reads (None for the head and for weights without one)."""
        return self._layer_of.get(name)

    @property
    def tokens(self) -> int:
        """The calibration tokens every layer is measured on."""
        return sum(len(w) for w in self._windows)

    def __len__(self) -> int:
        return len(self._layer_of)

    def record_quantized(self, name: str, values: np.ndarray) -> None:
        """The values (float32, its HF layout) a weight of a layer not yet passed was quantized to; the
        activations go through them (with `through="quantized"`; ignored otherwise, for other weights and
        for the last layer's, which would carry the activations only to a layer that does not exist)."""
        layer = self.layer_of(name)
        last = self.config.num_hidden_layers - 1
        if self.through == "quantized" and layer is not None and self._at <= layer < last:
            self._quantized[name] = np.asarray(values, np.float32)

    def _restart(self) -> None:
        """The activations back at the embeddings of the calibration windows, before layer 0. Recorded
        values are forgotten (a new export records its own)."""
        self._quantized: dict[str, np.ndarray] = {}  # recorded values of weights of layers not yet passed
        self._x = self._embeddings()
        self._at = 0  # the layer the activations are the input of
        self._measured = -1  # the layer whose statistics `_stats` holds
        self._stats: dict[str, np.ndarray] = {}
        self._float_out: list[torch.Tensor] | None = None  # layer _measured's float output, when kept

    def _embeddings(self) -> list[torch.Tensor]:
        """The calibration windows' embeddings, (1, T, hidden) each."""
        return window_embeddings(self.config, self._rows, self._windows)

    def _layer(self, i: int, quantized: bool) -> Block:
        """Layer i as a torch module, from the checkpoint, its weights the recorded quantized values where
        `quantized` and there are some."""
        prefix = f"model.layers.{i}."
        kept = {
            n: self._quantized.pop(n) for n in list(self._quantized) if quantized and n.startswith(prefix)
        }

        def weight(name: str) -> np.ndarray:
            return kept[name] if name in kept else self._weights(name)

        return layer_module(self.config, weight, i)

    def _measure_layer(self) -> None:
        """Measure the inputs of layer `_at`'s linear weights (keeping its float output for `_pass_layer`)."""

        block = self._layer(self._at, quantized=False)
        sums: dict[str, torch.Tensor] = {}
        handles = [
            block.get_submodule(module).register_forward_pre_hook(_accumulating(sums, module))
            for module in shared_inputs(self.config)
        ]
        try:
            self._float_out = forward_windows(block, self.config, self._x)
        finally:
            for handle in handles:
                handle.remove()
        means = _means(sums, self.tokens)
        prefix = f"model.layers.{self._at}."
        self._stats = {
            f"{prefix}{reader}.weight": means[module]
            for module, readers in shared_inputs(self.config).items()
            for reader in readers
        }
        self._measured = self._at

    def _pass_layer(self) -> None:
        """Move the activations through layer `_at`: through its recorded quantized values, or the float
        output its measurement kept."""
        quantized = any(name.startswith(f"model.layers.{self._at}.") for name in self._quantized)
        if not quantized and self._measured == self._at and self._float_out is not None:
            self._x = self._float_out
        else:
            self._x = forward_windows(self._layer(self._at, quantized), self.config, self._x)
        self._float_out = None
        self._at += 1

    def _head_covariance(self) -> np.ndarray:
        """E[x xᵀ] of the head's input, the final norm of the float model's last layer output, measured
        once in a pass of its own (the layers' walk stays where it is)."""
        if self._head is None:
            import torch

            # the exporters ask for the head before the layers or after the last: a measured layer's
            # statistics (a GB for Llama-3-8B's, its MLP input 14336 wide) are not asked for again
            self._stats, self._measured, self._float_out = {}, -1, None
            xs = self._embeddings()
            for i in range(self.config.num_hidden_layers):
                xs = forward_windows(self._layer(i, quantized=False), self.config, xs)
            norm = final_norm(self.config, self._weights)
            sums: dict[str, torch.Tensor] = {}
            with torch.inference_mode():
                for x in xs:
                    _accumulate(sums, "lm_head", norm(x))
            self._head = _means(sums, self.tokens)["lm_head"]
        return self._head


def final_norm(config: ModelConfig, weights: Callable[[str], np.ndarray]) -> torch.nn.Module:
    """The model's final norm, the head's input, read from the checkpoint."""
    import torch

    from edgelm.model.transformer import rms_norm

    norm = rms_norm(config, config.hidden_size)
    norm.load_state_dict({"weight": torch.from_numpy(weights("model.norm.weight"))})
    return norm


def window_embeddings(
    config: ModelConfig, rows: Callable[[str, np.ndarray], np.ndarray], windows: list[list[int]]
) -> list[torch.Tensor]:
    """Each window's embeddings (1, T, hidden), Gemma's multiplier applied, the table's rows read by id."""
    import torch

    ids = np.concatenate([np.asarray(window, np.int64) for window in windows])
    embedded = rows("model.embed_tokens.weight", ids) * np.float32(config.embedding_multiplier)
    ends = np.cumsum([len(window) for window in windows])[:-1]
    return [torch.from_numpy(part)[None] for part in np.split(embedded, ends)]


def layer_module(config: ModelConfig, weights: Callable[[str], np.ndarray], i: int) -> Block:
    """Decoder layer i as a torch module in eval mode, its parameters the arrays `weights` gives by HF
    name (not copied)."""
    import torch

    from edgelm.model.transformer import Block

    prefix = f"model.layers.{i}."
    names = [name for name in tensor_shapes(config) if name.startswith(prefix)]
    state = {name.removeprefix(prefix): torch.from_numpy(weights(name)) for name in names}
    with torch.device("meta"):  # no random initialisation: the parameters become the arrays read
        block = Block(config, i)
    block.load_state_dict(state, assign=True)
    return block.eval()


def record_quantized(statistics: Mapping[str, np.ndarray] | None, name: str, values: np.ndarray) -> None:
    """Hand a weight's quantized values to layer-by-layer statistics that go on through them (see
    `ActivationCovariance`); nothing for any other mapping."""
    if isinstance(statistics, ActivationCovariance):
        statistics.record_quantized(name, values)


def progress_label(statistics: Mapping[str, np.ndarray] | None) -> str:
    """What an export's progress bar says of its calibration: the tokens, and how the layers are measured
    ("" without layer-by-layer statistics)."""
    if not isinstance(statistics, ActivationCovariance):
        return ""
    how = "through the quantized layers" if statistics.through == "quantized" else "on the float model"
    return f", calibrated on {statistics.tokens:,} tokens layer by layer {how}"


def wants_quantized(statistics: Mapping[str, np.ndarray] | None, name: str) -> bool:
    """Whether `record_quantized` would use the values of weight `name` (a layer's, with statistics that go
    on through the quantized layers): worth dequantizing it for."""
    return (
        isinstance(statistics, ActivationCovariance)
        and statistics.through == "quantized"
        and statistics.layer_of(name) is not None
    )


def forward_windows(block: Block, config: ModelConfig, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One decoder layer over each window's activations."""
    import torch

    from edgelm.model.transformer import rope_tables

    with torch.inference_mode():
        return [block(x, rope_tables(config, 0, x.shape[1], x.device), 0) for x in xs]


def _accumulate(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """Add the sum over tokens of x xᵀ (float32) to sums[name], in place; x (..., in)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if name in sums:
        sums[name].addmm_(flat.T, flat)
    else:
        sums[name] = flat.T @ flat


def _accumulating(
    sums: dict[str, torch.Tensor], name: str
) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
    """A forward pre-hook that accumulates its module's input into sums[name]."""
    return lambda _module, args: _accumulate(sums, name, args[0])


def _means(sums: dict[str, torch.Tensor], tokens: int) -> dict[str, np.ndarray]:
    """The sums divided by the token count, as read-only float32 (weights that share an input share the
    array); refused when they overflowed. The sums are used up: each is dropped once converted."""
    import torch

    means = {}
    for name in list(sums):
        with torch.inference_mode():  # the sums were made there
            mean = sums.pop(name).div_(tokens).float().numpy()
        if not np.isfinite(mean.sum(dtype=np.float64)):
            raise EdgelmError("activations overflowed to infinity or NaN (check the checkpoint's weights)")
        mean.setflags(write=False)
        means[name] = mean
    return means


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
