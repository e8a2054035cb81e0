"""A Hugging Face config.json → the values of `ModelConfig`'s fields, for each family transformers defines:
its class and model_type, its defaults for keys a file leaves out, both spellings of RoPE (transformers v4
and v5), its sliding windows, and what edgelm refuses. Writing config.json is `ModelConfig.to_hf_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.model.rope_scaling import LinearRopeScaling, Llama3RopeScaling, LongRopeScaling, RopeScaling
from edgelm.values import describe, is_int, matches, number

# architecture (config.json "architectures") → transformers model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
}
# the architectures that normalize each head of q and k (RMSNorm over head_dim) before RoPE
QK_NORM = frozenset({"Qwen3ForCausalLM", "Gemma3ForCausalLM"})
# Gemma's layout: RMSNorm as x * (1 + w), embeddings times √hidden, GELU (tanh) in the gated MLP, and a
# norm after the attention and after the MLP as well as before each
GEMMA = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
LAYER_TYPES = ("full_attention", "sliding_attention")
SUPPORTED = (
    "edgelm supports LlamaForCausalLM (Llama 2/3, TinyLlama, SmolLM), MistralForCausalLM, Qwen2ForCausalLM, "
    "Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text), Phi3ForCausalLM (Phi-3, Phi-4-mini); "
    "for other architectures, `edgelm export onnx --via optimum` covers more for ONNX"
)
# transformers' defaults (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Gemma2Config,
# Gemma3TextConfig) for keys a config.json may leave out; Llama's num_key_value_heads defaults to
# num_attention_heads
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
    "Gemma2ForCausalLM": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "Gemma3ForCausalLM": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
    },
    "Phi3ForCausalLM": {
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "sliding_window": None,
    },
}


# ModelConfig's fields that only Gemma reads (hf_gemma), and those computed here rather than copied
GEMMA_FIELDS = (
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "layer_types",
    "sliding_window",
    "rope_local_theta",
)
_DERIVED = {
    "architecture",
    "qkv_bias",
    "o_bias",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    *GEMMA_FIELDS,
}


def hf_fields(data: dict[str, Any], fields: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The values of ModelConfig's `fields` (name → type) that a config.json dictionary gives, each of its
    type; what edgelm does not compute is refused with an EdgelmError that names it.

    Keys that the dictionary leaves out take transformers' defaults for its architecture. RoPE settings
    are read in both spellings, `rope_theta` + `rope_scaling` (transformers v4) and `rope_parameters` (v5).
    Outside Gemma, a sliding window that is in use and shorter than max_position_embeddings becomes the
    context length instead: up to the window's length, windowed attention and full causal attention are the
    same computation, so the model computes exactly what transformers does on every sequence it accepts.
    Gemma's windows are computed as they are (`hf_gemma`).
    """
    architecture = hf_architecture(data, where)
    _refuse_unsupported(data, architecture, where)
    given = {k: v for k, v in data.items() if v is not None}
    known = set(fields) - _DERIVED
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
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = tuple(values["eos_token_id"])
    for name, value in values.items():  # before any arithmetic on them
        if not matches(value, fields[name]):
            raise EdgelmError(f"{where}: {name}={value!r} must be {describe(fields[name])}")
    if "head_dim" not in values:
        heads = values["num_attention_heads"]
        if heads <= 0 or values["hidden_size"] % heads:
            raise EdgelmError(
                f"{where}: hidden_size does not divide by num_attention_heads={heads}, and no head_dim given"
            )
        values["head_dim"] = values["hidden_size"] // heads
    layers, context = values["num_hidden_layers"], values["max_position_embeddings"]
    if architecture in GEMMA:
        values |= hf_gemma(data, architecture, layers, context, where)
    else:
        values |= _rope_and_context(data, architecture, layers, context, where)
    attention_bias = data.get("attention_bias") or False  # null: none, as transformers reads it
    if not isinstance(attention_bias, bool):
        raise EdgelmError(f"{where}: attention_bias={attention_bias!r} must be true or false")
    qkv_bias, o_bias = {
        "MistralForCausalLM": (False, False),  # transformers' Mistral ignores attention_bias
        "Qwen2ForCausalLM": (True, False),
    }.get(architecture, (attention_bias, attention_bias))
    return values | {"architecture": architecture, "qkv_bias": qkv_bias, "o_bias": o_bias}


def _rope_and_context(
    data: dict[str, Any], architecture: str, num_layers: int, context: int, where: str
) -> dict[str, Any]:
    """RoPE (Phi-3's partial rotary too) and the context outside Gemma, cut to a sliding window shorter
    than it."""
    phi3 = architecture == "Phi3ForCausalLM"
    theta, scaling = hf_rope(data, context, where, partial=phi3)
    values: dict[str, Any] = {"rope_theta": theta, "rope_scaling": scaling}
    if phi3:
        params = data.get("rope_parameters") or {}
        partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
        values["partial_rotary_factor"] = (
            1.0 if partial is None else number(partial, "partial_rotary_factor", where)
        )
    window = hf_sliding_window(data, architecture, num_layers, where)
    return values | {"max_position_embeddings": min(context, window or context)}


def _refuse_unsupported(data: dict[str, Any], architecture: str, where: str) -> None:
    """Refuse quantized weights, another activation, and MLP biases."""
    if architecture in GEMMA:
        activation = data.get("hidden_activation") or data.get("hidden_act") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise EdgelmError(
                f"{where}: hidden_activation={activation!r} is not supported (Gemma: gelu_pytorch_tanh)"
            )
    elif data.get("hidden_act", "silu") != "silu":
        raise EdgelmError(f"{where}: hidden_act={data['hidden_act']!r} is not supported (only silu)")
    if quantization := data.get("quantization_config"):
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise EdgelmError(
            f"{where}: the weights are quantized ({method}); edgelm reads unquantized F32, F16 or BF16 "
            "weights, so use the original model"
        )
    if data.get("mlp_bias"):
        raise EdgelmError(f"{where}: mlp_bias=true is not supported yet")


def hf_gemma(
    data: dict[str, Any], architecture: str, num_layers: int, max_position_embeddings: int, where: str
) -> dict[str, Any]:
    """Gemma's own fields and its RoPE: the attention scale, the soft-caps (a null one is off), each layer's
    type (`layer_types`, else Gemma 2's alternation from a sliding first layer or Gemma 3's
    `sliding_window_pattern`: every n-th layer global) and the window (null: every layer global)."""
    defaults = HF_DEFAULTS[architecture]

    def get(key: str) -> Any:
        return data[key] if key in data else defaults.get(key)

    if architecture == "Gemma2ForCausalLM":
        pattern = [i % 2 == 0 for i in range(num_layers)]
        theta, scaling = hf_rope(data, max_position_embeddings, where)
        local_theta = None
    else:
        every = get("sliding_window_pattern")
        if not is_int(every) or every <= 0:
            raise EdgelmError(f"{where}: sliding_window_pattern={every!r} must be a positive integer")
        pattern = [(i + 1) % every != 0 for i in range(num_layers)]
        theta, scaling, local_theta = hf_gemma3_rope(data, max_position_embeddings, where)
    types = data.get("layer_types") or ["sliding_attention" if p else "full_attention" for p in pattern]
    window = get("sliding_window")
    if window is None:
        types = ["full_attention"] * num_layers
    elif not is_int(window) or window <= 0:
        raise EdgelmError(f"{where}: sliding_window={window!r} must be a positive integer or null")
    return {
        "query_pre_attn_scalar": get("query_pre_attn_scalar"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
        "layer_types": tuple(types),
        "sliding_window": window,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_local_theta": local_theta,
    }


def hf_gemma3_rope(
    data: dict[str, Any], max_position_embeddings: int, where: str
) -> tuple[float, RopeScaling | None, float]:
    """Gemma 3's RoPE: the global layers' base and scaling, and the local layers' base, from v5's
    `rope_parameters` by layer type or v4's rope_theta, rope_scaling and rope_local_base_freq."""
    params = data.get("rope_parameters")
    defaults = HF_DEFAULTS["Gemma3ForCausalLM"]
    # transformers reads the layer types' own dictionaries, whatever else the dictionary holds
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        theta, scaling = _rope_parameters(full, data, max_position_embeddings, where, defaults["rope_theta"])
        local_theta, local_scaling = _rope_parameters(
            local, {}, max_position_embeddings, where, defaults["rope_local_base_freq"]
        )
        if local_scaling is not None:
            raise EdgelmError(f"{where}: RoPE scaling of Gemma 3's sliding layers is not supported")
        return theta, scaling, local_theta
    theta, scaling = hf_rope(data, max_position_embeddings, where, defaults["rope_theta"])
    local = data.get("rope_local_base_freq") or defaults["rope_local_base_freq"]
    return theta, scaling, number(local, "rope_local_base_freq", where)


def hf_architecture(data: dict[str, Any], where: str = "config.json") -> str:
    """The architecture of a config.json, from `model_type` (which transformers' Auto classes follow) or,
    in old files without it, `architectures`; an architecture edgelm does not run is refused by name."""
    names = data.get("architectures") or []
    names = names if isinstance(names, list) else [names]
    model_type = data.get("model_type")
    if not all(isinstance(v, str) for v in (*names, model_type or "")):
        raise EdgelmError(f"{where}: model_type and architectures must be strings")
    by_model_type = {v: k for k, v in ARCHITECTURES.items()}
    if model_type is not None and model_type not in by_model_type:
        listed = f" (architectures: {', '.join(map(str, names))})" if names else ""
        if model_type == "gemma3":  # the multimodal model, whose text model is in text_config
            listed += " (Gemma 3 with vision: edgelm runs its text model, Gemma3ForCausalLM)"
        raise EdgelmError(f"{where}: model_type={model_type!r} is not supported{listed}; {SUPPORTED}")
    for name in names:
        if name not in ARCHITECTURES:
            raise EdgelmError(f"{where}: architecture {name!r} is not supported; {SUPPORTED}")
    if model_type is None:
        return names[0] if names else "LlamaForCausalLM"
    return by_model_type[model_type]


def hf_rope(
    data: dict[str, Any],
    max_position_embeddings: int,
    where: str = "config.json",
    theta: float = 10000.0,
    partial: bool = False,
) -> tuple[float, RopeScaling | None]:
    """rope_theta and the frequency scaling of a config.json, read as transformers v5 does.

    The settings are `rope_scaling` (v4) or `rope_parameters` (v5); rope_theta is theirs or the top-level key
    (or `theta`, the family's default). A partial rotary factor is refused unless `partial` (Phi-3, whose
    reader takes it).
    """
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise EdgelmError(f"{where}: rope parameters {params!r} are not supported (expected one dictionary)")
    return _rope_parameters(params, data, max_position_embeddings, where, theta, partial)


def _rope_parameters(
    params: dict[str, Any],
    data: dict[str, Any],
    max_position_embeddings: int,
    where: str,
    theta: float,
    partial: bool = False,
) -> tuple[float, RopeScaling | None]:
    """The base and scaling of one RoPE dictionary (`data` gives the top-level keys v4 keeps outside it,
    `theta` the default base)."""
    given = next((v for v in (params.get("rope_theta"), data.get("rope_theta")) if v is not None), theta)
    theta = number(given, "rope_theta", where)
    factor = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0) and not partial:
        raise EdgelmError(f"{where}: partial_rotary_factor={factor} is not supported (rotary on all dims)")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "longrope":
        return theta, _longrope(params, data, max_position_embeddings, where)
    if rope_type == "linear":
        if params.get("factor") is None:
            raise EdgelmError(f"{where}: linear rope scaling lacks its factor")
        return theta, LinearRopeScaling(number(params["factor"], "rope factor", where))
    if rope_type != "llama3":
        raise EdgelmError(
            f"{where}: rope_type {rope_type!r} is not supported; edgelm computes plain RoPE, "
            "Llama 3's scaling (rope_type 'llama3'), linear interpolation ('linear') and LongRoPE "
            "('longrope')"
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
    factor, low, high = (
        number(params[k], k, where) for k in ("factor", "low_freq_factor", "high_freq_factor")
    )
    return theta, Llama3RopeScaling(factor, low, high, original)


def _longrope(
    params: dict[str, Any], data: dict[str, Any], max_position_embeddings: int, where: str
) -> LongRopeScaling:
    """Phi-3's LongRoPE, its attention factor computed as transformers does where the file gives none:
    √(1 + ln(factor) / ln(original)), factor = the published context / the original one."""
    original = params.get("original_max_position_embeddings") or data.get("original_max_position_embeddings")
    if original is not None and not (is_int(original) and original > 0):
        raise EdgelmError(
            f"{where}: original_max_position_embeddings={original!r} must be a positive integer"
        )
    needed = {"short_factor": params.get("short_factor"), "long_factor": params.get("long_factor")}
    missing = [k for k, v in {**needed, "original_max_position_embeddings": original}.items() if not v]
    if missing:
        raise EdgelmError(f"{where}: longrope lacks {', '.join(missing)}")
    assert is_int(original)  # refused above as missing or not one
    factor = number(params.get("factor") or max_position_embeddings / original, "rope factor", where)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    attention = number(attention, "attention_factor", where)
    short, long = (_factors(params[k], k, where) for k in ("short_factor", "long_factor"))
    # cos and sin are float32: the factor's float32 value (its shortest decimal) is the one that counts
    return LongRopeScaling(short, long, int(original), float(str(np.float32(attention))))


def _factors(values: Any, name: str, where: str) -> tuple[float, ...]:
    """A list of numbers (LongRoPE's factors) as floats."""
    if not isinstance(values, list):
        raise EdgelmError(f"{where}: {name}={values!r} must be a list of numbers")
    return tuple(number(v, name, where) for v in values)


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
        if not is_int(first):
            raise EdgelmError(f"{where}: max_window_layers={first!r} must be an integer")
        layer_types = data.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        ]
        if "sliding_attention" not in layer_types:
            return None
    if window is not None and (not is_int(window) or window <= 0):
        raise EdgelmError(f"{where}: sliding_window={window!r} must be a positive integer or null")
    return None if window is None else int(window)
