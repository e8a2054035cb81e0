"""Checkpoint → ONNX folder on ONNX Runtime's fused operators, which onnxruntime-genai also runs unchanged.

The graph is written node by node from the checkpoint's numpy arrays (no torch, no tracing):

    input_ids ─ Gather ─┬─ RMSNormalization ─ qkv MatMul ─ GroupQueryAttention ─ o MatMul ─┐
                        └──────────────── SkipSimplifiedLayerNormalization (residual + norm) ◀──────────┘
                              ─ gate_up MatMul ─ Split ─ SiLU(gate) * up ─ down MatMul ─ Skip…Norm ─ …
                                                                          ─ final Skip…Norm ─ lm_head ─ logits

`GroupQueryAttention` (domain com.microsoft) applies the rotary embedding itself from cos/sin tables and
appends to the KV cache; q/k/v and gate/up are each one fused matrix. Quantized matrices are `MatMulNBits`
(int8, int4, int4_mixed) or `DynamicQuantizeMatMul` (int8_dynamic), and the quantized embedding table is
`GatherBlockQuantized`: `edgelm.quant.blocks` chooses the codes and scales, this module only packs them.

The folder: model.onnx + model.onnx.data (every weight as external data, so no 2 GiB limit), config.json,
the tokenizer files, genai_config.json (onnxruntime-genai) and edgelm.json (provenance).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm._version import __version__
from edgelm.checkpoint import checkpoint_sha256, load_checkpoint
from edgelm.errors import EdgelmError, missing_dependency
from edgelm.export.onnx_quant import (
    DYNAMIC_BITS,
    PRECISIONS,
    Matrix,
    Precision,
    QuantOptions,
    pack_matmul_nbits,
    quantize_matrices,
)
from edgelm.files import temporary_sibling, write_json_atomic
from edgelm.formats.onnx import DATA_FILE, GENAI_CONFIG, MODEL_FILE, PROVENANCE
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
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def output_folder(checkpoint: Path, out: Path | None, quant: str) -> Path:
    """`--out`, else `<checkpoint>-onnx-<quant>` beside the checkpoint."""
    return out if out is not None else checkpoint.with_name(f"{checkpoint.name}-onnx-{quant}")


def export_onnx(
    checkpoint: Path,
    out: Path | None = None,
    quant: str = "fp32",
    options: QuantOptions | None = None,
    hessians: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the checkpoint as an ONNX folder of the given precision (a key of PRECISIONS); return it.

    `hessians` (from `edgelm.calibration.activation_covariance`) make the int8/int4 quantizer minimize each
    layer's output error (activation-weighted scales and GPTQ error feedback), as for GGUF.
    """
    if quant not in PRECISIONS:
        raise EdgelmError(f"unknown ONNX precision {quant!r}; choose one of {', '.join(PRECISIONS)}")
    options = options or QuantOptions()
    options.check()
    checkpoint = Path(checkpoint)
    config, tensors, _ = load_checkpoint(checkpoint)
    folder = output_folder(checkpoint, Path(out) if out is not None else None, quant)
    if folder.exists() and not (folder / MODEL_FILE).is_file():
        raise EdgelmError(f"{folder} exists and is not an ONNX folder; choose another --out")
    precision = PRECISIONS[quant]
    model = build_model(config, tensors, precision, options, hessians or {})

    tmp = temporary_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        onnx.save_model(
            model,
            str(tmp / MODEL_FILE),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=0,
        )
        try:
            onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            message = f"the exported graph fails onnx.checker (a bug in edgelm; please report it): {e}"
            raise EdgelmError(message) from None
        for name in COPIED_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        write_json_atomic(tmp / GENAI_CONFIG, genai_config(config))
        record = provenance(checkpoint, quant, precision, options, hessians, model)
        write_json_atomic(tmp / PROVENANCE, record)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- the graph


class _Graph:
    """Nodes and initializers as they are added; names follow `/model/layers.N/part/Op`."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.added: set[str] = set()  # initializers that several nodes share

    def node(
        self, op: str, inputs: list[str], name: str, outputs: int = 1, ms: bool = False, **attrs
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


def build_model(
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    precision: Precision,
    options: QuantOptions,
    hessians: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """The decoder as an ONNX model with past/present KV inputs and outputs, as onnxruntime-genai expects."""
    c = config
    g = _Graph(precision.dtype)
    ftype = _ONNX_TYPES[precision.dtype]
    kv_shape = ["batch_size", c.num_key_value_heads, "past_sequence_length", c.head_dim]
    present_shape = ["batch_size", c.num_key_value_heads, "total_sequence_length", c.head_dim]
    layers = range(c.num_hidden_layers)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", ftype, ["batch_size", "sequence_length", c.vocab_size])
    ]
    for i in layers:
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ftype, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", ftype, present_shape))

    # GroupQueryAttention takes the sequence lengths as int32: seqlens_k = mask.sum(1) - 1 and total length
    one = g.constant("/model/constants/one", np.array([1], np.int64))
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", one], "/model/attn_mask", keepdims=0)
    (last,) = g.node("Sub", [mask_sum, one], "/model/attn_mask")
    (seqlens_k,) = g.node("Cast", [last], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"], "/model/attn_mask", start=1, end=2)
    (total_1d,) = g.node("Cast", [mask_shape], "/model/attn_mask/total", to=TensorProto.INT32)
    (total,) = g.node("Squeeze", [total_1d], "/model/attn_mask/total")
    cos, sin = rope_cos_sin(c, c.max_position_embeddings)
    cos_cache, sin_cache = g.float_weight("cos_cache", cos), g.float_weight("sin_cache", sin)

    matrices = fused_matrices(c, tensors)
    quantized = {}
    if precision.bits:
        untied_embedding = None if c.tie_word_embeddings else tensors["model.embed_tokens.weight"]
        quantized = quantize_matrices(matrices, untied_embedding, precision, options, hessians)
    linear = _Linear(g, matrices, quantized, options, precision.dynamic)
    x = _embedding(g, c, tensors, quantized, options)
    residual = None
    eps = float(c.rms_norm_eps)
    for i in layers:
        p, name = f"model.layers.{i}.", f"/model/layers.{i}"
        h, residual = _norm(
            g, x, residual, tensors[p + "input_layernorm.weight"], f"{name}/input_layernorm", eps
        )
        qkv = linear(h, f"{name}/attn/qkv_proj", p + "self_attn.qkv_proj")
        if c.qkv_bias:
            bias = np.concatenate([tensors[f"{p}self_attn.{m}_proj.bias"] for m in "qkv"])
            (qkv,) = g.node(
                "Add", [qkv, g.float_weight(p + "self_attn.qkv_proj.bias", bias)], f"{name}/attn/qkv_proj"
            )
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [qkv, "", "", *past, seqlens_k, total, cos_cache, sin_cache],
            f"{name}/attn",
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
        o = linear(attn, f"{name}/attn/o_proj", p + "self_attn.o_proj")
        if c.o_bias:
            (o,) = g.node(
                "Add",
                [o, g.float_weight(p + "self_attn.o_proj.bias", tensors[p + "self_attn.o_proj.bias"])],
                f"{name}/attn/o_proj",
            )

        h, residual = _norm(
            g,
            o,
            residual,
            tensors[p + "post_attention_layernorm.weight"],
            f"{name}/post_attention_layernorm",
            eps,
        )
        gate_up = linear(h, f"{name}/mlp/gate_up_proj", p + "mlp.gate_up_proj")
        split = g.constant(f"{name}/mlp/split_sizes", np.array([c.intermediate_size] * 2, np.int64))
        gate, up = g.node("Split", [gate_up, split], f"{name}/mlp", outputs=2, axis=-1)
        (sigmoid,) = g.node("Sigmoid", [gate], f"{name}/mlp/act_fn")
        (silu,) = g.node("Mul", [gate, sigmoid], f"{name}/mlp/act_fn")
        (product,) = g.node("Mul", [silu, up], f"{name}/mlp")
        x = linear(product, f"{name}/mlp/down_proj", p + "mlp.down_proj")

    h, _ = _norm(g, x, residual, tensors["model.norm.weight"], "/model/norm", eps, keep_residual=False)
    linear(h, "/lm_head", "lm_head")
    g.nodes[-1].output[0] = "logits"  # the head's output is the graph's

    graph = helper.make_graph(g.nodes, "edgelm", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgelm",
        producer_version=__version__,
    )
    model.ir_version = 11
    return model


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


# ------------------------------------------------------------------------------------------ the folder


def genai_config(config: ModelConfig) -> dict[str, Any]:
    """onnxruntime-genai's description of the model: its shape, I/O names and default search options."""
    eos = config.eos_token_id
    eos = eos if isinstance(eos, int) else list(eos)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": eos if isinstance(eos, int) else eos[0],
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": config.max_position_embeddings,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def provenance(
    checkpoint: Path,
    quant: str,
    precision: Precision,
    options: QuantOptions,
    hessians: dict[str, np.ndarray] | None,
    model: onnx.ModelProto,
) -> dict[str, Any]:
    """What edgelm.json records: the source checkpoint's hash, how the weights were quantized (and, for a
    mixed precision, which matrices got 8 bits), the opsets and the tools' versions."""
    quantization: dict[str, Any] = {"dtype": precision.dtype, "bits": precision.bits}
    if precision.bits is not None:
        method = "gptq" if hessians else ("search" if options.search else "round-to-nearest")
        quantization |= dataclasses.asdict(options) | {"method": method, "operator": "MatMulNBits"}
    if precision.dynamic:
        quantization |= {"bits": DYNAMIC_BITS, "block_size": "per output channel"}
        quantization |= {"operator": "DynamicQuantizeMatMul", "embedding": "GatherBlockQuantized 8-bit"}
    if precision.mixed:
        quantization["eight_bit"] = [
            node.name
            for node in model.graph.node
            if node.op_type == "MatMulNBits" and helper.get_node_attr_value(node, "bits") == 8
        ]
    return {
        "format": "onnx",
        "quant": quant,
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": checkpoint_sha256(checkpoint)},
        "quantization": quantization,
        "opset": {"ai.onnx": OPSET, MS_DOMAIN: 1},
        "versions": {
            "edgelm": __version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "onnxruntime": package_version("onnxruntime"),
        },
    }


def package_version(package: str) -> str | None:
    """The installed version of a package, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
