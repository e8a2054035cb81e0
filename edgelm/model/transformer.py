"""The Llama-style decoder in PyTorch: RMSNorm, rotary embeddings, grouped-query attention (with Qwen3's
and Gemma 3's per-head q/k norms, Gemma's sliding windows and soft-capping), a gated MLP (SwiGLU, or GELU
for Gemma), and Gemma's layout (norms as x * (1 + w), before and after each sublayer; scaled embeddings).

Module and parameter names follow transformers' `LlamaForCausalLM`, so a state dict maps 1:1 onto the
Hugging Face tensor names of the checkpoint (`model.layers.0.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_attention_factor, rope_frequencies


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32; Gemma's (`plus_one`) is x / rms(x) * (1 + weight), the
    product taken in float32 too (as transformers computes each)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the activation dtype, as transformers does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rms_norm(config: ModelConfig, dim: int) -> RMSNorm:
    """The family's RMSNorm over `dim` values."""
    return RMSNorm(dim, config.rms_norm_eps, plus_one=config.gemma_layout)


# (cos, sin), each (T, head_dim), by whether a layer is a sliding (local) one
RopeTables = dict[bool, tuple[torch.Tensor, torch.Tensor]]


def rope_tables(config: ModelConfig, start: int, length: int, device: torch.device) -> RopeTables:
    """cos and sin of positions start..start+length-1 in the rotate-half layout, for the global layers and
    for the local ones (the same unless Gemma 3 gives them their own base)."""

    factor = rope_attention_factor(config)
    positions = torch.arange(start, start + length, device=device)

    def table(local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        frequencies = rope_frequencies(config, local, length=start + length)
        inv_freq = torch.from_numpy(frequencies).to(device)  # (d/2,)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2), d = rotary_dim
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, d)
        return angles.cos() * factor, angles.sin() * factor

    full = table(False)
    return {False: full, True: table(True) if config.rope_local_theta is not None else full}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hd) by the angles (T, d): the first and second halves of each head's first d
    dimensions form the pairs; the rest (Phi-4-mini's partial rotary) pass unrotated."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    rotated = torch.cat((-rot[..., d // 2 :], rot[..., : d // 2]), dim=-1)
    y = rot * cos + rotated * sin
    return (torch.cat((y, rest), dim=-1) if rest.shape[-1] else y).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far. The buffers double in length as the sequence grows, up to
    the context length, so that a model with a context of 128k tokens does not reserve it up front."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        shape = (batch, n_kv_heads, min(max_len, 512), head_dim)
        self.k: torch.Tensor  # (B, nkv, allocated, hd), registered as buffers so that .to() moves them
        self.v: torch.Tensor
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at positions start.. and return everything up to their end."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            length = min(self.max_len, max(end, 2 * self.k.shape[2]))
            grow = (0, 0, 0, length - self.k.shape[2])  # pad the sequence dimension
            self.k, self.v = F.pad(self.k, grow), F.pad(self.v, grow)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hd), at positions start.., over k and v (B, nkv, S, hd) at 0..S-1:
    each query sees the keys at and before its position, only the last `window` of them when windowed, its
    scores soft-capped (softcap * tanh(s / softcap)) when `softcap`; (B, nh, T, hd)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if softcap is None and window is None and (T == 1 or start == 0):
        # one new token attends to everything cached, or a first chunk to itself causally: no mask to build
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(start, start + T, device=q.device)[:, None]
    k_pos = torch.arange(S, device=q.device)[None, :]
    mask = k_pos <= q_pos  # (T, S)
    if window is not None:
        mask &= k_pos > q_pos - window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    # soft-capped scores (Gemma 2) are not something scaled_dot_product_attention computes
    if gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, nh, T, S)
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, and a KV cache when one is set up. Where the
    config says `qk_norm`, each head of q and k is RMS-normalized before the rotation; layer `layer` may be
    a sliding one, and Gemma 2 soft-caps the scores."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h, qkv_bias = config.hidden_size, config.qkv_bias
        self.sizes = [self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2]
        self.fused = config.fused_projections
        if self.fused:  # Phi-3 stores q, k and v as one matrix
            self.qkv_proj = nn.Linear(h, sum(self.sizes), bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(h, self.sizes[0], bias=qkv_bias)
            self.k_proj = nn.Linear(h, self.sizes[1], bias=qkv_bias)
            self.v_proj = nn.Linear(h, self.sizes[2], bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.o_bias)
        self.q_norm = rms_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = rms_norm(config, self.head_dim) if config.qk_norm else None
        self.scale = config.attention_scale
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.softcap = config.attn_logit_softcapping
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)  # (B, nkv, start+T, hd)
        y = attend(q, k, v, start if self.cache is not None else 0, self.scale, self.window, self.softcap)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)), or Gemma's GeGLU with GELU's tanh approximation; Phi-3 stores
    gate and up as one matrix, gate first."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, inner = config.hidden_size, config.intermediate_size
        self.gelu = config.gemma_layout
        self.fused = config.fused_projections
        if self.fused:
            self.gate_up_proj = nn.Linear(h, 2 * inner, bias=False)
        else:
            self.gate_proj = nn.Linear(h, inner, bias=False)
            self.up_proj = nn.Linear(h, inner, bias=False)
        self.down_proj = nn.Linear(inner, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (
            self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        )
        activated = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(activated * up)


class Block(nn.Module):
    """Decoder layer `layer`, pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). In Gemma's layout each
    sublayer's output is normed too (x + norm(attn(norm(x))), ...), and post_attention_layernorm is that
    norm of the attention's output; pre_feedforward_layernorm is then the MLP's input norm."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.sliding = config.is_sliding(layer)
        self.input_layernorm = rms_norm(config, h)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = rms_norm(config, h)
        self.pre_feedforward_layernorm = rms_norm(config, h) if config.gemma_layout else None
        self.post_feedforward_layernorm = rms_norm(config, h) if config.gemma_layout else None
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: RopeTables, start: int) -> torch.Tensor:
        cos, sin = rope[self.sliding]
        attended = self.self_attn(self.input_layernorm(x), cos, sin, start)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    """Embeddings, the blocks and the final norm: transformers' `LlamaModel`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config, config.hidden_size)


class Transformer(nn.Module):
    """The causal language model: `forward(ids)` gives logits; with a KV cache it continues a sequence."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training: normal(0, 0.02), residual projections scaled by depth."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights: 1, or 0 where the norm multiplies by 1 + weight
                nn.init.constant_(p, 0.0 if self.config.gemma_layout else 1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(
                    p, 0.0, std / math.sqrt(2 * self.config.num_hidden_layers), generator=generator
                )
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def setup_cache(self, batch: int = 1, max_len: int | None = None) -> None:
        """Allocate a KV cache in every layer; `forward(ids, start=...)` then appends to it."""
        max_len = max_len or self.config.max_position_embeddings
        p = self.lm_head.weight
        for block in self.model.layers:
            assert isinstance(block, Block)  # an nn.ModuleList hands out plain Modules
            block.self_attn.cache = KVCache(
                batch, self.config.num_key_value_heads, max_len, self.config.head_dim, p.dtype, p.device
            )

    def forward(self, ids: torch.Tensor, start: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for ids (B, T) at positions start..start+T-1 (only the last if last_only)."""
        T = ids.shape[1]
        rope = rope_tables(self.config, start, T, ids.device)
        x = self.model.embed_tokens(ids)  # (B, T, h)
        if self.config.gemma_layout:
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        for block in self.model.layers:
            x = block(x, rope, start)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, vocab)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)


def load_weights(model: Transformer, tensors: dict[str, np.ndarray], assign: bool = False) -> None:
    """Copy checkpoint tensors (HF names, as `checkpoint.load_checkpoint` returns them) into the model.

    With `assign`, the model's parameters become the arrays' own memory instead: build the model on the
    meta device first, and loading never holds the weights twice.
    """
    state = {name: torch.from_numpy(array) for name, array in tensors.items()}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=assign)
    if assign and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def weights_of(model: Transformer) -> dict[str, np.ndarray]:
    """The model's tensors by HF name as float32 numpy arrays, the tied head stored once."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {
        name: t.detach().float().cpu().numpy()
        for name, t in model.state_dict().items()
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    }
