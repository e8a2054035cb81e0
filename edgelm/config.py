"""`ModelConfig`: the one description of a model, saved as a Hugging Face LlamaConfig `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.files import read_json, write_json_atomic


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-style decoder, named as in transformers' LlamaConfig."""

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

    def __post_init__(self) -> None:
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
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgelmError(f"config: {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgelmError(
                f"config: num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads} (check the source model's config)"
            )
        if self.head_dim % 2:
            raise EdgelmError(f"config: head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise EdgelmError(
                f"config: rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} must be positive"
            )
        for token_id in (self.bos_token_id, *self.eos_token_ids):
            if not 0 <= token_id < self.vocab_size:
                raise EdgelmError(
                    f"config: token id {token_id} is outside the vocabulary (vocab_size={self.vocab_size})"
                )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (config.json allows one id or a list)."""
        eos = self.eos_token_id
        return (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * self.num_attention_heads * self.head_dim * 2 + h * kv * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers, optimum and llama.cpp's converter read."""
        fields = dataclasses.asdict(self)
        if not isinstance(self.eos_token_id, int):
            fields["eos_token_id"] = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **fields,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Read a LlamaConfig dictionary; refuse what this model does not compute."""
        if data.get("model_type", "llama") != "llama":
            raise EdgelmError(
                f"{where}: model_type={data.get('model_type')!r} is not supported "
                "(edgelm runs the llama architecture)"
            )
        if data.get("hidden_act", "silu") != "silu":
            raise EdgelmError(f"{where}: hidden_act={data['hidden_act']!r} is not supported (only silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if data.get(flag):
                raise EdgelmError(f"{where}: {flag}=true is not supported yet")
        rope = data.get("rope_parameters") or {}
        scaling = data.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise EdgelmError(f"{where}: rope scaling {scaling!r} is not supported yet")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        for required in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if required not in values:
                raise EdgelmError(f"{where}: required key {required!r} is missing")
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        if "head_dim" not in values:
            if values["hidden_size"] % values["num_attention_heads"]:
                raise EdgelmError(
                    f"{where}: hidden_size does not divide by num_attention_heads and no head_dim is given"
                )
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        values.setdefault("tie_word_embeddings", False)  # LlamaConfig's default
        return cls(**values)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tied: bool, where: str) -> ModelConfig:
        """Read the `llama.*` hyperparameters of a GGUF file; `tied` when it has no output.weight."""
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise EdgelmError(f"{where}: architecture {arch!r} is not supported (edgelm runs llama)")

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"llama.{name}", default)
            if value is None:
                raise EdgelmError(f"{where}: metadata key llama.{name} is missing")
            return value

        heads, hidden = key("attention.head_count"), key("embedding_length")
        eos = [
            metadata[k]
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if k in metadata
        ]
        return cls(
            vocab_size=key("vocab_size", len(metadata.get("tokenizer.ggml.tokens") or []) or None),
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads),
            head_dim=key("attention.key_length", hidden // heads if heads else None),
            max_position_embeddings=key("context_length"),
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=key("rope.freq_base", 10000.0),
            tie_word_embeddings=tied,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id", 0),
            eos_token_id=eos[0] if len(eos) == 1 else tuple(eos) if eos else 1,
        )

    def save(self, directory: Path) -> None:
        """Write `config.json` into `directory` (atomically)."""
        write_json_atomic(directory / "config.json", self.to_hf_dict())

    @classmethod
    def load(cls, directory: Path) -> ModelConfig:
        """Read `config.json` from a checkpoint directory."""
        path = Path(directory) / "config.json"
        return cls.from_hf_dict(read_json(path), where=str(path))


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
