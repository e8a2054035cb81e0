"""Checkpoint → GGUF file (llama.cpp's architecture for the family: `llama`, `qwen2`, `qwen3`, `gemma2`,
`gemma3`, `phi3`), for llama.cpp and everything built on it.

The weights are read with numpy (no torch), quantized by `edgelm.quant.blocks`, packed into block bytes by
`gguf_blocks`, and written with gguf-py's `GGUFWriter` together with every `<architecture>.*`
hyperparameter and the full tokenizer. The file streams: every tensor's name, shape and type are declared
from the checkpoint's headers first, then each tensor is read, encoded, written and dropped, so memory
holds one tensor. The type of each tensor follows llama.cpp's rules for the chosen mixture (`gguf_types`),
so that `--quant q4_k_m` here and `llama-quantize ... Q4_K_M` give files with the same tensor types.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm._version import __version__
from edgelm.checkpoint import TensorEntry, bfloat16_bits, checked_entries, checkpoint_sha256, tensor_reader
from edgelm.errors import EdgelmError, missing_dependency
from edgelm.export import gguf_blocks
from edgelm.export.gguf_types import MIXTURES, Mixture, tensor_type
from edgelm.files import new_folders, temporary_sibling
from edgelm.formats.gguf import (
    GGUF_ARCHITECTURES,
    LONGROPE_TENSORS,
    NORM_PLUS_ONE_ARCHITECTURES,
    ROTATE_HALF_ARCHITECTURES,
    gemma_query_scalar,
    gguf_name,
    permute_for_gguf,
    unpermute_from_gguf,
)
from edgelm.formats.gguf_tokenizer import tokenizer_metadata
from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_frequencies
from edgelm.model.rope_scaling import LinearRopeScaling, Llama3RopeScaling, LongRopeScaling
from edgelm.progress import progress_bar
from edgelm.quant import gptq
from edgelm.quant.blocks import quantize_blocks, quantize_q4_k, quantize_q6_k
from edgelm.quant.calibration import HEAD, progress_label, record_quantized, wants_quantized
from edgelm.tokenizer import Tokenizer

try:
    import gguf
    from gguf import GGMLQuantizationType as T
except ModuleNotFoundError as e:
    raise missing_dependency("gguf", "gguf") from e


def rope_tensors(config: ModelConfig) -> dict[str, np.ndarray]:
    """llama.cpp's RoPE tensors for the config's scaling: Llama 3's `rope_freqs`, or Phi-3's LongRoPE
    factors (`rope_factors_short`/`_long`); none for the others, which metadata describes."""
    scaling = config.rope_scaling
    if isinstance(scaling, Llama3RopeScaling):
        return {"rope_freqs.weight": llama3_rope_factors(config)}
    if isinstance(scaling, LongRopeScaling):
        factors = (np.asarray(f, np.float32) for f in (scaling.short_factor, scaling.long_factor))
        return dict(zip(LONGROPE_TENSORS, factors, strict=True))
    return {}


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3's RoPE scaling: by how much each pair's frequency is divided.

    Computed from the frequencies the PyTorch model also uses, which the tests hold equal to transformers'.
    """
    base = rope_frequencies(dataclasses.replace(config, rope_scaling=None))
    return (base / rope_frequencies(config)).astype(np.float32)


def llama_cpp_refusal(config: ModelConfig) -> str | None:
    """What llama.cpp's architecture for the model cannot compute of it, or None."""
    arch = GGUF_ARCHITECTURES[config.architecture]
    if arch in ("qwen3", "gemma2", "gemma3") and config.o_bias:
        return f"llama.cpp's {arch} has no attention biases, and this model has them (attention_bias=true)"
    if config.gemma_layout:
        c = config
        scalar = gemma_query_scalar(
            arch, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim
        )
        if (c.query_pre_attn_scalar or c.head_dim) != scalar:
            return (
                f"llama.cpp's {arch} scales attention by 1/√{scalar} (it reads no query_pre_attn_scalar), "
                f"this model by 1/√{c.query_pre_attn_scalar}"
            )
    if arch == "gemma2" and not config.tie_word_embeddings:
        return "llama.cpp's gemma2 has no output matrix of its own, and this model's is not tied"
    return None


ENCODE_VALUES = 1 << 24  # values of a matrix quantized and packed at a time: a large matrix's temporaries


def encode_tensor(
    w: np.ndarray,
    qtype: T,
    hessian: np.ndarray | None,
    threads: int | None = None,
    quantized: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """A float32 matrix as the array GGUFWriter stores: float32/float16 values, bfloat16 bits, or uint8
    block bytes (quantized on `threads` threads, None: every core; `quantized`, if given, gets the
    dequantized values)."""
    if qtype == T.F32:
        return w.astype(np.float32, copy=False)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype == T.BF16:
        return bfloat16_bits(w)
    quantize, pack = QUANTIZERS[qtype]
    # rows are independent: a chunk at a time gives the same bytes with small temporaries; GPTQ's factor of
    # the hessian, computed once, serves every chunk
    factor = None if hessian is None else gptq.factor_of(hessian, w.shape[1])
    step = max(1, ENCODE_VALUES // w.shape[1])
    packed: np.ndarray | None = None
    values = np.empty(w.shape, np.float32) if quantized is not None else None
    for start in range(0, w.shape[0], step):
        blocks = quantize(w[start : start + step], factor, threads)
        chunk = pack(blocks)
        if packed is None:
            packed = np.empty((w.shape[0], chunk.shape[1]), np.uint8)
        packed[start : start + step] = chunk
        if values is not None:
            values[start : start + step] = blocks.dequantize()
    if quantized is not None and values is not None:
        quantized(values)
    assert packed is not None  # a matrix has rows
    return packed


def _plain_blocks(bits: int, symmetric: bool) -> Callable[..., Any]:
    """quantize(w, hessian, threads=None) for blocks of 32 at `bits` bits."""
    return lambda w, h, t=None: quantize_blocks(w, bits, 32, symmetric, hessian=h, threads=t)


# GGUF type → (quantize(w, hessian, threads=None), pack)
QUANTIZERS: dict[T, tuple[Callable[..., Any], Callable[[Any], np.ndarray]]] = {
    T.Q8_0: (_plain_blocks(8, True), gguf_blocks.pack_q8_0),
    T.Q5_0: (_plain_blocks(5, True), gguf_blocks.pack_q5_0),
    T.Q4_0: (_plain_blocks(4, True), gguf_blocks.pack_q4_0),
    T.Q4_1: (_plain_blocks(4, False), gguf_blocks.pack_q4_1),
    T.Q4_K: (lambda w, h, t=None: quantize_q4_k(w, hessian=h, threads=t), gguf_blocks.pack_q4_k),
    T.Q6_K: (lambda w, h, t=None: quantize_q6_k(w, hessian=h, threads=t), gguf_blocks.pack_q6_k),
}


def output_path(checkpoint: Path, out: Path | None, quant: str) -> Path:
    """`--out` when it names a .gguf file, else `<out, or beside the checkpoint>/<name>-<TYPE>.gguf`."""
    if out is not None and out.suffix == ".gguf":
        return out
    folder = out if out is not None else checkpoint.parent
    return folder / f"{checkpoint.name}-{quant.upper()}.gguf"


def export_gguf(
    checkpoint: Path,
    out: Path | None = None,
    quant: str = "f16",
    hessians: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Write the checkpoint as a GGUF file of the given quantization; return its path. The quantizer runs
    on `threads` threads (None: every core); `show_progress` draws a bar per tensor on a terminal.

    `hessians` (from `edgelm.quant.calibration.activation_covariance`: E[x xᵀ] of each weight's input on
    calibration text) make the quantizer minimize the error of the layer's output rather than of its
    weights: scales chosen by the activation-weighted error (llama.cpp's importance matrix is the diagonal)
    and each column's rounding error passed on to the columns not yet rounded (GPTQ).
    """
    if quant not in MIXTURES:
        raise EdgelmError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(MIXTURES)}")
    checkpoint = Path(checkpoint)
    config, entries = checked_entries(checkpoint)
    if refusal := llama_cpp_refusal(config):
        raise EdgelmError(f"{checkpoint}: {refusal}; export it to ONNX, or run the checkpoint itself")
    path = output_path(checkpoint, Path(out) if out is not None else None, quant)
    writer, rope, types = _planned_writer(checkpoint, config, entries, quant, hessians is not None)
    tmp = temporary_sibling(path)
    with new_folders(path.parent):  # a failed export leaves no empty folder
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for factors in rope.values():
                writer.write_tensor_data(factors)
            label = f"{path.name}{progress_label(hessians)}"
            read = tensor_reader(entries)
            with progress_bar(label, len(entries), show_progress) as advance:
                for entry in entries:  # one tensor in memory at a time
                    # the statistic first: the head's runs the model over the calibration text, which
                    # should not find the head's float32 copy (2 GB for Llama-3's) waiting beside it
                    hessian = _input_hessian(entry.name, config, hessians)
                    w = read(entry.name)
                    encoded = _encoded(entry.name, w, types[entry.name], config, hessian, hessians, threads)
                    writer.write_tensor_data(encoded)
                    advance(entry.name)
            writer.close()
            tmp.replace(path)
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)
    return path


def planned_size(checkpoint: Path, quant: str) -> int:
    """The size in bytes of the file `export_gguf(checkpoint, quant=quant)` writes (uncalibrated), from the
    checkpoint's shapes and tokenizer alone: its header, metadata and tensor infos (written to a temporary
    file, which is removed), then each tensor's bytes padded to the file's alignment."""
    checkpoint = Path(checkpoint)
    config, entries = checked_entries(checkpoint)
    writer, rope, types = _planned_writer(checkpoint, config, entries, quant, calibrated=False)
    with tempfile.TemporaryDirectory() as folder:
        writer.write_header_to_file(Path(folder) / "header.gguf")
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = (Path(folder) / "header.gguf").stat().st_size
    sizes = [factors.nbytes for factors in rope.values()]
    for e in entries:
        block, block_bytes = gguf.GGML_QUANT_SIZES[types[e.name]]
        sizes.append(math.prod(e.shape) // block * block_bytes)
    return sum(gguf.GGUFWriter.ggml_pad(n, writer.data_alignment) for n in [header, *sizes])


def _planned_writer(
    checkpoint: Path, config: ModelConfig, entries: Sequence[TensorEntry], quant: str, calibrated: bool
) -> tuple[Any, dict[str, np.ndarray], dict[str, T]]:
    """A GGUFWriter with the file's metadata and every tensor's info declared, the RoPE factor tensors the
    file holds besides the checkpoint's, and the GGUF type of each checkpoint tensor."""
    mixture = MIXTURES[quant]
    writer = gguf.GGUFWriter(None, arch=GGUF_ARCHITECTURES[config.architecture])
    tokenizer = Tokenizer.load(checkpoint)
    _write_metadata(writer, config, tokenizer, mixture, checkpoint, quant, calibrated)
    rope = rope_tensors(config)
    for name, factors in rope.items():
        writer.add_tensor_info(name, factors.shape, factors.dtype, factors.nbytes)
    types = {e.name: _plan_tensor(writer, e.name, e.shape, config, mixture) for e in entries}
    return writer, rope, types


def _plan_tensor(
    writer: Any, hf_name: str, shape: tuple[int, ...], config: ModelConfig, mixture: Mixture
) -> T:
    """Declare one tensor (GGUF name, shape, type, size) before any data is written; return its type."""
    name = gguf_name(hf_name, GGUF_ARCHITECTURES[config.architecture])
    qtype = tensor_type(name, shape, mixture, config.num_hidden_layers, config.tie_word_embeddings)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    writer.add_tensor_info(name, shape, np.float32, math.prod(shape) // block * block_bytes, raw_dtype=qtype)
    return qtype


def _input_hessian(
    hf_name: str, config: ModelConfig, hessians: Mapping[str, np.ndarray] | None
) -> np.ndarray | None:
    """The calibration statistic that steers a tensor's quantization: its input's, a tied embedding's the
    head's; None without calibration or for a tensor without an input (norms, an untied embedding)."""
    tied_embedding = config.tie_word_embeddings and hf_name == "model.embed_tokens.weight"
    return (hessians or {}).get(HEAD if tied_embedding else hf_name)


def _encoded(
    hf_name: str,
    w: np.ndarray,
    qtype: T,
    config: ModelConfig,
    hessian: np.ndarray | None,
    statistics: Mapping[str, np.ndarray] | None,
    threads: int | None,
) -> np.ndarray:
    """One checkpoint tensor as the GGUF file stores it: q/k rows in llama.cpp's RoPE order for the
    architecture, then encoded (steered by `hessian`, its input's E[x xᵀ] from `_input_hessian`). The
    calibration `statistics`, where they go on through the quantized model, get its quantized values back."""
    heads = None
    arch = GGUF_ARCHITECTURES[config.architecture]
    if arch in NORM_PLUS_ONE_ARCHITECTURES and hf_name.endswith("norm.weight"):
        w = w.astype(np.float32) + np.float32(1.0)  # llama.cpp multiplies by the stored weight itself
    paired = arch not in ROTATE_HALF_ARCHITECTURES
    if paired and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
        heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
        w = permute_for_gguf(w, heads)

    def record(values: np.ndarray) -> None:
        record_quantized(statistics, hf_name, values if heads is None else unpermute_from_gguf(values, heads))

    return encode_tensor(w, qtype, hessian, threads, record if wants_quantized(statistics, hf_name) else None)


def _write_metadata(
    writer: Any,
    config: ModelConfig,
    tokenizer: Tokenizer,
    mixture: Mixture,
    checkpoint: Path,
    quant: str,
    calibrated: bool,
) -> None:
    vocab = tokenizer_metadata(tokenizer, checkpoint, config.vocab_size)
    writer.add_name(checkpoint.name)
    writer.add_file_type(mixture.file_type)
    if mixture.base not in (T.F32, T.F16, T.BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_quantized_by(f"edgelm {__version__}")
    writer.add_string("edgelm.quantization", quant + (" (calibrated)" if calibrated else ""))
    writer.add_string("edgelm.checkpoint_sha256", checkpoint_sha256(checkpoint))
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if isinstance(config.rope_scaling, LinearRopeScaling):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    if isinstance(config.rope_scaling, LongRopeScaling):
        writer.add_rope_scaling_attn_factors(config.rope_scaling.attention_factor)
        writer.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position_embeddings)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([config.is_sliding(i) for i in range(config.num_hidden_layers)])
    if config.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(config.rope_local_theta)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":  # byte-level BPE
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_merges(vocab["merges"])
    else:  # SentencePiece BPE
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(vocab["scores"])
        writer.add_add_space_prefix(vocab["space_prefix"])
        if vocab["unk"] is not None:
            writer.add_unk_token_id(vocab["unk"])
    writer.add_bos_token_id(config.bos_token_id)
    # further end ids (Llama 3's <|eot_id|>, ...) llama.cpp recognizes by their text, as edgelm does
    writer.add_eos_token_id(config.eos_token_ids[0])
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf_via_llama_cpp(checkpoint: Path, out: Path | None = None, quant: str = "q4_k_m") -> Path:
    """Write an F32 GGUF with edgelm, then quantize it with llama.cpp's own quantizer (llama_model_quantize),
    so that both quantizers can be compared on the same model."""
    if quant not in MIXTURES:
        raise EdgelmError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(MIXTURES)}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise missing_dependency("llama_cpp", "llamacpp")
    checkpoint = Path(checkpoint)
    path = output_path(checkpoint, Path(out) if out is not None else None, quant)
    with new_folders(path.parent):
        _quantize_with_llama_cpp(checkpoint, path, quant)
    return path


def _quantize_with_llama_cpp(checkpoint: Path, path: Path, quant: str) -> None:
    """edgelm's F32 file beside `path` (hidden; one a killed run left is replaced), then llama.cpp's
    quantizer from it to `path`; the F32 file is removed either way."""
    import llama_cpp

    # hidden and marked temporary (`is_temporary`), and ending in .gguf as export_gguf's files do
    f32 = export_gguf(checkpoint, path.with_name(f".{path.stem}.f32.tmp.gguf"), "f32")
    tmp = temporary_sibling(path)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(MIXTURES[quant].file_type)  # llama.cpp's llama_ftype
        params.nthread = os.cpu_count() or 1
        if quant == "q8_0_f16emb":
            params.token_embedding_type = params.output_tensor_type = int(T.F16)
        elif quant == "q4_k":
            # edgelm's q4_k is Q4_K in every layer, with llama.cpp's head: llama.cpp's Q4_K_S would also move
            # some attn_v/ffn_down to Q5_K, which edgelm does not write (llama.cpp aborts when a type it is
            # told to use does not fit the rows: give it the fallbacks)
            params.pure = True
            config = ModelConfig.load(checkpoint)
            shape = (config.vocab_size, config.hidden_size)
            mixture, tied = MIXTURES[quant], config.tie_word_embeddings
            params.output_tensor_type = int(tensor_type("output.weight", shape, mixture, 1, tied))
            params.token_embedding_type = int(tensor_type("token_embd.weight", shape, mixture, 1, tied))
        status = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
        if status != 0:
            raise EdgelmError(f"llama.cpp's quantizer failed on {f32} (status {status})")
        tmp.replace(path)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
