"""The GGUF reader against gguf-py: files written by GGUFWriter read back to the values written (and to what
GGUFReader reads); a corpus of malformed files, each refused with an EdgelmError, fast, in little memory."""

from __future__ import annotations

import math
import os
import struct
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edgelm.errors import EdgelmError
from edgelm.formats.gguf_reader import GGML_TYPES, read_gguf
from edgelm.info import describe_gguf, gguf_summary

# ------------------------------------------------------------------------------ files written by GGUFWriter

# key -> (value type, value written, value expected back)
SCALARS: dict[str, tuple[V, Any, Any]] = {
    "t.u8": (V.UINT8, 200, 200),
    "t.i8": (V.INT8, -5, -5),
    "t.u16": (V.UINT16, 60000, 60000),
    "t.i16": (V.INT16, -30000, -30000),
    "t.u32": (V.UINT32, 4_000_000_000, 4_000_000_000),
    "t.i32": (V.INT32, -2_000_000_000, -2_000_000_000),
    "t.f32": (V.FLOAT32, 0.1, float(np.float32(0.1))),
    "t.u64": (V.UINT64, 2**63 + 5, 2**63 + 5),
    "t.i64": (V.INT64, -(2**62), -(2**62)),
    "t.f64": (V.FLOAT64, 0.1, 0.1),
    "t.true": (V.BOOL, True, True),
    "t.false": (V.BOOL, False, False),
    "t.str": (V.STRING, "héllo 🚀 中文", "héllo 🚀 中文"),
}
# key -> (element type or None to infer, value)
ARRAYS: dict[str, tuple[V | None, list[Any]]] = {
    "a.u8": (V.UINT8, [0, 1, 255]),
    "a.i32": (None, [1, -2, 3]),
    "a.f32": (None, [0.5, -0.25]),
    "a.bool": (None, [True, False, True]),
    "a.str": (None, ["a", "", "ü", "🚀"]),
    "a.nested": (None, [[1, 2], [3]]),
    "a.nested_str": (None, [["x"], ["y", "z"]]),
}


def write_model(path: Path, rng: np.random.Generator) -> dict[str, tuple[int, np.ndarray]]:
    """A GGUFWriter file with every metadata type and F32/F16/BF16/Q8_0/Q4_K tensors; returns, per tensor,
    its ggml type and the float32 values a reader must return (numpy order)."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, (vtype, value, _) in SCALARS.items():
        writer.add_key_value(key, value, vtype)
    for key, (etype, value) in ARRAYS.items():
        writer.add_key_value(key, value, V.ARRAY, sub_type=etype)
    expected: dict[str, tuple[int, np.ndarray]] = {}
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    writer.add_tensor("f32", f32)
    expected["f32"] = (T.F32, f32)
    f16 = rng.standard_normal((4, 32)).astype(np.float16)
    writer.add_tensor("f16", f16)
    expected["f16"] = (T.F16, f16.astype(np.float32))
    norm = rng.standard_normal(64).astype(np.float32)
    writer.add_tensor("norm", norm)
    expected["norm"] = (T.F32, norm)
    for qtype, shape in ((T.BF16, (2, 3, 8)), (T.Q8_0, (5, 64))):
        w = rng.standard_normal(shape).astype(np.float32)
        packed = gguf_quantize(w, qtype)
        writer.add_tensor(f"{qtype.name.lower()}", packed, raw_dtype=qtype)
        expected[qtype.name.lower()] = (qtype, gguf_dequantize(packed, qtype))
    # Q4_K has no quantizer in gguf-py: random blocks with finite float16 scales, dequantized by gguf-py
    blocks = rng.integers(0, 256, (2, 144), dtype=np.uint8)
    blocks[:, :4] = np.frombuffer(np.array([0.01, 0.002], np.float16).tobytes(), np.uint8)
    writer.add_tensor("q4_k", blocks, raw_dtype=T.Q4_K)
    expected["q4_k"] = (T.Q4_K, gguf_dequantize(blocks, T.Q4_K))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, np.ndarray]]]:
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    return path, write_model(path, np.random.default_rng(0))


def test_reads_back_what_gguf_writer_wrote(model: tuple[Path, dict[str, tuple[int, np.ndarray]]]) -> None:
    path, expected = model
    f = read_gguf(path)
    assert f.path == path and f.version == 3
    assert f.metadata["general.architecture"] == "llama"
    for key, (_, _, value) in SCALARS.items():
        assert f.metadata[key] == value and type(f.metadata[key]) is type(value), key
    for key, (_, value) in ARRAYS.items():
        assert f.metadata[key] == value, key
    assert list(f.tensors) == list(expected)
    for name, (qtype, values) in expected.items():
        tensor = f.tensors[name]
        assert tensor.type == qtype and tensor.shape == tuple(reversed(values.shape)), name
        array = f.tensor_array(name)
        assert array.dtype == np.float32 and array.shape == values.shape, name
        assert np.array_equal(array, values), name


def test_agrees_with_gguf_reader(model: tuple[Path, dict[str, tuple[int, np.ndarray]]]) -> None:
    path, _ = model
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):  # the reader's own header fields
            continue
        if field.types[:2] != [V.ARRAY, V.ARRAY]:  # gguf-py's contents() flattens nested arrays
            assert ours.metadata[key] == field.contents(), key
    assert set(ours.metadata) == {k for k in theirs.fields if not k.startswith("GGUF.")}
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.offset, mine.nbytes, mine.type) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert mine.shape == tuple(int(n) for n in t.shape)
        data = ours.tensor_bytes(t.name)
        assert isinstance(data, np.memmap) and not data.flags.writeable
        assert data.tobytes() == np.ascontiguousarray(t.data).tobytes()


def test_type_table_matches_gguf() -> None:
    for type_id, (name, block, block_bytes) in GGML_TYPES.items():
        assert T(type_id).name == name
        assert gguf.GGML_QUANT_SIZES[T(type_id)] == (block, block_bytes), name


def test_describe(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(96)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    q = gguf_quantize(np.ones((64, 64), np.float32), T.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=T.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", q[:32], raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EdgelmError, match=r"metadata key llama\.feed_forward_length is missing"):
        describe_gguf(path)  # `info` checks a file as a model: this one is no whole model
    info = gguf_summary(read_gguf(path))
    assert info["architecture"] == "llama" and info["name"] == "tiny" and info["format"] == "gguf v3"
    assert info["parameters"] == 300 * 64 + 64 + 64 * 64 + 32 * 64 and info["tensors"] == 4
    assert (info["context_length"], info["layers"], info["embedding_length"]) == (96, 1, 64)
    assert (info["heads"], info["kv_heads"]) == (4, 2)
    assert info["file_size"] == path.stat().st_size
    assert info["tensor_types"] == {"F16": 1, "F32": 1, "Q8_0": 2}
    assert info["file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (info["tokenizer_model"], info["tokenizer_pre"], info["vocab_size"]) == ("gpt2", "default", 300)
    assert (info["bos_token_id"], info["eos_token_id"], info["chat_template"]) == (1, 2, True)


# ------------------------------------------------------------------------------------ files built by hand


def s(text: str | bytes) -> bytes:
    """A GGUF string: u64 length + bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def arr(etype: int, count: int, payload: bytes) -> bytes:
    """An array value (after the ARRAY type): element type, count, elements."""
    return struct.pack("<IQ", etype, count) + payload


def ti(name: str | bytes, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    """A tensor info."""
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def build(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
    magic: bytes = b"GGUF",
) -> bytes:
    """Header + key-value pairs + tensor infos + padding + data, with the counts overridable."""
    counts = (len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head = magic + struct.pack("<IQQ", version, *counts) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment if infos else 0) + data


ARCH = kv("general.architecture", V.STRING, s("llama"))
F32_DATA = np.arange(8, dtype="<f4").tobytes()  # tensor "a": F32, dims (4, 2), 32 bytes
F16_DATA = np.arange(8, dtype="<f2").tobytes()  # tensor "b": F16, dims (8,), 16 bytes


def base_kvs() -> list[bytes]:
    """One pair of each value type, arrays included (empty, of strings, of arrays)."""
    return [
        ARCH,
        kv("u8", V.UINT8, b"\x07"),
        kv("i8", V.INT8, b"\xff"),
        kv("u16", V.UINT16, struct.pack("<H", 500)),
        kv("i16", V.INT16, struct.pack("<h", -500)),
        kv("u32", V.UINT32, struct.pack("<I", 70000)),
        kv("i32", V.INT32, struct.pack("<i", -70000)),
        kv("f32", V.FLOAT32, struct.pack("<f", 1.5)),
        kv("bool", V.BOOL, b"\x01"),
        kv("u64", V.UINT64, struct.pack("<Q", 2**64 - 1)),
        kv("i64", V.INT64, struct.pack("<q", -(2**63))),
        kv("f64", V.FLOAT64, struct.pack("<d", -0.1)),
        kv("empty", V.ARRAY, arr(V.UINT8, 0, b"")),
        kv("words", V.ARRAY, arr(V.STRING, 2, s("hi") + s("é"))),
        kv("nested", V.ARRAY, arr(V.ARRAY, 2, arr(V.INT8, 1, b"\x05") + arr(V.STRING, 0, b""))),
    ]


BASE_METADATA = {
    "general.architecture": "llama",
    **{"u8": 7, "i8": -1, "u16": 500, "i16": -500, "u32": 70000, "i32": -70000, "f32": 1.5, "bool": True},
    **{
        "u64": 2**64 - 1,
        "i64": -(2**63),
        "f64": -0.1,
        "empty": [],
        "words": ["hi", "é"],
        "nested": [[5], []],
    },
}


def base_file() -> bytes:
    """A small valid file whose last tensor ends at the last byte, so that every shorter prefix is invalid."""
    infos = [ti("a", (4, 2), T.F32, 0), ti("b", (8,), T.F16, 32)]
    return build(base_kvs(), infos, F32_DATA + F16_DATA)


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / f"{name}.gguf"
    path.write_bytes(data)
    return path


def test_hand_built_file_reads_like_gguf_reader(tmp_path: Path) -> None:
    path = write(tmp_path, "base", base_file())
    f = read_gguf(path)
    assert f.metadata == BASE_METADATA
    assert f.tensors["a"].shape == (4, 2) and f.tensors["b"].nbytes == 16
    assert np.array_equal(f.tensor_array("a"), np.arange(8, dtype=np.float32).reshape(2, 4))
    assert np.array_equal(f.tensor_array("b"), np.arange(8, dtype=np.float32))
    theirs = gguf.GGUFReader(path)
    assert [(t.name, t.data_offset, t.n_bytes) for t in theirs.tensors] == [
        (t.name, t.offset, t.nbytes) for t in f.tensors.values()
    ]


def test_valid_edge_cases(tmp_path: Path) -> None:
    # version 2, a custom alignment, a 63-byte name (ggml's limit), a tensor with a zero dimension
    name = "n" * 63
    infos = [ti(name, (4, 2), T.F32, 0), ti("zero", (0, 3), T.F32, 64)]
    kvs = [ARCH, kv("general.alignment", V.UINT32, struct.pack("<I", 64))]
    data = build(kvs, infos, F32_DATA + bytes(32), version=2, alignment=64)  # the empty tensor ends the file
    f = read_gguf(write(tmp_path, "edge", data))
    assert f.version == 2 and f.tensors[name].offset % 64 == 0
    assert f.tensors["zero"].nbytes == 0 and f.tensor_array("zero").shape == (3, 0)
    assert f.tensor_bytes("zero").size == 0
    with pytest.raises(EdgelmError, match="no tensor named 'missing'"):
        f.tensor_array("missing")


def test_quantized_types_without_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q8 = gguf_quantize(np.ones((1, 32), np.float32), T.Q8_0).tobytes()
    bf16 = struct.pack("<2H", 0x3F80, 0xC000)  # 1.0, -2.0
    infos = [ti("q8", (32,), T.Q8_0, 0), ti("bf16", (2,), T.BF16, 64), ti("k", (256,), T.Q4_K, 96)]
    data = build([ARCH], infos, q8 + bytes(30) + bf16 + bytes(28) + bytes(144))
    path = write(tmp_path, "quant", data)
    unknown = write(tmp_path, "iq", build([ARCH], [ti("iq", (256,), T.IQ2_XXS, 0)], bytes(66)))
    assert read_gguf(unknown).tensors["iq"].nbytes == 66  # sized from gguf.GGML_QUANT_SIZES
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    f = read_gguf(path)
    assert [t.nbytes for t in f.tensors.values()] == [34, 4, 144]
    assert f.tensor_array("bf16").tolist() == [1.0, -2.0]
    with pytest.raises(EdgelmError, match=r"pip install 'edgelm\[gguf\]'"):
        f.tensor_array("q8")
    with pytest.raises(EdgelmError, match=r"unknown ggml type 16 .*gguf package"):
        read_gguf(unknown)


# ----------------------------------------------------------------------------------------- malformed files


def huge_cases() -> dict[str, tuple[bytes, str]]:
    """Files that claim enormous sizes: each must fail before allocating anything of that size."""
    tensor = [ti("a", (4, 2), T.F32, 0)]
    return {
        "tensor_count_max": (build([ARCH], tensor, F32_DATA, n_tensors=2**64 - 1), "cannot fit"),
        "kv_count_max": (build([ARCH], tensor, F32_DATA, n_kv=2**64 - 1), "cannot fit"),
        "counts_2_63": (build([ARCH], tensor, F32_DATA, n_kv=2**63, n_tensors=2**63), "cannot fit"),
        "key_length": (build([struct.pack("<Q", 2**62) + b"k" * 40], tensor, F32_DATA), "has length 4611"),
        "value_length": (build([kv("k", V.STRING, struct.pack("<Q", 2**62) + b"x" * 40)], []), "has length"),
        "name_length": (build([ARCH], [struct.pack("<Q", 2**62) + b"x" * 40]), "has length"),
        "array_count": (build([kv("k", V.ARRAY, arr(V.UINT8, 2**62, b"x" * 40))], []), "claims 4611"),
        "string_array_count": (build([kv("k", V.ARRAY, arr(V.STRING, 2**62, s("x")))], []), "claims"),
        "nested_array_count": (build([kv("k", V.ARRAY, arr(V.ARRAY, 2**62, b"x" * 40))], []), "claims"),
        "string_in_array_length": (
            build([kv("k", V.ARRAY, arr(V.STRING, 2, s("ok") + struct.pack("<Q", 2**62) + b"x" * 8))], []),
            "element 1 at offset .* has length 4611",
        ),
        "dims_product": (build([ARCH], [ti("a", (2**62, 2**62, 4, 4), T.F32, 0)]), "more than an int64"),
        "dim_negative": (build([ARCH], [ti("a", (2**63, 1), T.F32, 0)]), "negative"),
        "offset_huge": (build([ARCH], [ti("a", (4, 2), T.F32, 2**64 - 32)], F32_DATA), "past the end"),
    }


def malformed_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a regular expression the error message must match)."""
    base = base_file()
    a = [ti("a", (4, 2), T.F32, 0)]

    def one_tensor(info: bytes, data: bytes = F32_DATA) -> bytes:
        return build([ARCH], [info], data)

    def alignment(vtype: int, payload: bytes) -> bytes:
        return build([kv("general.alignment", vtype, payload)], a, F32_DATA)

    cases = {
        "empty": (b"", "empty file"),
        "three_bytes": (b"GGU", "file ends inside the magic"),
        "bad_magic": (b"GGUX" + base[4:], "not a GGUF file"),
        "ggml_magic": (b"lmgg" + base[4:], "not a GGUF file"),
        "version_0": (build([ARCH], a, F32_DATA, version=0), "version 0 is not supported"),
        "version_1": (build([ARCH], a, F32_DATA, version=1), "version 1 is not supported"),
        "version_99": (build([ARCH], a, F32_DATA, version=99), "version 99 is not supported"),
        "big_endian": (build([ARCH], a, F32_DATA, version=3 << 24), "big-endian"),
        "header_only": (base[:20], "file ends inside the metadata key-value count"),
        "unknown_value_type": (build([kv("k", 13, b"\x00" * 8)], a, F32_DATA), "unknown value type 13"),
        "unknown_element_type": (
            build([kv("k", V.ARRAY, arr(13, 1, b"\x00" * 8))], a),
            "unknown element type",
        ),
        "nesting_too_deep": (
            build([kv("k", V.ARRAY, arr(V.ARRAY, 1, b"") * 9 + arr(V.UINT8, 0, b""))], a),
            "nests arrays more than 8 deep",
        ),
        "duplicate_key": (build([ARCH, ARCH], a, F32_DATA), "'general.architecture' .* duplicate"),
        "empty_key": (build([kv("", V.UINT8, b"\x01")], a, F32_DATA), "key #0 at offset 24 is empty"),
        "non_utf8_key": (build([kv(b"\xff\xfe", V.UINT8, b"\x01")], a, F32_DATA), "not valid UTF-8"),
        "non_utf8_value": (build([kv("k", V.STRING, s(b"a\xc3"))], a, F32_DATA), "not valid UTF-8"),
        "non_utf8_in_array": (
            build([kv("k", V.ARRAY, arr(V.STRING, 1, s(b"\x80")))], a),
            "element 0 .* UTF-8",
        ),
        "alignment_not_power_of_2": (alignment(V.UINT32, struct.pack("<I", 48)), "48 is not a power of two"),
        "alignment_zero": (alignment(V.UINT32, struct.pack("<I", 0)), "0 is not a power of two"),
        "alignment_u64": (alignment(V.UINT64, struct.pack("<Q", 32)), "must be a uint32, not a uint64"),
        "alignment_string": (alignment(V.STRING, s("32")), "must be a uint32, not a string"),
        "n_dims_0": (one_tensor(s("a") + struct.pack("<IIQ", 0, T.F32, 0)), "has 0 dimensions"),
        "n_dims_5": (one_tensor(ti("a", (1, 1, 1, 1, 1), T.F32, 0)), "has 5 dimensions"),
        "n_dims_max": (one_tensor(s("a") + struct.pack("<I", 2**32 - 1) + bytes(40)), "has 4294967295 dim"),
        "unknown_ggml_type": (one_tensor(ti("a", (4, 2), 99, 0)), "unknown ggml type 99"),
        "removed_ggml_type": (one_tensor(ti("a", (32,), 4, 0)), "unknown ggml type 4"),
        "row_not_multiple_of_block": (one_tensor(ti("a", (48,), T.Q8_0, 0), bytes(51)), "block size 32"),
        "offset_past_end": (one_tensor(ti("a", (4, 2), T.F32, 64)), r"\[offset \d+, 32 bytes\] ends past"),
        "data_truncated": (one_tensor(ti("a", (4, 2), T.F32, 0), F32_DATA[:-1]), "ends past the end"),
        "misaligned_offset": (one_tensor(ti("a", (2,), T.F32, 4), F32_DATA), "not aligned to 32"),
        "overlap": (build([ARCH], [*a, ti("b", (2,), T.F32, 0)], F32_DATA), "'b' .* overlaps tensor 'a'"),
        "overlap_inside": (
            build([ARCH], [ti("a", (32,), T.F32, 0), ti("b", (8,), T.F32, 64)], bytes(128)),
            "'b' .* overlaps tensor 'a'",
        ),
        "duplicate_tensor": (build([ARCH], [*a, ti("a", (2,), T.F32, 32)], F32_DATA * 2), "duplicate tensor"),
        "name_64_bytes": (
            one_tensor(ti("n" * 64, (4, 2), T.F32, 0)),
            "64 bytes, more than ggml's limit of 63",
        ),
        "non_utf8_name": (one_tensor(ti(b"\xe2\x28", (4, 2), T.F32, 0)), "name of tensor #0 .* UTF-8"),
        "data_section_past_end": (base[: len(base) - 48 - 1], "past the end of the file"),
    }
    return {**cases, **huge_cases()}


@pytest.mark.parametrize("case", sorted(malformed_cases()))
def test_malformed_file_is_refused(tmp_path: Path, case: str) -> None:
    data, message = malformed_cases()[case]
    path = write(tmp_path, case, data)
    with pytest.raises(EdgelmError, match=message) as error:
        read_gguf(path)
    assert str(error.value).startswith(f"{path}: ")


def test_malformed_corpus_allocates_little(tmp_path: Path) -> None:
    """A claimed length is checked against the file before anything is allocated (no timing asserted:
    speed lives in benchmarks/; an allocation sized by a claimed 2**62 bytes would fail here)."""
    paths = {name: write(tmp_path, name, data) for name, (data, _) in malformed_cases().items()}
    huge = huge_cases()
    for name, path in paths.items():
        tracemalloc.start()
        with pytest.raises(EdgelmError):
            read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if name in huge:
            assert peak < 10 * 2**20, name


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    base = base_file()
    path = write(tmp_path, "cut", base)
    assert read_gguf(path).metadata == BASE_METADATA
    for n in reversed(range(len(base))):  # every prefix, shortest last
        os.truncate(path, n)
        with pytest.raises(EdgelmError):
            read_gguf(path)


def test_random_corruption_never_escapes(tmp_path: Path) -> None:
    """Flipped bytes: a valid file whose tensors all map, or an EdgelmError; never another exception."""
    base = base_file()
    path = write(tmp_path, "flip", base)
    rng = np.random.default_rng(0)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(300):
            where = rng.integers(0, len(base), rng.integers(1, 4)).tolist()
            for at in where:
                os.pwrite(fd, bytes([rng.integers(0, 256)]), at)
            try:
                f = read_gguf(path)
            except EdgelmError:
                pass
            else:
                for t in f.tensors.values():
                    assert f.tensor_bytes(t.name).size == t.nbytes
                    assert f.tensor_array(t.name).size == math.prod(t.shape)
            for at in where:
                os.pwrite(fd, base[at : at + 1], at)
    finally:
        os.close(fd)


def test_paths_that_are_not_files(tmp_path: Path) -> None:
    with pytest.raises(EdgelmError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(EdgelmError, match="not a regular file"):
        read_gguf(tmp_path)
