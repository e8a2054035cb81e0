"""Which GGUF type each tensor gets: the mixtures (`--quant`) and llama.cpp's per-tensor rules for them.

This is the policy of a GGUF export; `gguf` writes the file and `gguf_blocks` packs the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgelm.errors import missing_dependency

try:
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F
except ModuleNotFoundError as e:
    raise missing_dependency("gguf", "gguf") from e


@dataclass(frozen=True)
class Mixture:
    """A user-facing quantization choice: the type of most matrices and llama.cpp's file type."""

    base: T
    file_type: F
    head: T | None = None  # output matrix (and a tied embedding); None = llama.cpp's rule
    embedding: T | None = None  # untied token embedding; None = base
    more_bits: T | None = None  # attn_v (attn_qkv) and ffn_down of the layers use_more_bits picks (Q4_K_M)


MIXTURES: dict[str, Mixture] = {
    "f32": Mixture(T.F32, F.ALL_F32, head=T.F32),
    "f16": Mixture(T.F16, F.MOSTLY_F16, head=T.F16),
    "bf16": Mixture(T.BF16, F.MOSTLY_BF16, head=T.BF16),
    "q8_0": Mixture(T.Q8_0, F.MOSTLY_Q8_0, head=T.Q8_0),
    "q8_0_f16emb": Mixture(T.Q8_0, F.MOSTLY_Q8_0, head=T.F16, embedding=T.F16),
    "q4_0": Mixture(T.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": Mixture(T.Q4_1, F.MOSTLY_Q4_1),
    "q4_k": Mixture(T.Q4_K, F.MOSTLY_Q4_K_S),
    "q6_k": Mixture(T.Q6_K, F.MOSTLY_Q6_K),
    "q4_k_m": Mixture(T.Q4_K, F.MOSTLY_Q4_K_M, more_bits=T.Q6_K),
}

# llama.cpp's substitutes when a row's length is not a multiple of a K-quant's 256-value super-block
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixtures: the first and last eighth, and
    every third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], mixture: Mixture, n_layers: int, tied: bool) -> T:
    """The GGUF type of one tensor (GGUF name, numpy shape) under a mixture, following llama.cpp."""
    if len(shape) == 1:
        return T.F32
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_head:
        chosen = mixture.head if mixture.head is not None else T.Q8_0 if shape[1] % 256 else T.Q6_K
    elif name == "token_embd.weight":
        chosen = mixture.embedding if mixture.embedding is not None else mixture.base
    else:
        chosen = mixture.base
        # Phi-3's fused attn_qkv takes attn_v's rule
        wants_more = name.endswith(("attn_v.weight", "attn_qkv.weight", "ffn_down.weight"))
        if mixture.more_bits is not None and wants_more and use_more_bits(int(name.split(".")[1]), n_layers):
            chosen = mixture.more_bits
    if chosen in K_FALLBACK and shape[1] % 256:
        chosen = K_FALLBACK[chosen]
    return chosen
