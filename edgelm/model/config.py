"""`ModelConfig`: the one description of a model, saved as a Hugging Face `config.json`.

Four Hugging Face architectures compute the same decoder up to a few switches, and each is read exactly:
LlamaForCausalLM (optionally biases on all four attention projections, Llama 3 RoPE scaling),
MistralForCausalLM (a sliding window), Qwen2ForCausalLM (q/k/v biases, an optional sliding window) and
Qwen3ForCausalLM (an RMSNorm on each head of q and k before RoPE, optionally all four biases).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.files import read_json, write_json_atomic
from edgelm.values import is_int

# architecture (config.json "architectures") → transformers model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# the architectures that normalize each head of q and k (RMSNorm over head_dim) before RoPE
QK_NORM = frozenset({"Qwen3ForCausalLM"})
SUPPORTED = (
    "edgelm supports LlamaForCausalLM (Llama 2/3, TinyLlama, SmolLM), MistralForCausalLM, Qwen2ForCausalLM, "
    "Qwen3ForCausalLM; "
    "for other architectures, `edgelm export onnx --via optimum` covers more for ONNX"
)
# transformers' defaults (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config) for keys a config.json may
# leave out; Llama's num_key_value_heads defaults to num_attention_heads
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "MistralForCausalLM": {
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
    },
    "Qwen2ForCausalLM": {
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 28,
    },
    "Qwen3ForCausalLM": {
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 28,
    },
}


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (`"rope_type": "llama3"`), as transformers computes it.

    Wavelengths shorter than original_max_position_embeddings / high_freq_factor keep their frequency,
    those longer than original_max_position_embeddings / low_freq_factor are slowed by `factor`, and the
    ones between are interpolated smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not self.factor > 0 or not 0 < self.low_freq_factor < self.high_freq_factor:
            raise EdgelmError(
                f"config: llama3 rope scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, "
                f"got {self.factor}, {self.low_freq_factor}, {self.high_freq_factor}"
            )
        original = self.original_max_position_embeddings
        if not is_int(original) or original <= 0:
            raise EdgelmError(
                f"config: llama3 rope scaling original_max_position_embeddings={original!r} "
                "must be a positive integer"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `rope_scaling` dictionary of config.json."""
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-style decoder, named as in transformers' LlamaConfig.

    architecture: one of `ARCHITECTURES`, the class transformers builds from the saved config.json; it
        also decides the switches that are not fields (`qk_norm`).
    qkv_bias, o_bias: whether the q/k/v projections and the o projection have biases. Llama and Qwen3 have
        all four (`attention_bias: true`) or none, Qwen2 always has q/k/v and never o, Mistral has none.
    rope_scaling: None for plain RoPE, or Llama 3's frequency scaling.
    A sliding window is not a field: a model whose window is shorter than its context is read with the
    context cut to the window, where full causal attention and windowed attention are the same.
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
    rope_scaling: Llama3RopeScaling | None = None

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
            if not is_int(value) or value <= 0:
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
        if self.architecture not in ARCHITECTURES:
            raise EdgelmError(f"config: architecture {self.architecture!r} is not supported; {SUPPORTED}")
        biases = {
            "LlamaForCausalLM": self.qkv_bias == self.o_bias,
            "MistralForCausalLM": not (self.qkv_bias or self.o_bias),
            "Qwen2ForCausalLM": self.qkv_bias and not self.o_bias,
            "Qwen3ForCausalLM": self.qkv_bias == self.o_bias,
        }
        if not biases[self.architecture]:
            raise EdgelmError(
                f"config: {self.architecture} cannot have qkv_bias={self.qkv_bias}, o_bias={self.o_bias} "
                "(Llama, Qwen3: all four attention biases or none, Mistral: none, Qwen2: q/k/v only)"
            )
        if not isinstance(self.rope_scaling, (Llama3RopeScaling, type(None))):
            raise EdgelmError(f"config: rope_scaling={self.rope_scaling!r} must be Llama3RopeScaling or None")

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
    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * self.num_attention_heads * self.head_dim * 2 + h * kv * 2
        attention += (self.num_attention_heads * self.head_dim + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h + 2 * self.head_dim * self.qk_norm
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` that transformers (v4 and v5), optimum and llama.cpp's converter read;
        `dtype` is the torch name of the weights' dtype, which transformers loads with dtype="auto".

        RoPE is written in the classic spelling, `rope_theta` + `rope_scaling`, which all of them read.
        """
        fields = dataclasses.asdict(self)
        for name in ("architecture", "qkv_bias", "o_bias", "rope_scaling"):
            del fields[name]
        if not isinstance(self.eos_token_id, int):
            fields["eos_token_id"] = list(self.eos_token_id)
        specific: dict[str, dict[str, Any]] = {
            "LlamaForCausalLM": {"attention_bias": self.o_bias, "mlp_bias": False},
            "MistralForCausalLM": {"sliding_window": None},
            "Qwen2ForCausalLM": {"use_sliding_window": False, "sliding_window": None},
            "Qwen3ForCausalLM": {
                "attention_bias": self.o_bias,
                "use_sliding_window": False,
                "sliding_window": None,
            },
        }
        return {
            "architectures": [self.architecture],
            "model_type": ARCHITECTURES[self.architecture],
            **fields,
            "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            "hidden_act": "silu",
            **specific[self.architecture],
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Read a Llama, Mistral, Qwen2 or Qwen3 config dictionary; refuse what this model does not compute.

        Keys that the dictionary leaves out take transformers' defaults for its architecture. RoPE settings
        are read in both spellings, `rope_theta` + `rope_scaling` (transformers v4) and `rope_parameters`
        (v5). A sliding window that is in use and shorter than max_position_embeddings becomes the context
        length instead: up to the window's length, windowed attention and full causal attention are the same
        computation, so the model computes exactly what transformers does on every sequence it accepts.
        """
        architecture = hf_architecture(data, where)
        if data.get("hidden_act", "silu") != "silu":
            raise EdgelmError(f"{where}: hidden_act={data['hidden_act']!r} is not supported (only silu)")
        if quantization := data.get("quantization_config"):
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
            raise EdgelmError(
                f"{where}: the weights are quantized ({method}); edgelm reads unquantized F32, F16 or BF16 "
                "weights, so use the original model"
            )
        if architecture == "LlamaForCausalLM" and data.get("mlp_bias"):
            raise EdgelmError(f"{where}: mlp_bias=true is not supported yet")
        derived = {"architecture", "qkv_bias", "o_bias", "rope_theta", "rope_scaling"}
        known = {f.name for f in dataclasses.fields(cls)} - derived
        given = {k: v for k, v in data.items() if v is not None}
        values = {k: v for k, v in {**HF_DEFAULTS[architecture], **given}.items() if k in known}
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
        rope_theta, rope_scaling = hf_rope(data, values["max_position_embeddings"], where)
        window = hf_sliding_window(data, architecture, values["num_hidden_layers"], where)
        if window is not None and window < values["max_position_embeddings"]:
            values["max_position_embeddings"] = window
        attention_bias = bool(data.get("attention_bias", False))
        qkv_bias, o_bias = {
            "LlamaForCausalLM": (attention_bias, attention_bias),
            "MistralForCausalLM": (False, False),  # transformers' Mistral ignores attention_bias
            "Qwen2ForCausalLM": (True, False),
            "Qwen3ForCausalLM": (attention_bias, attention_bias),
        }[architecture]
        return cls(
            **values,
            architecture=architecture,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
        )

    def save(self, directory: Path, dtype: str = "float32") -> None:
        """Write `config.json` into `directory` (atomically), naming `dtype` as the weights' dtype."""
        write_json_atomic(directory / "config.json", self.to_hf_dict(dtype))

    @classmethod
    def load(cls, directory: Path) -> ModelConfig:
        """Read `config.json` from a checkpoint directory."""
        path = Path(directory) / "config.json"
        return cls.from_hf_dict(read_json(path), where=str(path))


def hf_architecture(data: dict[str, Any], where: str = "config.json") -> str:
    """The architecture of a config.json, from `model_type` (which transformers' Auto classes follow) or,
    in old files without it, `architectures`; an architecture edgelm does not run is refused by name."""
    names = data.get("architectures") or []
    names = names if isinstance(names, list) else [names]
    model_type = data.get("model_type")
    by_model_type = {v: k for k, v in ARCHITECTURES.items()}
    if model_type is not None and model_type not in by_model_type:
        listed = f" (architectures: {', '.join(map(str, names))})" if names else ""
        raise EdgelmError(f"{where}: model_type={model_type!r} is not supported{listed}; {SUPPORTED}")
    for name in names:
        if name not in ARCHITECTURES:
            raise EdgelmError(f"{where}: architecture {name!r} is not supported; {SUPPORTED}")
    if model_type is None:
        return names[0] if names else "LlamaForCausalLM"
    return by_model_type[model_type]


def hf_rope(
    data: dict[str, Any], max_position_embeddings: int, where: str = "config.json"
) -> tuple[float, Llama3RopeScaling | None]:
    """rope_theta and the frequency scaling of a config.json, read as transformers v5 does.

    The settings are `rope_scaling` (v4) or `rope_parameters` (v5); rope_theta is theirs or the top-level key.
    """
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise EdgelmError(f"{where}: rope parameters {params!r} are not supported (expected one dictionary)")
    theta = next((v for v in (params.get("rope_theta"), data.get("rope_theta")) if v is not None), 10000.0)
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise EdgelmError(f"{where}: partial_rotary_factor={partial} is not supported (rotary on all dims)")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise EdgelmError(
            f"{where}: rope_type {rope_type!r} is not supported; edgelm computes plain RoPE "
            "and Llama 3's scaling (rope_type 'llama3')"
        )
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if params.get(k) is None]
    if missing:
        raise EdgelmError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    original = next(
        v
        for v in (
            data.get("original_max_position_embeddings"),
            params.get("original_max_position_embeddings"),
            max_position_embeddings,
        )
        if v is not None
    )
    scaling = Llama3RopeScaling(
        float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]), original
    )
    return float(theta), scaling


def hf_sliding_window(
    data: dict[str, Any], architecture: str, num_layers: int, where: str = "config.json"
) -> int | None:
    """The attention window of a config.json, or None where every layer attends to the whole sequence.

    Mistral windows every layer unless sliding_window is null; Qwen2 and Qwen3 window the layers from
    max_window_layers on (or those `layer_types` marks), and only when use_sliding_window is true.
    """
    if architecture == "LlamaForCausalLM":
        return None
    window = data.get("sliding_window", HF_DEFAULTS[architecture]["sliding_window"])
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not data.get("use_sliding_window", False):
            return None
        first = data.get("max_window_layers")
        first = HF_DEFAULTS[architecture]["max_window_layers"] if first is None else first
        layer_types = data.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        ]
        if "sliding_attention" not in layer_types:
            return None
    if window is not None and (not is_int(window) or window <= 0):
        raise EdgelmError(f"{where}: sliding_window={window!r} must be a positive integer or null")
    return None if window is None else int(window)


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
