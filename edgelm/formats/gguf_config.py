"""A GGUF file's `<architecture>.*` hyperparameters → `ModelConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.formats.gguf import DEFAULT_TOKEN_IDS, GEMMA_SLIDING_EVERY, HF_ARCHITECTURES, gemma_query_scalar
from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_frequencies
from edgelm.model.rope_scaling import LinearRopeScaling, Llama3RopeScaling, LongRopeScaling
from edgelm.values import is_number


def config_from_gguf(metadata: dict[str, Any], tensor_names: Collection[str], where: str) -> ModelConfig:
    """Read the hyperparameters of a GGUF file of architecture llama, qwen2, qwen3, gemma2, gemma3 or
    phi3; its tensor names tell tied embeddings (no output.weight) and attention biases (q/k/v only, as
    Qwen2 has them, or all four). A llama file with q/k/v biases alone is a Qwen2 model (as edgelm wrote
    them before qwen2). RoPE scalings kept as tensors are the importer's (`rope_freqs`, LongRoPE's)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in HF_ARCHITECTURES:
        known = ", ".join(HF_ARCHITECTURES)
        raise EdgelmError(f"{where}: architecture {arch!r} is not supported (edgelm runs {known})")

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise EdgelmError(f"{where}: metadata key {arch}.{name} is missing")
        if not is_number(value):  # every hyperparameter read here is one number
            raise EdgelmError(f"{where}: metadata key {arch}.{name}={value!r:.60} is not a number")
        return value

    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads if heads else None)
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    rotary = key("rope.dimension_count", head_dim)
    if scaling not in ("none", "linear") or (rotary != head_dim and arch != "phi3"):
        raise EdgelmError(
            f"{where}: RoPE scaling {scaling!r} or a partial rotary dimension is not supported; edgelm "
            "runs full-width RoPE (partial in phi3), linear scaling and, from rope tensors, Llama 3's and "
            "Phi-3's LongRoPE"
        )
    rope_scaling = LinearRopeScaling(_shortest(key("rope.scaling.factor"))) if scaling == "linear" else None
    qkv_bias, o_bias = "blk.0.attn_q.bias" in tensor_names, "blk.0.attn_output.bias" in tensor_names
    architecture = HF_ARCHITECTURES[arch]
    if arch == "llama" and qkv_bias and not o_bias:
        architecture = "Qwen2ForCausalLM"
    # without the keys, llama.cpp's own defaults for the tokenizer model
    defaults = DEFAULT_TOKEN_IDS["llama" if metadata.get("tokenizer.ggml.model") == "llama" else "gpt2"]
    eos = [
        metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in metadata
    ] or [defaults["eos"]]
    return ModelConfig(
        vocab_size=key("vocab_size", len(metadata.get("tokenizer.ggml.tokens") or []) or None),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length"),
        rms_norm_eps=_shortest(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_shortest(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        partial_rotary_factor=rotary / head_dim if head_dim else 1.0,  # head_dim 0 is refused by name
        tie_word_embeddings="output.weight" not in tensor_names,
        architecture=architecture,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id", defaults["bos"]),
        eos_token_id=eos[0] if len(eos) == 1 else tuple(eos),
        **(_gemma_fields(metadata, arch, key) if arch in GEMMA_SLIDING_EVERY else {}),
    )


def _gemma_fields(metadata: dict[str, Any], arch: str, key: Callable[..., Any]) -> dict[str, Any]:
    """A Gemma file's own ModelConfig fields, with llama.cpp's defaults where a key is missing: the layer
    pattern, the window, the soft-caps, the local RoPE base (Gemma 3) and the attention scale llama.cpp
    computes."""
    layers, hidden, heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads if heads else None)
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", GEMMA_SLIDING_EVERY[arch])
    if isinstance(pattern, int):
        pattern = [i % pattern < pattern - 1 for i in range(layers)]
    window = metadata.get(f"{arch}.attention.sliding_window")
    return {
        "query_pre_attn_scalar": gemma_query_scalar(arch, layers, hidden, heads, head_dim),
        "attn_logit_softcapping": metadata.get(f"{arch}.attn_logit_softcapping"),
        "final_logit_softcapping": metadata.get(f"{arch}.final_logit_softcapping"),
        "layer_types": tuple("sliding_attention" if s and window else "full_attention" for s in pattern),
        "sliding_window": window,
        "rope_local_theta": _shortest(key("rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None,
    }


def _shortest(value: float) -> float:
    """GGUF stores these as float32: 1e-5 comes back as 9.99999975e-06. Return the shortest decimal that
    rounds to the same float32, the number the model's author wrote."""
    return float(str(np.float32(value)))


def llama3_scaling(
    factors: np.ndarray, config: ModelConfig, original: int | None, where: str
) -> Llama3RopeScaling:
    """Llama 3's RoPE scaling from llama.cpp's `rope_freqs` (by how much each pair's frequency is
    divided): the factor is the largest division, and the divisions between 1 and it follow
    1/f = (1 - s)/factor + s with s = original/(wavelength (high - low)) - low/(high - low), a line in
    1/wavelength whose two coefficients give low and high for the `original` context (a file rarely names
    it; 8192, Llama 3's, where not: any other gives the same frequencies), each rounded to the fewest
    significant digits that still recompute the factors. Refused when none does."""
    factors = np.asarray(factors, np.float64).reshape(-1)
    base = rope_frequencies(dataclasses.replace(config, rope_scaling=None)).astype(np.float64)
    if factors.shape != base.shape or not np.all(factors >= 1.0 - 1e-6):
        raise EdgelmError(f"{where}: rope_freqs of shape {factors.shape} are not Llama 3 factors")
    factor = float(factors.max())
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if factor <= 1 + 1e-4 or medium.sum() < 2:
        raise EdgelmError(f"{where}: rope_freqs cannot be read as Llama 3's scaling (too few smoothed pairs)")
    s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    inverse_wavelength = base[medium] / (2 * np.pi)
    slope, intercept = np.polyfit(inverse_wavelength, s, 1)  # s = slope / wavelength + intercept
    original = original or 8192
    span = original / slope  # high - low
    low = -intercept * span
    if not 0 < low < low + span:
        raise EdgelmError(
            f"{where}: rope_freqs cannot be read as Llama 3's scaling (they do not grow with the wavelength)"
        )
    for digits in range(2, 9):
        rounded = [float(f"{v:.{digits}g}") for v in (factor, low, low + span)]
        scaling = Llama3RopeScaling(rounded[0], rounded[1], rounded[2], original)
        recomputed = base / rope_frequencies(dataclasses.replace(config, rope_scaling=scaling))
        if np.abs(recomputed - factors).max() <= 1e-5 * factor:
            return scaling
    raise EdgelmError(f"{where}: rope_freqs cannot be read as Llama 3's scaling (no fit recomputes them)")


def longrope_scaling(short: np.ndarray, long: np.ndarray, original: int, attention: float) -> LongRopeScaling:
    """Phi-3's LongRoPE from llama.cpp's factor tensors (float32, read back as the decimals written)."""
    factors = [tuple(_shortest(v) for v in np.asarray(f).reshape(-1)) for f in (short, long)]
    return LongRopeScaling(factors[0], factors[1], int(original), _shortest(attention))
