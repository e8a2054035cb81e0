"""GGUF facts shared by the reader, the importer, the exporter and the runtimes: llama.cpp's architecture
and tensor names for each family, its q/k row order, its file types and its default token ids."""

from __future__ import annotations

import re

import numpy as np

from edgelm.errors import EdgelmError

# llama.cpp's default BOS/EOS ids when a file names none, by `tokenizer.ggml.model`: byte-level BPE ("gpt2")
# or SentencePiece ("llama")
DEFAULT_TOKEN_IDS = {"gpt2": {"bos": 11, "eos": 11}, "llama": {"bos": 1, "eos": 2}}


def file_type_name(file_type: int) -> str:
    """The name llama.cpp's quantize tool gives a `general.file_type` (llama_ftype): 15 → "q4_k_m"."""
    try:
        from gguf import LlamaFileType
    except ModuleNotFoundError:
        return f"file type {file_type}"
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return f"file type {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


# Hugging Face architecture → llama.cpp's (its converter writes Mistral as llama)
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# and back: the class a GGUF file's architecture is imported as
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# llama.cpp's architectures that rotate q/k in halves as transformers does (its NEOX RoPE type); llama
# rotates adjacent pairs, so its q/k rows are permuted on the way in and out (`permute_for_gguf`)
ROTATE_HALF_ARCHITECTURES = frozenset({"qwen2", "qwen3", "gemma2", "gemma3", "phi3"})
# llama.cpp's LongRoPE factors (Phi-3): tensors of the file, not of the checkpoint
LONGROPE_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")
# llama.cpp's Gemma files store every norm weight w as 1 + w (its converter adds the one)
NORM_PLUS_ONE_ARCHITECTURES = frozenset({"gemma2", "gemma3"})

# llama.cpp's Gemma reads no query_pre_attn_scalar: it scales attention by 1/√head_dim, or by
# 1/√(hidden/heads) in the 27 B models, which it knows by their layer count
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's Gemma layer patterns when a file names none: layer i is a sliding one when i % n < n - 1
GEMMA_SLIDING_EVERY = {"gemma2": 2, "gemma3": 6}


def gemma_query_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp's Gemma architecture computes with."""
    return hidden // heads if layers == _GEMMA_27B_LAYERS.get(arch) else head_dim


# Hugging Face tensor name → GGUF tensor name
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma's four norms: post_attention_layernorm is the attention output's, pre_feedforward_layernorm the MLP's
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Phi-3's fused matrices: its ffn_up is gate and up together
_PHI3_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _layer_names(arch: str) -> dict[str, str]:
    if arch == "phi3":
        return _PHI3_LAYER_NAMES
    return _GEMMA_LAYER_NAMES if arch in NORM_PLUS_ONE_ARCHITECTURES else _LAYER_NAMES


def gguf_name(hf_name: str, arch: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight` (and likewise for `.bias`), in
    llama.cpp's names for the architecture."""
    stem, kind = hf_name.rsplit(".", 1)
    if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
        return f"blk.{match[1]}.{_layer_names(arch)[match[2]]}.{kind}"
    return f"{_GLOBAL_NAMES[stem]}.{kind}"


def hf_name(name: str, arch: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; the inverse of `gguf_name`."""
    stem, kind = name.rsplit(".", 1)
    if match := re.fullmatch(r"blk\.(\d+)\.(.+)", stem):
        layer_names = {v: k for k, v in _layer_names(arch).items()}
        if match[2] in layer_names:
            return f"model.layers.{match[1]}.{layer_names[match[2]]}.{kind}"
    global_names = {v: k for k, v in _GLOBAL_NAMES.items()}
    if stem not in global_names:
        raise EdgelmError(f"GGUF tensor {name!r} has no counterpart in a checkpoint of architecture {arch}")
    return f"{global_names[stem]}.{kind}"


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half RoPE pairs (i, i + d/2) to GGUF's adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_for_gguf`: GGUF's adjacent RoPE pairs back to HF's rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
