"""GGUF export against its oracles: llama.cpp (tokenizer, logits, its own quantizer's type choices) and
gguf-py (its dequantizers read our packed blocks)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import llama_cpp  # the oracle: a missing one fails the suite
import numpy as np
import pytest
from conftest import SMALL, LiveTensors, logits_on_windows, make_checkpoint
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from test_tokenizer import VARIED

import edgelm
from edgelm.checkpoint import bfloat16_bits, load_checkpoint, weight_shapes
from edgelm.errors import EdgelmError
from edgelm.evaluation.metrics import kl_divergence, log_probs
from edgelm.export.gguf import QUANTIZERS, export_gguf, planned_size
from edgelm.export.gguf_types import MIXTURES, tensor_type
from edgelm.formats.gguf import gguf_name, permute_for_gguf
from edgelm.formats.gguf_tokenizer import tokenizer_from_gguf
from edgelm.model.rope_scaling import Llama3RopeScaling
from edgelm.tokenizer import Tokenizer
from edgelm.training.data import load_tokens, validation_windows

# rows 256 wide, which K-quants take whole
WIDE = dataclasses.replace(SMALL, hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64)
TEXT = VARIED + "x = 12345 + 678\n\n\n    indented\tline  \n" + "数字 ١٢٣ 🎉🎉 naïve café\n"


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {quant: export_gguf(trained_run, out, quant) for quant in ("f32", "q8_0", "q4_0", "q4_k_m")}


def test_llama_cpp_tokenizes_like_edgelm(trained_run: Path, exported: dict[str, Path]) -> None:
    tokenizer = Tokenizer.load(trained_run)
    vocab_only = llama_cpp.Llama(str(exported["f32"]), vocab_only=True, verbose=False)
    for text in (TEXT, TEXT * 3, "   ", "\n\n\n", "a" * 50, "1234567890"):
        ours = tokenizer.encode(text)
        assert vocab_only.tokenize(text.encode(), add_bos=False, special=False) == ours
        assert vocab_only.tokenize(text.encode(), add_bos=True, special=False) == [tokenizer.bos_id, *ours]
    rebuilt = tokenizer_from_gguf(gguf_metadata(exported["f32"]), "test")
    assert rebuilt.encode(TEXT) == tokenizer.encode(TEXT) and rebuilt.decode(tokenizer.encode(TEXT)) == TEXT


def gguf_metadata(path: Path) -> dict:
    from edgelm.formats.gguf_reader import read_gguf

    return read_gguf(path).metadata


@pytest.mark.slow
def test_f32_and_q8_0_in_llama_cpp_match_torch(trained_run: Path, exported: dict[str, Path]) -> None:
    windows = validation_windows(load_tokens(trained_run / "data").val, 128, max_windows=8)[:, :-1]
    with edgelm.load(trained_run) as reference:
        expected = logits_on_windows(reference.runtime, windows)
    with edgelm.load(exported["f32"], kv_cache="f32") as f32:
        assert f32.runtime.name == "llamacpp"
        got = logits_on_windows(f32.runtime, windows)
    assert np.abs(got - expected).max() <= 1e-4  # measured 1e-5: only the summation order differs
    assert (got.argmax(-1) == expected.argmax(-1)).mean() == 1.0
    with edgelm.load(exported["f32"]) as f16_cache:  # llama.cpp's default F16 KV cache: measured 3e-3
        assert np.abs(logits_on_windows(f16_cache.runtime, windows) - expected).max() <= 2e-2
    with edgelm.load(exported["q8_0"]) as q8:
        top1 = (logits_on_windows(q8.runtime, windows).argmax(-1) == expected.argmax(-1)).mean()
    assert top1 >= 0.98, top1


@pytest.mark.slow
def test_prefill_over_one_batch_and_the_context_cap(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """A prefill of 1100 tokens runs in llama.cpp's batches of 512 and equals torch's; decoding goes on from
    it; the context is the model's unless asked smaller, and a token past it is refused."""
    config = dataclasses.replace(SMALL, max_position_embeddings=1200)
    checkpoint = make_checkpoint(tmp_path / "long", small_tokenizer, config)
    ids = np.random.default_rng(0).integers(0, small_tokenizer.vocab_size, 1104).tolist()
    with edgelm.load(checkpoint) as reference:
        expected = reference.runtime.forward(ids, all_logits=True)
    path = export_gguf(checkpoint, tmp_path / "long.gguf", "f32")
    with edgelm.load(path, kv_cache="f32") as model:
        assert model.runtime.context == model.config.max_position_embeddings == 1200  # not DEFAULT_CONTEXT
        prefill = model.runtime.forward(ids[:1100], all_logits=True)
        decode = np.concatenate([model.runtime.forward([i]) for i in ids[1100:]])
        last = model.runtime.forward([ids[0]] * 96)  # up to the context exactly: 1104 + 96 = 1200
        with pytest.raises(EdgelmError, match="context"):
            model.runtime.forward([ids[0]])
    assert np.abs(prefill - expected[:1100]).max() <= 1e-4
    assert np.abs(decode - expected[1100:]).max() <= 1e-4
    assert last.shape == (1, small_tokenizer.vocab_size)
    with edgelm.load(path, context=600) as capped:
        assert capped.runtime.context == capped.config.max_position_embeddings == 600
        assert capped.runtime.forward(ids[:600]).shape == (1, small_tokenizer.vocab_size)
        with pytest.raises(EdgelmError, match="context"):
            capped.runtime.forward([ids[0]])


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0", "q4_k_m"])
def test_packed_tensors_equal_quant_py(trained_run: Path, exported: dict[str, Path], quant: str) -> None:
    config, tensors, _ = load_checkpoint(trained_run)
    reader = GGUFReader(exported[quant])
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == len(tensors)
    for hf_name, w in tensors.items():
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_for_gguf(
                w, config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            )
        stored = by_name[gguf_name(hf_name, "llama")]
        expected_type = tensor_type(
            gguf_name(hf_name, "llama"), w.shape, MIXTURES[quant], config.num_hidden_layers, True
        )
        assert stored.tensor_type == expected_type
        theirs = gguf_dequantize(stored.data, stored.tensor_type).reshape(w.shape)
        ours = _dequantized(w, expected_type)
        assert np.array_equal(theirs, ours), hf_name


def _dequantized(w: np.ndarray, qtype: int) -> np.ndarray:
    """What quant.py says the stored values are."""
    from gguf import GGMLQuantizationType as T

    if qtype in (T.F32, T.F16):
        return w.astype(np.float16 if qtype == T.F16 else np.float32).astype(np.float32)
    if qtype == T.BF16:
        return (bfloat16_bits(w).astype(np.uint32) << 16).view(np.float32)
    quantize, _ = QUANTIZERS[qtype]
    return quantize(w, None).dequantize()


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_a_matrix_encoded_in_row_chunks_is_the_same_file(
    tmp_path: Path, small_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, quant: str, calibrated: bool
) -> None:
    """Large matrices are quantized and packed a few rows at a time (with calibration, every chunk on one
    factor of the hessian): the bytes do not change. (GPTQ's own chunks of rows are made as small, since
    BLAS rounds a matrix product's sums differently as its shape changes.)"""
    import edgelm.export.gguf as gguf_export
    import edgelm.quant.blocks
    from edgelm.quant.calibration import activation_covariance

    monkeypatch.setattr(edgelm.quant.blocks, "_GPTQ_CHUNK_VALUES", 3 * 256)
    checkpoint = make_checkpoint(tmp_path / "wide", small_tokenizer, WIDE)

    def statistics() -> Mapping[str, np.ndarray] | None:
        return activation_covariance(checkpoint, VARIED * 4, context=64) if calibrated else None

    whole = export_gguf(checkpoint, tmp_path / "whole.gguf", quant, statistics()).read_bytes()
    monkeypatch.setattr(gguf_export, "ENCODE_VALUES", 3 * 256)  # three rows of 256 at a time
    assert export_gguf(checkpoint, tmp_path / "chunked.gguf", quant, statistics()).read_bytes() == whole


def test_a_bf16_checkpoint_exports_to_bf16_exactly(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """export gguf --quant bf16 of a bf16 model: every matrix holds the source's bits (safetensors' torch
    reader as the oracle), and llama.cpp runs it as torch runs the checkpoint."""
    import torch
    from safetensors.torch import load_file

    from edgelm.checkpoint import write_weights

    source = make_checkpoint(tmp_path / "f32", small_tokenizer, WIDE)
    config, tensors, _ = load_checkpoint(source)
    bf16 = tmp_path / "bf16"
    (tmp_path / "f32" / "model.safetensors").unlink()
    (tmp_path / "f32").rename(bf16)
    shapes = {name: w.shape for name, w in tensors.items()}
    write_weights(bf16, config, shapes, iter(tensors.items()), dtypes=dict.fromkeys(shapes, "BF16"))
    stored = {
        name: t.view(torch.int16).numpy().view(np.uint16)
        for name, t in load_file(bf16 / "model.safetensors").items()
    }
    reader = GGUFReader(export_gguf(bf16, tmp_path / "m.gguf", "bf16"))
    matrices = {t.name: t for t in reader.tensors if len(t.shape) > 1}
    assert {t.tensor_type.name for t in matrices.values()} == {"BF16"}
    for hf_name, bits in stored.items():
        if bits.ndim == 2:
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
                bits = permute_for_gguf(bits, heads)
            assert np.array_equal(matrices[gguf_name(hf_name, "llama")].data.view(np.uint16), bits), hf_name
    ids = np.arange(3, 40)[None] % config.vocab_size
    with edgelm.load(bf16) as reference, edgelm.load(tmp_path / "m.gguf", kv_cache="f32") as model:
        expected, got = (logits_on_windows(m.runtime, ids) for m in (reference, model))
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95  # ggml rounds activations to bf16
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


@pytest.fixture(scope="module")
def layered(
    tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer
) -> Callable[[int, int, bool], tuple[Path, Path]]:
    """(width, intermediate, tied) → an 8-layer checkpoint of that shape and its F32 GGUF, built once."""
    built: dict[tuple[int, int, bool], tuple[Path, Path]] = {}

    def build(width: int, intermediate: int, tied: bool) -> tuple[Path, Path]:
        if (width, intermediate, tied) not in built:
            config = dataclasses.replace(
                WIDE,
                hidden_size=width,
                intermediate_size=intermediate,
                num_hidden_layers=8,
                tie_word_embeddings=tied,
            )
            folder = tmp_path_factory.mktemp(f"layered{width}")
            checkpoint = make_checkpoint(folder / "model", small_tokenizer, config)
            built[width, intermediate, tied] = checkpoint, export_gguf(checkpoint, folder / "f32.gguf", "f32")
        return built[width, intermediate, tied]

    return build


@pytest.mark.slow
@pytest.mark.parametrize("quant", sorted(MIXTURES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("width", "intermediate"), [(256, 512), (128, 384)], ids=["rows256", "rows128"])
def test_tensor_types_equal_llama_cpp_quantizer(
    layered: Callable[[int, int, bool], tuple[Path, Path]],
    tmp_path: Path,
    width: int,
    intermediate: int,
    tied: bool,
    quant: str,
) -> None:
    """Each mixture against llama.cpp's own quantizer left to its defaults (only the file type given), on
    rows that K-quants take whole and on rows that fall back; 8 layers, so that the layer rules apply.
    The two mixtures that are not llama.cpp's differ exactly where `llama_cpp_type` says."""
    checkpoint, f32 = layered(width, intermediate, tied)
    ours = tensor_types(export_gguf(checkpoint, tmp_path / "ours.gguf", quant))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXTURES[quant].file_type)
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    assert tensor_types(theirs) == {name: llama_cpp_type(quant, name, kind, 8) for name, kind in ours.items()}


def tensor_types(path: Path) -> dict[str, str]:
    """The GGUF type of each tensor of a file, as gguf-py reads it."""
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def llama_cpp_type(quant: str, name: str, ours: str, n_layers: int) -> str:
    """The type llama.cpp's quantizer gives a tensor that edgelm gives `ours`. Where they differ, it is by
    design: edgelm's q4_k is Q4_K in every layer (a pure level, to compare block types by themselves), where
    llama.cpp's Q4_K_S moves the first four layers' attn_v (Phi-3's attn_qkv) and the first eighth's ffn_down
    to Q5_K (Q5_1 on rows that are not a multiple of 256); q8_0_f16emb keeps the embedding and output in
    F16, which no llama.cpp file type does."""
    if quant == "q8_0_f16emb" and name in ("token_embd.weight", "output.weight"):
        return "Q8_0"
    if quant == "q4_k" and name.startswith("blk."):
        layer = int(name.split(".")[1])
        if (name.endswith(("attn_v.weight", "attn_qkv.weight")) and layer < 4) or (
            name.endswith("ffn_down.weight") and layer < n_layers // 8
        ):
            return {"Q4_K": "Q5_K", "Q5_0": "Q5_1"}[ours]
    return ours


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
def test_export_holds_one_tensor_at_a_time(
    tmp_path: Path, small_tokenizer: Tokenizer, live_tensors: LiveTensors, quant: str
) -> None:
    """A 12-layer model streams into its GGUF file: at most the tensor being written and the one being
    read are alive at once, a small part of the model."""
    checkpoint = make_checkpoint(
        tmp_path / "deep", small_tokenizer, dataclasses.replace(WIDE, num_hidden_layers=12)
    )
    model_bytes = 4 * sum(math.prod(shape) for shape in weight_shapes(checkpoint).values())
    export_gguf(checkpoint, tmp_path, quant)
    assert live_tensors.largest > 0
    assert live_tensors.peak <= 2 * live_tensors.largest < model_bytes / 20


def test_generation_through_llama_cpp(exported: dict[str, Path]) -> None:
    with edgelm.load(exported["q4_k_m"]) as model:
        text = model.generate("def parse_args(", max_new_tokens=20, temperature=0)
        assert model.runtime.device == "cpu" and len(text) > 0
        assert "".join(model.stream("def parse_args(", max_new_tokens=20, temperature=0)) == text
        assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 128
        with pytest.raises(EdgelmError, match="context"):
            model.runtime.forward([5] * 200)


def test_output_names_and_bad_input(checkpoint: Path, tmp_path: Path) -> None:
    assert export_gguf(checkpoint, tmp_path, "q8_0").name == "ckpt-Q8_0.gguf"
    assert export_gguf(checkpoint, tmp_path / "named.gguf", "f16").name == "named.gguf"
    with pytest.raises(EdgelmError, match="unknown GGUF quantization 'q3_x'"):
        export_gguf(checkpoint, tmp_path, "q3_x")
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (checkpoint / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(EdgelmError, match=r"pre-tokenizer .*Whitespace.* llama\.cpp"):
        export_gguf(checkpoint, tmp_path / "bad.gguf", "f16")
    assert not (tmp_path / "bad.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt",
        "ckpt-Q8_0.gguf",
        "named.gguf",
    ]  # no leftovers


@pytest.mark.parametrize("quant", sorted(MIXTURES))
def test_packed_tensors_of_256_wide_rows_equal_quant_py(
    tmp_path: Path, small_tokenizer: Tokenizer, quant: str
) -> None:
    """Every mixture on rows that K-quants take whole: Q4_K, Q6_K, Q4_1, F16... as gguf-py reads them back."""
    config = WIDE
    checkpoint = make_checkpoint(tmp_path / "wide", small_tokenizer, config)
    _, tensors, _ = load_checkpoint(checkpoint)
    reader = GGUFReader(export_gguf(checkpoint, tmp_path, quant))
    by_name = {t.name: t for t in reader.tensors}
    for hf_name, w in tensors.items():
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_for_gguf(
                w, config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            )
        stored = by_name[gguf_name(hf_name, "llama")]
        theirs = gguf_dequantize(stored.data, stored.tensor_type).reshape(w.shape)
        assert np.array_equal(theirs, _dequantized(w, stored.tensor_type)), (hf_name, stored.tensor_type.name)
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert MIXTURES[quant].base.name in kinds


def test_one_model_in_two_threads(exported: dict[str, Path]) -> None:
    """Generations that share one llama.cpp context take turns: each gets what it would get alone."""
    import threading

    with edgelm.load(exported["q8_0"]) as model:
        prompts = ["def parse_args(", "class Stack:", "import os\n", "for i in range("]
        alone = {p: model.generate(p, max_new_tokens=24, temperature=0) for p in prompts}
        together: dict[str, str] = {}

        def run(prompt: str) -> None:
            together[prompt] = model.generate(prompt, max_new_tokens=24, temperature=0)

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert together == alone


@pytest.mark.slow
def test_calibration_lowers_the_kl_divergence(trained_run: Path, tmp_path: Path) -> None:
    """`--calibration` (activation-weighted scales + GPTQ error feedback) on text from the training split
    brings Q4_0 closer to the float32 reference on held-out windows (measured: KLD 0.40x of uncalibrated)."""
    import subprocess
    import sys
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calibration = tmp_path / "calibration.txt"
    calibration.write_text((stdlib / "argparse.py").read_text()[:40000])
    files = {}
    for name, extra in (("plain", []), ("calibrated", ["--calibration", str(calibration)])):
        out = tmp_path / f"{name}.gguf"
        command = [sys.executable, "-m", "edgelm", "export", "gguf", str(trained_run), "--quant", "q4_0"]
        result = subprocess.run([*command, "--out", str(out), *extra], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        files[name] = out
    windows = validation_windows(load_tokens(trained_run / "data").val, 127, max_windows=8)[:, :-1]
    with edgelm.load(trained_run) as reference:
        expected = logits_on_windows(reference.runtime, windows)
    kld = {}
    for name, path in files.items():
        with edgelm.load(path) as model:
            got = logits_on_windows(model.runtime, windows)
        kld[name] = float(kl_divergence(log_probs(expected), log_probs(got)).mean())
    assert kld["calibrated"] < 0.8 * kld["plain"], kld
    assert GGUFReader(files["calibrated"]).fields["edgelm.quantization"].contents() == "q4_0 (calibrated)"


def test_embedding_rows_past_the_tokenizer_get_padding_tokens(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    """Hub models often have more embedding rows than tokens (padded to a multiple of 64 or 128): the export
    gives the rows past the tokenizer unused `[PAD<id>]` tokens, as llama.cpp's converter does, so that
    llama.cpp loads the file and computes what torch does; a tokenizer larger than the model is refused."""
    from edgelm.training.random_checkpoint import random_checkpoint

    config = dataclasses.replace(SMALL, vocab_size=small_tokenizer.vocab_size + 13)
    checkpoint = random_checkpoint(tmp_path / "padded", config, small_tokenizer)
    path = export_gguf(checkpoint, tmp_path / "padded.gguf", "f32")
    tokens = GGUFReader(path).get_field("tokenizer.ggml.tokens")
    assert tokens is not None and len(tokens.data) == config.vocab_size
    ids = small_tokenizer.encode(VARIED[0], add_bos=True)[:40]
    with edgelm.load(checkpoint) as reference, edgelm.load(path, kv_cache="f32") as model:
        assert model.tokenizer.encode(VARIED[0], add_bos=True)[:40] == ids
        got = model.runtime.forward(ids, all_logits=True)
        assert np.abs(got - reference.runtime.forward(ids, all_logits=True)).max() <= 1e-4
    smaller = dataclasses.replace(SMALL, vocab_size=small_tokenizer.vocab_size - 1)
    with pytest.raises(EdgelmError, match=r"tokens, more than the model's vocab_size"):
        export_gguf(
            random_checkpoint(tmp_path / "small", smaller, small_tokenizer), tmp_path / "x.gguf", "f32"
        )


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_planned_size_is_the_written_size(
    tmp_path: Path, small_tokenizer: Tokenizer, quant: str, tied: bool
) -> None:
    """The size a GGUF export will have, from shapes and the tokenizer alone, is the file's size; Llama 3's
    RoPE factors (a tensor the checkpoint does not hold) included."""
    config = dataclasses.replace(
        SMALL,
        hidden_size=256,
        intermediate_size=512,
        head_dim=64,
        tie_word_embeddings=tied,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64),
    )
    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer, config)
    path = export_gguf(checkpoint, tmp_path / f"{quant}.gguf", quant)
    assert planned_size(checkpoint, quant) == path.stat().st_size
