"""`ModelConfig`: the one description of a model, saved as a Hugging Face `config.json`.

Six Hugging Face architectures compute the same decoder up to a few switches, and each is read exactly:
LlamaForCausalLM (optionally biases on all four attention projections, Llama 3 RoPE scaling),
MistralForCausalLM (a sliding window), Qwen2ForCausalLM (q/k/v biases, an optional sliding window),
Qwen3ForCausalLM (an RMSNorm on each head of q and k before RoPE, optionally all four biases),
Gemma2ForCausalLM (Gemma's layout, below; soft-capped attention and final logits; sliding-window attention
on alternate layers) and Gemma3ForCausalLM (Gemma's layout with q/k norms; local sliding-window layers
with their own RoPE base between global ones).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.files import read_json, write_json_atomic
from edgelm.model.hf_config import (
    ARCHITECTURES,
    GEMMA,
    GEMMA_FIELDS,
    LAYER_TYPES,
    QK_NORM,
    SUPPORTED,
    hf_fields,
)
from edgelm.model.rope_scaling import LongRopeScaling, RopeScaling
from edgelm.values import describe, is_int, matches

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: a GGUF file with more does not load
MAX_SIZE = 2**31 - 1  # sizes and the context: int32 in ONNX Runtime's attention, uint32 in GGUF
# tokens of context a runtime that reserves its KV cache up front takes when none is asked for, as
# llama.cpp's own tools default to (and onnxruntime-genai's default max_length in edgelm's folders)
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-style decoder, named as in transformers' LlamaConfig.

    architecture: one of `ARCHITECTURES`, the class transformers builds from the saved config.json; it
        also decides the switches that are not fields (`qk_norm`).
    qkv_bias, o_bias: whether the q/k/v projections and the o projection have biases. Llama and Qwen3 have
        all four (`attention_bias: true`) or none, Qwen2 always has q/k/v and never o, Mistral has none.
    rope_scaling: None for plain RoPE, Llama 3's frequency scaling or linear interpolation (for Gemma 3,
        of its global layers only).
    Gemma only (None or empty elsewhere): query_pre_attn_scalar (the attention scale is its inverse square
    root; None: head_dim), attn_logit_softcapping and final_logit_softcapping (cap * tanh(x / cap); None:
    off), layer_types (each layer's "full_attention" or "sliding_attention"), sliding_window (the sliding
    layers' window, the query's own position included), rope_local_theta (the sliding layers' RoPE base,
    Gemma 3). The other families' windows are not fields: a model whose window is shorter than its context
    is read with the context cut to the window, where full causal attention and windowed attention are
    the same.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1
    initializer_range: float = 0.02
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: RopeScaling | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_local_theta: float | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        self._check_types()
        self._check_shape()
        self._check_family()
        self._check_rope()
        self._check_gemma_fields()

    def _check_types(self) -> None:
        """Every field of the type its annotation names (a config.json or a GGUF file may hold anything)."""
        for name, hint in FIELD_TYPES.items():
            value = getattr(self, name)
            if not matches(value, hint):
                raise EdgelmError(f"config: {name}={value!r} must be {describe(hint)}")

    def _check_shape(self) -> None:
        """Sizes positive, within what the formats and llama.cpp hold, and divisible as attention needs
        them; special ids inside the vocabulary."""
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not 0 < value <= MAX_SIZE:
                raise EdgelmError(f"config: {name}={value!r} must be a positive integer below 2^31")
        if self.num_hidden_layers > MAX_LAYERS:
            raise EdgelmError(
                f"config: num_hidden_layers={self.num_hidden_layers} is more than the {MAX_LAYERS} layers "
                "llama.cpp builds"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgelmError(
                f"config: num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads} (check the source model's config)"
            )
        if not self.rms_norm_eps > 0:
            raise EdgelmError(f"config: rms_norm_eps={self.rms_norm_eps} must be positive")
        for token_id in (self.bos_token_id, *self.eos_token_ids):
            if not 0 <= token_id < self.vocab_size:
                raise EdgelmError(
                    f"config: token id {token_id} is outside the vocabulary (vocab_size={self.vocab_size})"
                )

    def _check_family(self) -> None:
        """A known architecture, with the attention biases it can have."""
        if self.architecture not in ARCHITECTURES:
            raise EdgelmError(f"config: architecture {self.architecture!r} is not supported; {SUPPORTED}")
        all_or_none, none = self.qkv_bias == self.o_bias, not (self.qkv_bias or self.o_bias)
        biases = {
            "MistralForCausalLM": none,
            "Qwen2ForCausalLM": self.qkv_bias and not self.o_bias,
            "Phi3ForCausalLM": none,
        }
        if not biases.get(self.architecture, all_or_none):
            raise EdgelmError(
                f"config: {self.architecture} cannot have qkv_bias={self.qkv_bias}, o_bias={self.o_bias} "
                "(Llama, Qwen3, Gemma: all four attention biases or none, Mistral, Phi-3: none, Qwen2: q/k/v "
                "only)"
            )

    def _check_rope(self) -> None:
        """An even number of rotated dimensions (fewer than head_dim only in Phi-3), a known scaling, and
        LongRoPE's factors for those dimensions."""
        if self.head_dim % 2:
            raise EdgelmError(f"config: head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or not self.rotary_dim:
            raise EdgelmError(
                f"config: partial_rotary_factor={self.partial_rotary_factor} of head_dim={self.head_dim} "
                "leaves no even number of rotary dimensions"
            )
        if self.partial_rotary_factor != 1 and self.architecture != "Phi3ForCausalLM":
            raise EdgelmError(f"config: partial_rotary_factor is Phi-3's, not {self.architecture}'s")
        if not self.rope_theta > 0:
            raise EdgelmError(f"config: rope_theta={self.rope_theta} must be positive")
        scaling = self.rope_scaling
        if isinstance(scaling, LongRopeScaling) and len(scaling.short_factor) != self.rotary_dim // 2:
            raise EdgelmError(
                f"config: longrope needs a factor for each of the {self.rotary_dim // 2} rotary pairs, "
                f"got {len(scaling.short_factor)}"
            )

    def _check_gemma_fields(self) -> None:
        """The fields only Gemma reads: unset elsewhere, and consistent."""
        if self.architecture not in GEMMA:
            given = [name for name in GEMMA_FIELDS if getattr(self, name) not in (None, ())]
            if given:
                raise EdgelmError(f"config: {', '.join(given)} apply to Gemma only, not {self.architecture}")
            return
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise EdgelmError(f"config: {name}={value!r} must be positive or null")
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise EdgelmError(
                f"config: layer_types must name {' or '.join(LAYER_TYPES)} for each of the "
                f"{self.num_hidden_layers} layers, got {list(self.layer_types)}"
            )
        window = self.sliding_window
        if "sliding_attention" in self.layer_types and not (is_int(window) and window > 0):
            raise EdgelmError(f"config: sliding_window={window!r} must be a positive integer")
        if (self.rope_local_theta is not None) != (self.architecture == "Gemma3ForCausalLM"):
            raise EdgelmError("config: rope_local_theta is Gemma 3's, and Gemma 3 needs it")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (config.json allows one id or a list)."""
        eos = self.eos_token_id
        return (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def qk_norm(self) -> bool:
        """Whether each head of q and k is RMS-normalized (a weight of head_dim each) before RoPE."""
        return self.architecture in QK_NORM

    @property
    def gemma_layout(self) -> bool:
        """Gemma's layout: RMSNorm as x * (1 + w), embeddings times √hidden, GELU (tanh approximation) in
        the gated MLP, and four norms per layer (before and after the attention and the MLP)."""
        return self.architecture in GEMMA

    @property
    def embedding_multiplier(self) -> float:
        """What the embedding rows are multiplied by before the first layer: √hidden for Gemma (rounded to
        float32 as transformers does), 1 elsewhere."""
        return float(np.float32(self.hidden_size**0.5)) if self.gemma_layout else 1.0

    @property
    def attention_scale(self) -> float:
        """The factor of q·k: 1/√query_pre_attn_scalar for Gemma, 1/√head_dim elsewhere."""
        return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions RoPE rotates (the first ones): all but in Phi-4-mini."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def fused_projections(self) -> bool:
        """Whether the checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3)."""
        return self.architecture == "Phi3ForCausalLM"

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends within `sliding_window` (Gemma's local layers)."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @property
    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * self.num_attention_heads * self.head_dim * 2 + h * kv * 2
        attention += (self.num_attention_heads * self.head_dim + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size
        norms = (4 if self.gemma_layout else 2) * h + 2 * self.head_dim * self.qk_norm
        per_layer = attention + mlp + norms
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` that transformers (v4 and v5), optimum and llama.cpp's converter read;
        `dtype` is the torch name of the weights' dtype, which transformers loads with dtype="auto".

        RoPE is written in the classic spelling, `rope_theta` + `rope_scaling`, which all of them read.
        """
        fields = dataclasses.asdict(self)
        for name in (
            "architecture",
            "qkv_bias",
            "o_bias",
            "rope_scaling",
            "partial_rotary_factor",
            *GEMMA_FIELDS,
        ):
            del fields[name]
        if not isinstance(self.eos_token_id, int):
            fields["eos_token_id"] = list(self.eos_token_id)
        gemma = {
            "attention_bias": self.o_bias,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
        }
        specific: dict[str, dict[str, Any]] = {
            "LlamaForCausalLM": {"attention_bias": self.o_bias, "mlp_bias": False},
            "MistralForCausalLM": {"sliding_window": None},
            "Qwen2ForCausalLM": {"use_sliding_window": False, "sliding_window": None},
            "Qwen3ForCausalLM": {
                "attention_bias": self.o_bias,
                "use_sliding_window": False,
                "sliding_window": None,
            },
            "Gemma2ForCausalLM": gemma,
            "Gemma3ForCausalLM": gemma | {"rope_local_base_freq": self.rope_local_theta},
            # Phi3Config's default pad id, 32000, would be outside a smaller vocabulary
            "Phi3ForCausalLM": {
                "sliding_window": None,
                "partial_rotary_factor": self.partial_rotary_factor,
                "pad_token_id": None,
            }
            | (
                {"original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings}
                if isinstance(self.rope_scaling, LongRopeScaling)
                else {}
            ),
        }
        return {
            "architectures": [self.architecture],
            "model_type": ARCHITECTURES[self.architecture],
            **fields,
            "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            **({} if self.gemma_layout else {"hidden_act": "silu"}),
            **specific[self.architecture],
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Read the config.json dictionary of a family edgelm runs; refuse what it does not compute
        (`hf_config.hf_fields` says how each family is read)."""
        if not isinstance(data, dict):
            raise EdgelmError(f"{where}: expected a JSON object, got {type(data).__name__}")
        return cls(**hf_fields(data, FIELD_TYPES, where))

    def save(self, directory: Path, dtype: str = "float32") -> None:
        """Write `config.json` into `directory` (atomically), naming `dtype` as the weights' dtype."""
        write_json_atomic(directory / "config.json", self.to_hf_dict(dtype))

    @classmethod
    def load(cls, directory: Path) -> ModelConfig:
        """Read `config.json` from a checkpoint directory."""
        path = Path(directory) / "config.json"
        return cls.from_hf_dict(read_json(path), where=str(path))


# each field's type, as its annotation names it: what `_check_types` and `hf_fields` hold values to
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(ModelConfig)

PRESETS: dict[str, ModelConfig] = {
    # about 1.3 M parameters: a useful code model after a few minutes on two CPU cores
    "tiny": ModelConfig(),
    # about 22 M parameters
    "small": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
    ),
    # about 100 M parameters, for a GPU
    "base": ModelConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset config, optionally with some fields replaced."""
    if name not in PRESETS:
        raise EdgelmError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
