"""The decoder as an ONNX graph on ONNX Runtime's fused operators, written node by node from numpy arrays.

Node names follow onnxruntime-genai's builders (`/model/layers.0/attn/qkv_proj/MatMulNBits`), so a graph
from either reads the same in Netron. Each subgraph builder below draws its nodes; together:

    input_ids ─ Gather ─┬─ RMSNormalization ─ qkv MatMul ─ GroupQueryAttention ─ o MatMul ─┐
                        └──────────────── SkipSimplifiedLayerNormalization (residual + norm) ◀──────────┘
                              ─ gate_up MatMul ─ Split ─ SiLU(gate) * up ─ down MatMul ─ Skip…Norm ─ …
                                                                          ─ final Skip…Norm ─ lm_head ─ logits
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelm._version import __version__
from edgelm.errors import missing_dependency
from edgelm.export.onnx_pack import pack_matmul_nbits
from edgelm.export.onnx_quant import Matrix, Precision, QuantOptions, quantize_matrices
from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_cos_sin
from edgelm.quant.blocks import QuantizedBlocks

try:
    import onnx
    from onnx import TensorProto, helper
except ModuleNotFoundError as e:
    raise missing_dependency("onnx", "onnx") from e

OPSET = 23  # RMSNormalization
MS_DOMAIN = "com.microsoft"
IR_VERSION = 11
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


class _Graph:
    """Nodes and initializers as they are added; names follow `/model/layers.N/part/Op`."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.added: set[str] = set()  # initializers that several nodes share

    def node(
        self, op: str, inputs: list[str], name: str, outputs: int = 1, ms: bool = False, **attrs: Any
    ) -> list[str]:
        """Add a node named `name/op`; return its output names."""
        node_name = f"{name}/{op}"
        names = [f"{node_name}/output_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op, inputs, names, node_name, domain=MS_DOMAIN if ms else None, **attrs)
        )
        return names

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; return its name."""
        self.initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        """A small constant as a Constant node (inside model.onnx, where shape inference can read it)."""
        self.nodes.append(
            helper.make_node("Constant", [], [name], name, value=onnx.numpy_helper.from_array(array, name))
        )
        return name

    def float_weight(self, name: str, array: np.ndarray) -> str:
        """An initializer in the graph's float dtype."""
        return self.weight(name, array.astype(self.dtype))


@dataclass(frozen=True)
class _Sequence:
    """What every layer's attention shares: GroupQueryAttention's int32 lengths and the RoPE tables."""

    seqlens_k: str
    total: str
    cos_cache: str
    sin_cache: str


def build_model(
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    precision: Precision,
    options: QuantOptions,
    hessians: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """The decoder as an ONNX model with past/present KV inputs and outputs, as onnxruntime-genai expects."""
    g = _Graph(precision.dtype)
    inputs, outputs = _graph_io(config, _ONNX_TYPES[precision.dtype])
    sequence = _sequence(g, config)
    matrices = fused_matrices(config, tensors)
    quantized = {}
    if precision.bits:
        untied_embedding = None if config.tie_word_embeddings else tensors["model.embed_tokens.weight"]
        quantized = quantize_matrices(matrices, untied_embedding, precision, options, hessians)
    linear = _Linear(g, matrices, quantized, options, precision.dynamic)
    x = _embedding(g, config, tensors, quantized, options)
    residual = None
    for i in range(config.num_hidden_layers):
        x, residual = _layer(g, config, tensors, linear, sequence, i, x, residual)
    _head(g, config, tensors, linear, x, residual)

    graph = helper.make_graph(g.nodes, "edgelm", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgelm",
        producer_version=__version__,
    )
    model.ir_version = IR_VERSION
    return model


def _graph_io(config: ModelConfig, ftype: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The graph's inputs (input_ids, attention_mask, past_key_values.N.key/value) and outputs (logits,
    present.N.key/value), with onnxruntime-genai's dimension names."""
    c = config
    kv, dim = c.num_key_value_heads, c.head_dim
    kv_shape: list[str | int] = ["batch_size", kv, "past_sequence_length", dim]
    present_shape: list[str | int] = ["batch_size", kv, "total_sequence_length", dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", ftype, ["batch_size", "sequence_length", c.vocab_size])
    ]
    for i in range(c.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ftype, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", ftype, present_shape))
    return inputs, outputs


def _sequence(g: _Graph, config: ModelConfig) -> _Sequence:
    """GroupQueryAttention's sequence lengths as int32 (seqlens_k = mask.sum(1) - 1, the total length) and
    the cos/sin caches it rotates with:

        attention_mask ─ /model/attn_mask/ReduceSum ─ /model/attn_mask/Sub ─ /model/attn_mask/seqlens_k/Cast
        attention_mask ─ /model/attn_mask/Shape ─ /model/attn_mask/total/Cast ─ /model/attn_mask/total/Squeeze
    """
    one = g.constant("/model/constants/one", np.array([1], np.int64))
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", one], "/model/attn_mask", keepdims=0)
    (last,) = g.node("Sub", [mask_sum, one], "/model/attn_mask")
    (seqlens_k,) = g.node("Cast", [last], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"], "/model/attn_mask", start=1, end=2)
    (total_1d,) = g.node("Cast", [mask_shape], "/model/attn_mask/total", to=TensorProto.INT32)
    (total,) = g.node("Squeeze", [total_1d], "/model/attn_mask/total")
    cos, sin = rope_cos_sin(config, config.max_position_embeddings)
    return _Sequence(seqlens_k, total, g.float_weight("cos_cache", cos), g.float_weight("sin_cache", sin))


def _layer(
    g: _Graph,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    linear: _Linear,
    sequence: _Sequence,
    i: int,
    x: str,
    residual: str | None,
) -> tuple[str, str]:
    """Decoder layer i; returns (its output, the residual stream before it is added):

    x ─┬─ /model/layers.0/input_layernorm/SkipSimplifiedLayerNormalization (RMSNormalization in layer 0)
       │       └─ attention (below) ─┐
       └─ /model/layers.0/post_attention_layernorm/SkipSimplifiedLayerNormalization ◀┘ (residual + attn)
               └─ MLP (below) ─ output; the next layer's input_layernorm adds the residual
    """
    p, name = f"model.layers.{i}.", f"/model/layers.{i}"
    eps = float(config.rms_norm_eps)
    h, residual = _norm(g, x, residual, tensors[p + "input_layernorm.weight"], f"{name}/input_layernorm", eps)
    o = _attention(g, config, tensors, linear, sequence, i, h)
    weight = tensors[p + "post_attention_layernorm.weight"]
    h, residual = _norm(g, o, residual, weight, f"{name}/post_attention_layernorm", eps)
    return _mlp(g, config, linear, i, h), residual


def _attention(
    g: _Graph,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    linear: _Linear,
    sequence: _Sequence,
    i: int,
    h: str,
) -> str:
    """Layer i's self-attention on the normed h; GroupQueryAttention applies RoPE and appends to the cache:

    h ─ /model/layers.0/attn/qkv_proj/MatMulNBits (MatMul, DynamicQuantizeMatMul) [─ qkv_proj/Add bias]
      ─ /model/layers.0/attn/GroupQueryAttention ◀─ past_key_values.0.key/value, seqlens_k, total,
      │                                              cos_cache, sin_cache
      │       └─▶ present.0.key, present.0.value
      ─ /model/layers.0/attn/o_proj/MatMulNBits [─ o_proj/Add bias] ─ output
    """
    c, p, name = config, f"model.layers.{i}.", f"/model/layers.{i}/attn"
    qkv = linear(h, f"{name}/qkv_proj", p + "self_attn.qkv_proj")
    if c.qkv_bias:
        bias = np.concatenate([tensors[f"{p}self_attn.{m}_proj.bias"] for m in "qkv"])
        (qkv,) = g.node("Add", [qkv, g.float_weight(p + "self_attn.qkv_proj.bias", bias)], f"{name}/qkv_proj")
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    s = sequence
    attn, _, _ = g.node(
        "GroupQueryAttention",
        [qkv, "", "", *past, s.seqlens_k, s.total, s.cos_cache, s.sin_cache],
        name,
        outputs=3,
        ms=True,
        num_heads=c.num_attention_heads,
        kv_num_heads=c.num_key_value_heads,
        scale=float(c.head_dim**-0.5),
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=-1,
    )
    # the attention's present outputs are the graph's: rename them
    g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
    o = linear(attn, f"{name}/o_proj", p + "self_attn.o_proj")
    if c.o_bias:
        o_bias = g.float_weight(p + "self_attn.o_proj.bias", tensors[p + "self_attn.o_proj.bias"])
        (o,) = g.node("Add", [o, o_bias], f"{name}/o_proj")
    return o


def _mlp(g: _Graph, config: ModelConfig, linear: _Linear, i: int, h: str) -> str:
    """Layer i's SwiGLU MLP on the normed h, gate and up as one fused matrix:

    h ─ /model/layers.0/mlp/gate_up_proj/MatMulNBits ─ /model/layers.0/mlp/Split ─┬─ gate ─┐
                                                                                  └─ up ─┐ │
      /model/layers.0/mlp/act_fn/Sigmoid(gate) ─ /model/layers.0/mlp/act_fn/Mul (SiLU) ◀─┼─┘
      ─ /model/layers.0/mlp/Mul (SiLU(gate) * up) ◀────────────────────────────────────┘
      ─ /model/layers.0/mlp/down_proj/MatMulNBits ─ output
    """
    name, p = f"/model/layers.{i}/mlp", f"model.layers.{i}."
    gate_up = linear(h, f"{name}/gate_up_proj", p + "mlp.gate_up_proj")
    split = g.constant(f"{name}/split_sizes", np.array([config.intermediate_size] * 2, np.int64))
    gate, up = g.node("Split", [gate_up, split], name, outputs=2, axis=-1)
    (sigmoid,) = g.node("Sigmoid", [gate], f"{name}/act_fn")
    (silu,) = g.node("Mul", [gate, sigmoid], f"{name}/act_fn")
    (product,) = g.node("Mul", [silu, up], name)
    return linear(product, f"{name}/down_proj", p + "mlp.down_proj")


def _head(
    g: _Graph,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    linear: _Linear,
    x: str,
    residual: str | None,
) -> None:
    """The final norm (adding the last residual) and the output projection, whose output is `logits`:

    x, residual ─ /model/norm/SkipSimplifiedLayerNormalization ─ /lm_head/MatMulNBits ─▶ logits
    """
    eps = float(config.rms_norm_eps)
    h, _ = _norm(g, x, residual, tensors["model.norm.weight"], "/model/norm", eps, keep_residual=False)
    linear(h, "/lm_head", "lm_head")
    g.nodes[-1].output[0] = "logits"  # the head's output is the graph's


def _norm(
    g: _Graph,
    x: str,
    residual: str | None,
    weight: np.ndarray,
    name: str,
    eps: float,
    keep_residual: bool = True,
) -> tuple[str, str]:
    """RMSNorm of x (the first layer) or of residual + x; returns (normed, the new residual stream)."""
    w = g.float_weight(name.strip("/").replace("/", ".") + ".weight", weight)
    if residual is None:
        (normed,) = g.node("RMSNormalization", [x, w], name, axis=-1, epsilon=eps, stash_type=1)
        return normed, x
    normed, _, _, summed = g.node(
        "SkipSimplifiedLayerNormalization", [residual, x, w], name, outputs=4, ms=True, epsilon=eps
    )
    if not keep_residual:
        del g.nodes[-1].output[1:]
    return normed, summed


def fused_matrices(config: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, Matrix]:
    """Every matrix of the graph by name: per layer qkv_proj, o_proj, gate_up_proj, down_proj; lm_head (the
    embedding matrix when tied)."""
    matrices = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, parts in (
            ("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            ("self_attn.o_proj", ["self_attn.o_proj"]),
            ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"]),
            ("mlp.down_proj", ["mlp.down_proj"]),
        ):
            w = np.concatenate([tensors[f"{p}{part}.weight"] for part in parts])
            matrices[p + name] = Matrix(w, f"{p}{parts[0]}.weight")
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    matrices["lm_head"] = Matrix(tensors[head], "lm_head.weight")
    return matrices


@dataclass
class _Linear:
    """Adds y = x Wᵀ for a named matrix: MatMul on float weights, MatMulNBits on its quantized blocks, or
    DynamicQuantizeMatMul on per-channel int8 (ONNX Runtime's dynamic int8 path)."""

    g: _Graph
    matrices: dict[str, Matrix]
    quantized: dict[str, QuantizedBlocks]
    options: QuantOptions
    dynamic: bool  # DynamicQuantizeMatMul on per-channel int8, else MatMulNBits

    def __call__(self, x: str, node_name: str, matrix: str) -> str:
        w = self.matrices[matrix].w
        if matrix not in self.quantized:
            (y,) = self.g.node("MatMul", [x, self.g.float_weight(matrix + ".weight", w.T)], node_name)
            return y
        q = self.quantized[matrix]
        if self.dynamic:
            # one scale per output channel: ONNX Runtime's dynamic int8 path, B as int8 (in, out)
            signed = q.codes.astype(np.int16) - (1 << (q.bits - 1))
            b = self.g.weight(matrix + ".weight.int8", signed.astype(np.int8).T)
            b_scale = self.g.float_weight(matrix + ".weight.scale", q.scales[:, 0])
            (y,) = self.g.node("DynamicQuantizeMatMul", [x, b, b_scale], node_name, ms=True)
            return y
        inputs = [x, *_quantized_weight(self.g, matrix, q)]
        (y,) = self.g.node(
            "MatMulNBits",
            inputs,
            node_name,
            ms=True,
            K=w.shape[1],
            N=w.shape[0],
            bits=q.bits,
            block_size=q.block,
            accuracy_level=self.options.accuracy_level,
        )
        return y


def _quantized_weight(g: _Graph, matrix: str, q: QuantizedBlocks) -> list[str]:
    """The initializers of a packed matrix (added once, shared by the head and a tied embedding)."""
    names = [f"{matrix}.weight.packed", f"{matrix}.weight.scales", f"{matrix}.weight.zero_points"]
    if names[0] not in g.added:
        packed, scales, zero_points = pack_matmul_nbits(q)
        g.weight(names[0], packed)
        g.float_weight(names[1], scales)
        if zero_points is not None:
            g.weight(names[2], zero_points)
        g.added.add(names[0])
    return names if q.zeros is not None else names[:2]


def _embedding(
    g: _Graph,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    quantized: dict[str, QuantizedBlocks],
    options: QuantOptions,
) -> str:
    """The token embeddings of input_ids: Gather of float rows, or GatherBlockQuantized of the quantized
    embedding (the head's own blocks when tied, so the file holds them once)."""
    name = "/model/embed_tokens"
    # its own blocks when it has them (untied, or int8_dynamic's per-channel head), else the tied head's
    own = not config.tie_word_embeddings or "model.embed_tokens" in quantized
    key = "model.embed_tokens" if own else "lm_head"
    if key not in quantized or quantized[key].codes.shape[1] != config.hidden_size:  # padded: not as a table
        weight = g.float_weight("model.embed_tokens.weight", tensors["model.embed_tokens.weight"])
        (x,) = g.node("Gather", [weight, "input_ids"], name)
        return x
    q = quantized[key]
    packed, scales, *zero_points = _quantized_weight(g, key, q)
    rows = g.constant(f"{name}/rows_shape", np.array([config.vocab_size, -1], np.int64))
    (data,) = g.node("Reshape", [packed, rows], name)  # MatMulNBits' (N, blocks, blob) → (N, K*bits/8)
    (x,) = g.node(
        "GatherBlockQuantized",
        [data, "input_ids", scales, *zero_points],
        name,
        ms=True,
        gather_axis=0,
        quantize_axis=1,
        block_size=q.block,
        bits=q.bits,
    )
    return x
