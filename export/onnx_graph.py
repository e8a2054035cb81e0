"""The decoder as an ONNX graph on ONNX Runtime's fused operators, written node by node from numpy arrays.

Node names follow onnxruntime-genai's builders (`/model/layers.0/attn/qkv_proj/MatMulNBits`), so a graph
from either reads the same in Netron. Each subgraph builder below draws its nodes; together:

    input_ids ─ Gather ─┬─ RMSNormalization ─ qkv MatMul ─ GroupQueryAttention ─ o MatMul ─┐
                        └──────────────── SkipSimplifiedLayerNormalization (residual + norm) ◀──────────┘
                              ─ gate_up MatMul ─ Split ─ SiLU(gate) * up ─ down MatMul ─ Skip…Norm ─ …
                                                                          ─ final Skip…Norm ─ lm_head ─ logits

The families differ in a few places, each drawn where it is built: q/k norms between the qkv MatMul and
the attention (Qwen3, Gemma 3; `_normed_heads`), Gemma's √hidden Mul after the Gather, its norms after the
attention and the MLP (`_layer`), GELU for SiLU, GroupQueryAttention's scale, soft-cap and local window, and
a soft-capped head (`_head`); Phi-3's fused matrices are its checkpoint's own (`fused_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from edgelm._version import __version__
from edgelm.checkpoint import tensor_shapes
from edgelm.errors import missing_dependency
from edgelm.export.onnx_matrices import Weights, fused_matrix, fused_weights, mixed_formats
from edgelm.export.onnx_pack import matmul_nbits_parts, pack_matmul_nbits
from edgelm.export.onnx_quant import BlockFormat, Matrix, Precision, QuantOptions, quantized_blocks
from edgelm.formats.onnx import DATA_FILE
from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_cos_sin
from edgelm.model.rope_scaling import LongRopeScaling
from edgelm.quant.blocks import QuantizedBlocks
from edgelm.quant.calibration import record_quantized, wants_quantized

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
    """Nodes and initializers as they are added; names follow `/model/layers.N/part/Op`. Each initializer's
    bytes go to the external data file as it is added, so the graph holds only their places."""

    def __init__(self, dtype: str, data: BinaryIO) -> None:
        self.dtype = dtype
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

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
        """Add an initializer, its bytes appended to the data file (as onnx.save_model lays them out: one
        after the other, in the graph's order); return its name. The bytes never enter the TensorProto:
        protobuf keeps a cleared field's memory until the message is freed, which held every layer's
        weights until the end of the export."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # ONNX: little-endian
        offset = self.data.tell()
        self.data.write(array.reshape(-1).view(np.uint8).data)
        tensor = onnx.TensorProto(
            name=name,
            dims=array.shape,
            data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
            data_location=TensorProto.EXTERNAL,
        )
        for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
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
    """What every layer's attention shares: GroupQueryAttention's int32 lengths and the RoPE tables (cos,
    sin), by whether a layer is a sliding one (the same tables unless Gemma 3 gives those their own)."""

    seqlens_k: str
    total: str
    rope: dict[bool, tuple[str, str]]


def build_model(
    config: ModelConfig,
    weights: Weights,
    precision: Precision,
    options: QuantOptions,
    hessians: Mapping[str, np.ndarray],
    data: BinaryIO,
    threads: int | None = None,
    advance: Callable[[str], None] = lambda done: None,
    budget: int | None = None,
    sensitivity: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, dict[str, BlockFormat]]:
    """The decoder as an ONNX model with past/present KV inputs and outputs, as onnxruntime-genai expects;
    its initializers' bytes are written to `data` (model.onnx.data) as the graph is built, layer by layer,
    each matrix read, quantized (on `threads` threads, None: every core), packed, written and dropped.
    `advance` is called with each layer's name when it is done (and, for int4_mixed, ranked). `budget`:
    int4_mixed's bytes for the whole data file; `sensitivity`: what weighs its choices (`mixed_formats`).
    Returns the model and int4_mixed's format of each matrix (empty for the other precisions)."""
    g = _Graph(precision.dtype, data)
    inputs, outputs = _graph_io(config, _ONNX_TYPES[precision.dtype])
    sequence = _sequence(g, config)
    formats: dict[str, BlockFormat] = {}
    if precision.mixed:
        assert budget is not None
        norms = sum(math.prod(s) for s in tensor_shapes(config).values() if len(s) == 1)
        left = budget - data.tell() - norms * np.dtype(g.dtype).itemsize  # the RoPE tables are written
        scale_bytes = 2 if precision.half_scales else np.dtype(g.dtype).itemsize
        formats = mixed_formats(
            config, weights, options, hessians, sensitivity or {}, left, scale_bytes, threads, advance
        )
    linear = _Linear(g, config, weights, precision, options, hessians, formats, threads)
    x = _embedding(g, config, weights, linear)
    if config.embedding_multiplier != 1.0:  # Gemma's √hidden
        scale = g.constant("/model/embed_tokens/scale", np.array(config.embedding_multiplier, g.dtype))
        (x,) = g.node("Mul", [x, scale], "/model/embed_tokens")
    residual = None
    for i in range(config.num_hidden_layers):
        x, residual = _layer(g, config, weights, linear, sequence, i, x, residual)
        advance(f"layer {i}")
    _head(g, config, weights, linear, x, residual)

    graph = helper.make_graph(g.nodes, "edgelm", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgelm",
        producer_version=__version__,
    )
    model.ir_version = IR_VERSION
    return model, formats


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
    rope = {False: _rope_caches(g, config, total)}
    rope[True] = rope[False]
    if config.rope_local_theta is not None:
        cos, sin = rope_cos_sin(config, config.max_position_embeddings, local=True)
        rope[True] = (g.float_weight("local_cos_cache", cos), g.float_weight("local_sin_cache", sin))
    return _Sequence(seqlens_k, total, rope)


def _rope_caches(g: _Graph, config: ModelConfig, total: str) -> tuple[str, str]:
    """The global layers' cos and sin caches. With LongRoPE and a context past the original one, both
    sets, and the long ones chosen once the total length passes the original context (as transformers
    chooses; onnxruntime-genai's builder draws the same):

        total ─ /model/rotary/Greater (> original) ─ /model/rotary/If ─▶ cos_cache_long, sin_cache_long
                                                                     or cos_cache, sin_cache (original rows)
    """
    scaling, context = config.rope_scaling, config.max_position_embeddings
    if not isinstance(scaling, LongRopeScaling) or context <= scaling.original_max_position_embeddings:
        cos, sin = rope_cos_sin(config, context)
        return g.float_weight("cos_cache", cos), g.float_weight("sin_cache", sin)
    original = scaling.original_max_position_embeddings
    branches = {}
    for branch, rows, suffix in (("then_branch", context, "_long"), ("else_branch", original, "")):
        cos, sin = rope_cos_sin(config, rows)
        caches = [g.float_weight(f"cos_cache{suffix}", cos), g.float_weight(f"sin_cache{suffix}", sin)]
        outputs = [f"/model/rotary/If/{branch}/{name}" for name in ("cos", "sin")]
        nodes = [helper.make_node("Identity", [c], [o]) for c, o in zip(caches, outputs, strict=True)]
        ftype = _ONNX_TYPES[g.dtype]
        values = [helper.make_tensor_value_info(o, ftype, None) for o in outputs]
        branches[branch] = helper.make_graph(nodes, branch, [], values)
    limit = g.constant("/model/rotary/original", np.array(original, np.int32))
    (longer,) = g.node("Greater", [total, limit], "/model/rotary")
    cos_cache, sin_cache = g.node("If", [longer], "/model/rotary", outputs=2, **branches)
    return cos_cache, sin_cache


def _layer(
    g: _Graph,
    config: ModelConfig,
    weights: Weights,
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

    Gemma norms each sublayer's output first: attention ─ post_attention_layernorm/RMSNormalization ─
    pre_feedforward_layernorm/Skip…Norm (residual + it) ─ MLP ─ post_feedforward_layernorm/RMSNormalization.
    """
    p, name = f"model.layers.{i}.", f"/model/layers.{i}"
    eps = float(config.rms_norm_eps)
    weight = norm_weight(config, weights, p + "input_layernorm.weight")
    h, residual = _norm(g, x, residual, weight, f"{name}/input_layernorm", eps)
    o = _attention(g, config, weights, linear, sequence, i, h)
    if not config.gemma_layout:
        weight = norm_weight(config, weights, p + "post_attention_layernorm.weight")
        h, residual = _norm(g, o, residual, weight, f"{name}/post_attention_layernorm", eps)
        return _mlp(g, config, linear, i, h), residual
    # Gemma: the attention's and the MLP's outputs are normed before they join the residual stream
    weight = norm_weight(config, weights, p + "post_attention_layernorm.weight")
    o, _ = _norm(g, o, None, weight, f"{name}/post_attention_layernorm", eps)
    weight = norm_weight(config, weights, p + "pre_feedforward_layernorm.weight")
    h, residual = _norm(g, o, residual, weight, f"{name}/pre_feedforward_layernorm", eps)
    m = _mlp(g, config, linear, i, h)
    weight = norm_weight(config, weights, p + "post_feedforward_layernorm.weight")
    return _norm(g, m, None, weight, f"{name}/post_feedforward_layernorm", eps)[0], residual


def _attention(
    g: _Graph,
    config: ModelConfig,
    weights: Weights,
    linear: _Linear,
    sequence: _Sequence,
    i: int,
    h: str,
) -> str:
    """Layer i's self-attention on the normed h; GroupQueryAttention applies RoPE and appends to the cache:

    h ─ /model/layers.0/attn/qkv_proj/MatMulNBits (MatMul, DynamicQuantizeMatMul) [─ qkv_proj/Add bias]
      [─ q/k norms, below: then q, k, v go in apart]
      ─ /model/layers.0/attn/GroupQueryAttention ◀─ past_key_values.0.key/value, seqlens_k, total,
      │                                              cos_cache, sin_cache
      │       └─▶ present.0.key, present.0.value
      ─ /model/layers.0/attn/o_proj/MatMulNBits [─ o_proj/Add bias] ─ output
    """
    c, p, name = config, f"model.layers.{i}.", f"/model/layers.{i}/attn"
    qkv = linear(h, f"{name}/qkv_proj", p + "self_attn.qkv_proj")
    if c.qkv_bias:
        bias = np.concatenate([weights(f"{p}self_attn.{m}_proj.bias") for m in "qkv"])
        (qkv,) = g.node("Add", [qkv, g.float_weight(p + "self_attn.qkv_proj.bias", bias)], f"{name}/qkv_proj")
    query = _normed_heads(g, config, weights, i, qkv) if c.qk_norm else [qkv, "", ""]
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    s, sliding = sequence, c.is_sliding(i)
    window = c.sliding_window if sliding and c.sliding_window is not None else -1
    attn, _, _ = g.node(
        "GroupQueryAttention",
        [*query, *past, s.seqlens_k, s.total, *s.rope[sliding]],
        name,
        outputs=3,
        ms=True,
        num_heads=c.num_attention_heads,
        kv_num_heads=c.num_key_value_heads,
        scale=c.attention_scale,
        softcap=float(c.attn_logit_softcapping or 0.0),
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=window,
    )
    # the attention's present outputs are the graph's: rename them
    g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
    o = linear(attn, f"{name}/o_proj", p + "self_attn.o_proj")
    if c.o_bias:
        o_bias = g.float_weight(p + "self_attn.o_proj.bias", weights(p + "self_attn.o_proj.bias"))
        (o,) = g.node("Add", [o, o_bias], f"{name}/o_proj")
    return o


def _normed_heads(g: _Graph, config: ModelConfig, weights: Weights, i: int, qkv: str) -> list[str]:
    """Layer i's q and k with each head RMS-normalized (Qwen3), and v, split from the fused projection:

    qkv ─ /model/layers.0/attn/Split ─┬─ q ─ q_norm/heads/Reshape (B, T, nh, hd) ─ q_norm/RMSNormalization
                                      │      ─ q_norm/flat/Reshape (B, T, nh*hd) ─▶ query
                                      ├─ k ─ k_norm/... the same ─▶ key
                                      └─ v ─▶ value
    """
    c, p, name = config, f"model.layers.{i}.self_attn.", f"/model/layers.{i}/attn"
    q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    sizes = g.constant(f"{name}/split_sizes", np.array([q_size, kv_size, kv_size], np.int64))
    q, k, v = g.node("Split", [qkv, sizes], name, outputs=3, axis=-1)
    heads = g.constant(f"{name}/heads_shape", np.array([0, 0, -1, c.head_dim], np.int64))
    flat = g.constant(f"{name}/flat_shape", np.array([0, 0, -1], np.int64))
    normed = []
    for part, x in (("q_norm", q), ("k_norm", k)):
        (by_head,) = g.node("Reshape", [x, heads], f"{name}/{part}/heads")
        weight = g.float_weight(f"{p}{part}.weight", norm_weight(c, weights, f"{p}{part}.weight"))
        (y,) = g.node(
            "RMSNormalization",
            [by_head, weight],
            f"{name}/{part}",
            axis=-1,
            epsilon=float(c.rms_norm_eps),
            stash_type=1,
        )
        normed.append(g.node("Reshape", [y, flat], f"{name}/{part}/flat")[0])
    return [*normed, v]


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
    if config.gemma_layout:
        (activated,) = g.node("Gelu", [gate], f"{name}/act_fn", approximate="tanh")
    else:
        (sigmoid,) = g.node("Sigmoid", [gate], f"{name}/act_fn")
        (activated,) = g.node("Mul", [gate, sigmoid], f"{name}/act_fn")
    (product,) = g.node("Mul", [activated, up], name)
    return linear(product, f"{name}/down_proj", p + "mlp.down_proj")


def _head(
    g: _Graph,
    config: ModelConfig,
    weights: Weights,
    linear: _Linear,
    x: str,
    residual: str | None,
) -> None:
    """The final norm (adding the last residual) and the output projection, whose output is `logits`:

    x, residual ─ /model/norm/SkipSimplifiedLayerNormalization ─ /lm_head/MatMulNBits ─▶ logits
    """
    eps = float(config.rms_norm_eps)
    weight = norm_weight(config, weights, "model.norm.weight")
    h, _ = _norm(g, x, residual, weight, "/model/norm", eps, keep_residual=False)
    logits = linear(h, "/lm_head", "lm_head")
    if config.final_logit_softcapping is not None:  # cap * tanh(logits / cap)
        cap = g.constant("/lm_head/softcap/cap", np.array(config.final_logit_softcapping, g.dtype))
        (scaled,) = g.node("Div", [logits, cap], "/lm_head/softcap")
        (bent,) = g.node("Tanh", [scaled], "/lm_head/softcap")
        g.node("Mul", [bent, cap], "/lm_head/softcap")
    g.nodes[-1].output[0] = "logits"  # the head's (or its cap's) output is the graph's


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


def norm_weight(config: ModelConfig, weights: Weights, name: str) -> np.ndarray:
    """A norm's weight as ONNX Runtime's norms multiply by it: Gemma's 1 + w folded in (float32)."""
    w = weights(name)
    return w.astype(np.float32) + np.float32(1.0) if config.gemma_layout else w


@dataclass(frozen=True)
class _Packed:
    """A matrix whose quantized blocks are in the graph already: per part (one, or two for 6 bits: see
    `matmul_nbits_parts`) its initializers and bits; the blocks' size and the matrix's shape."""

    parts: list[tuple[list[str], int]]
    block: int
    rows: int
    cols: int


@dataclass
class _Linear:
    """Adds y = x Wᵀ for a named matrix, read and quantized when its node is added: MatMul on float
    weights, MatMulNBits on its quantized blocks, or DynamicQuantizeMatMul on per-channel int8 (ONNX
    Runtime's dynamic int8 path)."""

    g: _Graph
    config: ModelConfig
    weights: Weights
    precision: Precision
    options: QuantOptions
    hessians: Mapping[str, np.ndarray]
    formats: Mapping[str, BlockFormat]  # int4_mixed's choice per matrix
    threads: int | None  # the quantizer's
    packed: dict[str, _Packed] = field(default_factory=dict)  # blocks already written (a tied head's)

    def __call__(self, x: str, node_name: str, matrix: str) -> str:
        if self.precision.bits is None:
            w = fused_matrix(self.config, self.weights, matrix).w
            (y,) = self.g.node("MatMul", [x, self.g.float_weight(matrix + ".weight", w.T)], node_name)
            return y
        if self.precision.dynamic:
            m = fused_matrix(self.config, self.weights, matrix)
            hessian = self.hessians.get(m.hessian_key)
            q = quantized_blocks(matrix, m.w, self.precision, self.options, hessian, threads=self.threads)
            self.record(matrix, m.w, q)
            # one scale per output channel: ONNX Runtime's dynamic int8 path, B as int8 (in, out)
            signed = q.codes.astype(np.int16) - (1 << (q.bits - 1))
            b = self.g.weight(matrix + ".weight.int8", signed.astype(np.int8).T)
            b_scale = self.g.float_weight(matrix + ".weight.scale", q.scales[:, 0])
            (y,) = self.g.node("DynamicQuantizeMatMul", [x, b, b_scale], node_name, ms=True)
            return y
        packed = self.blocks(matrix)
        if self.precision.half_scales:  # MatMulNBits computes in its scales' type
            (x,) = self.g.node("Cast", [x], node_name, to=TensorProto.FLOAT16)
        ys = []
        for i, (names, bits) in enumerate(packed.parts):
            (y,) = self.g.node(
                "MatMulNBits",
                [x, *names],
                _part_name(node_name, i),
                ms=True,
                K=packed.cols,
                N=packed.rows,
                bits=bits,
                block_size=packed.block,
                accuracy_level=self.options.accuracy_level,
            )
            ys.append(y)
        return self.widened(_summed(self.g, ys, node_name), node_name)

    def widened(self, y: str, node_name: str) -> str:
        """A quantized node's output in the graph's dtype: cast back from float16 with half scales."""
        if not self.precision.half_scales:
            return y
        (y,) = self.g.node("Cast", [y], f"{node_name}/output", to=_ONNX_TYPES[self.g.dtype])
        return y

    def blocks(self, matrix: str) -> _Packed:
        """The matrix's packed blocks in MatMulNBits' layout (or the untied embedding table's, by the name
        "model.embed_tokens"), written once: a tied head shares the embedding's."""
        if matrix not in self.packed:
            if matrix == "model.embed_tokens":
                m = Matrix(self.weights("model.embed_tokens.weight"), "")
            else:
                m = fused_matrix(self.config, self.weights, matrix)
            hessian = self.hessians.get(m.hessian_key)
            chosen = self.formats.get(matrix)
            q = quantized_blocks(matrix, m.w, self.precision, self.options, hessian, chosen, self.threads)
            self.record(matrix, m.w, q)
            parts = [
                (self._packed_part(f"{matrix}.weight{'.low' if i else ''}", part), part.bits)
                for i, part in enumerate(matmul_nbits_parts(q))
            ]
            self.packed[matrix] = _Packed(parts, q.block, *m.w.shape)
        return self.packed[matrix]

    def _packed_part(self, name: str, q: QuantizedBlocks) -> list[str]:
        """Write one part's initializers (packed codes, scales, zero points if any); return their names."""
        packed, scales, zero_points = pack_matmul_nbits(q)
        names = [self.g.weight(f"{name}.packed", packed)]
        if self.precision.half_scales:  # float16-exact already (`QuantizedBlocks`)
            names.append(self.g.weight(f"{name}.scales", scales.astype(np.float16)))
        else:
            names.append(self.g.float_weight(f"{name}.scales", scales))
        if zero_points is not None:
            names.append(self.g.weight(f"{name}.zero_points", zero_points))
        return names

    def record(self, matrix: str, w: np.ndarray, q: QuantizedBlocks) -> None:
        """Hand a layer matrix's quantized values, split into the HF weights it fuses, to calibration
        statistics that go on through the quantized model."""
        if not matrix.startswith("model.layers."):
            return
        names = fused_weights(self.config, matrix)
        if not wants_quantized(self.hessians, names[0]):
            return
        rows = [tensor_shapes(self.config)[name][0] for name in names]
        values = q.dequantize()[:, : w.shape[1]]
        for name, part in zip(names, np.split(values, np.cumsum(rows)[:-1]), strict=True):
            record_quantized(self.hessians, name, part)


def _embedding(g: _Graph, config: ModelConfig, weights: Weights, linear: _Linear) -> str:
    """The token embeddings of input_ids: Gather of float rows, or GatherBlockQuantized of the quantized
    embedding (the head's own blocks when tied, so the file holds them once)."""
    name = "/model/embed_tokens"
    # its own blocks when it has them (untied, or int8_dynamic, whose head is per channel), else the head's
    own = not config.tie_word_embeddings or linear.precision.dynamic
    table = "model.embed_tokens" if own else "lm_head"
    block = linear.formats[table].block if table in linear.formats else linear.options.block_size
    if linear.precision.bits is None or config.hidden_size % block:  # blocks padded past a row: no table
        weight = g.float_weight("model.embed_tokens.weight", weights("model.embed_tokens.weight"))
        (x,) = g.node("Gather", [weight, "input_ids"], name)
        return x
    blocks = linear.blocks(table)
    rows = g.constant(f"{name}/rows_shape", np.array([config.vocab_size, -1], np.int64))
    xs = []
    for i, ((packed, scales, *zero_points), bits) in enumerate(blocks.parts):
        part = _part_name(name, i)
        (data,) = g.node("Reshape", [packed, rows], part)  # MatMulNBits' (N, blocks, blob) → (N, K*bits/8)
        (x,) = g.node(
            "GatherBlockQuantized",
            [data, "input_ids", scales, *zero_points],
            part,
            ms=True,
            gather_axis=0,
            quantize_axis=1,
            block_size=blocks.block,
            bits=bits,
        )
        xs.append(x)
    return linear.widened(_summed(g, xs, name), name)


def _part_name(name: str, i: int) -> str:
    """The node name of part i of a matrix (`matmul_nbits_parts`): the matrix's own, then `name/low`."""
    return f"{name}/low" if i else name


def _summed(g: _Graph, parts: list[str], name: str) -> str:
    """One part's output, or the sum of a 6-bit matrix's two (`matmul_nbits_parts`), `name/low/Add`."""
    if len(parts) == 1:
        return parts[0]
    (y,) = g.node("Add", parts, _part_name(name, 1))
    return y
