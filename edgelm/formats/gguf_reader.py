"""Read a GGUF file's metadata and tensor index, validated so that no file can crash or exhaust the reader.

Layout (little-endian), as llama.cpp's `gguf.cpp` reads it:

    "GGUF" · u32 version · u64 tensor_count · u64 kv_count
    kv_count ×     string key · u32 value type · value
    tensor_count × string name · u32 n_dims · u64 ne[n_dims] · u32 ggml type · u64 offset (in the data)
    padding to general.alignment (default 32) · data section

    string = u64 length + UTF-8 bytes;  array = u32 element type + u64 count + elements (arrays may nest)

The header is parsed from a read-only mmap of the file, so the tensor data is never read; every length and
count is checked against the bytes left in the file before anything is allocated, and every rule llama.cpp
applies when it loads a file is applied here too (see `read_gguf`). The reader needs only numpy: the gguf
package is imported when it is needed (tensor types outside `GGML_TYPES`, dequantizing quantized tensors).
"""

from __future__ import annotations

import itertools
import math
import mmap
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError, missing_dependency
from edgelm.formats.artifact import GGUF_MAGIC

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) counts the terminating NUL
MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_ARRAY_NESTING = 8  # arrays inside arrays (llama.cpp accepts none, gguf-py any)
INT64_MAX = (1 << 63) - 1

# ggml type id -> (name, values per block, bytes per block): enough to read and size the common files without
# the gguf package; the others are looked up in gguf.GGML_QUANT_SIZES (see ggml_type_info)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 2 + 16),
    3: ("Q4_1", 32, 2 + 2 + 16),
    6: ("Q5_0", 32, 2 + 4 + 16),
    7: ("Q5_1", 32, 2 + 2 + 4 + 16),
    8: ("Q8_0", 32, 2 + 32),
    9: ("Q8_1", 32, 4 + 4 + 32),
    10: ("Q2_K", 256, 2 + 2 + 16 + 64),
    11: ("Q3_K", 256, 2 + 64 + 32 + 12),
    12: ("Q4_K", 256, 2 + 2 + 12 + 128),
    13: ("Q5_K", 256, 2 + 2 + 12 + 32 + 128),
    14: ("Q6_K", 256, 2 + 128 + 64 + 16),
    15: ("Q8_K", 256, 4 + 256 + 32),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
# ggml types whose values are stored as plain little-endian numbers
_PLAIN_DTYPES = {0: "<f4", 1: "<f2", 24: "<i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8"}
_BF16 = 30

# metadata value type id -> (name, struct/numpy code) for the fixed-size types; bool is a byte, nonzero = true
_VALUE_TYPES: dict[int, tuple[str, str]] = {
    0: ("uint8", "B"),
    1: ("int8", "b"),
    2: ("uint16", "H"),
    3: ("int16", "h"),
    4: ("uint32", "I"),
    5: ("int32", "i"),
    6: ("float32", "f"),
    7: ("bool", "B"),
    10: ("uint64", "Q"),
    11: ("int64", "q"),
    12: ("float64", "d"),
}
_STRING, _ARRAY, _BOOL, _UINT32 = 8, 9, 7, 4
_ELEMENT_BYTES = {code: struct.calcsize("<" + fmt) for code, (_, fmt) in _VALUE_TYPES.items()}
_ELEMENT_BYTES.update({_STRING: 8, _ARRAY: 4 + 8})  # the least bytes one array element can take

_HEADER_BYTES = 4 + 4 + 8 + 8
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # a one-byte key and a uint8 value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # an empty name and one dimension
_U64 = struct.Struct("<Q")


# --------------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are and how to read them."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length (ne[0]), as gguf stores dims
    type: int  # ggml type id (gguf.GGMLQuantizationType value)
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A validated GGUF header: metadata values and the tensor index; tensor data is mapped on demand."""

    path: Path
    version: int
    metadata: dict[str, Any]  # key -> python value (int/float/bool/str, lists for arrays)
    tensors: dict[str, GGUFTensor]  # in file order

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 np.memmap (nothing is read until it is used)."""
        info = self._tensor(name)
        if info.nbytes == 0:
            empty = np.zeros(0, dtype=np.uint8)
            empty.flags.writeable = False
            return empty
        try:
            return np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        except (OSError, ValueError) as e:
            raise EdgelmError(
                f"{self.path}: cannot map tensor '{name}' data [offset {info.offset}, {info.nbytes} bytes] "
                f"({e}); has the file changed since it was read?"
            ) from None

    def tensor_array(self, name: str) -> np.ndarray:
        """A new float32 array of the tensor's values in numpy order (rows, cols) = reversed(shape).

        Plain types (F32, F16, BF16, F64, I8..I64) are converted here; quantized types through
        gguf.quants.dequantize, which needs the gguf package.
        """
        info = self._tensor(name)
        shape = tuple(reversed(info.shape))
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=np.float32)
        data = np.asarray(self.tensor_bytes(name))
        if info.type in _PLAIN_DTYPES:
            return data.view(_PLAIN_DTYPES[info.type]).astype(np.float32).reshape(shape)
        if info.type == _BF16:
            return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return _dequantize(self.path, info, data, shape)

    def _tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            sample = ", ".join(list(self.tensors)[:5])
            raise EdgelmError(
                f"{self.path}: no tensor named '{name}' (the file has {len(self.tensors)} tensors: {sample}"
                f"{', ...' if len(self.tensors) > 5 else ''})"
            ) from None


def _dequantize(path: Path, info: GGUFTensor, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Quantized blocks -> float32 values through gguf-py's dequantizers."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise missing_dependency("gguf", "gguf") from None
    _, block, block_bytes = ggml_type_info(info.type) or ("?", 1, 1)
    rows = data.reshape(*shape[:-1], shape[-1] // block * block_bytes)  # (..., bytes per row)
    try:
        values = dequantize(np.asarray(rows), GGMLQuantizationType(info.type))
    except (NotImplementedError, ValueError) as e:
        raise EdgelmError(
            f"{path}: cannot dequantize tensor '{info.name}' of type {ggml_type_name(info.type)} ({e}); "
            "upgrade gguf (pip install -U gguf)"
        ) from None
    return np.asarray(values, dtype=np.float32).reshape(shape)


# -------------------------------------------------------------------------------------------- ggml types


def ggml_type_info(type_id: int) -> tuple[str, int, int] | None:
    """(name, values per block, bytes per block) of a ggml type: GGML_TYPES, else gguf's table, else None."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    try:
        import gguf
    except ImportError:
        return None
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None
    sizes = gguf.GGML_QUANT_SIZES.get(qtype)
    return None if sizes is None else (qtype.name, int(sizes[0]), int(sizes[1]))


def ggml_type_name(type_id: int) -> str:
    """'Q8_0' for 8; 'type 99' for an id neither edgelm nor the installed gguf knows."""
    info = ggml_type_info(type_id)
    return info[0] if info else f"type {type_id}"


def _gguf_installed() -> bool:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ parsing


class _Cursor:
    """A position in the file's bytes; every read checks the bytes left and fails with the place named."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def error(self, message: str) -> EdgelmError:
        return EdgelmError(f"{self.path}: {message}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(
                f"file ends inside {what} (needs {n} bytes at offset {self.pos}, file size {self.size}; "
                "is the file truncated?)"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def raw_string(self, what: str, limit: int = MAX_STRING_BYTES) -> bytes:
        at = self.pos
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise self.error(f"{what} at offset {at} has length {n}, more than the limit of {limit} bytes")
        if n > self.size - self.pos:
            raise self.error(
                f"{what} at offset {at} has length {n}, more than the {self.size - self.pos} bytes left "
                f"in the file (size {self.size})"
            )
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def text(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        at = self.pos
        return self.decode(self.raw_string(what, limit), what, at)

    def decode(self, raw: bytes, what: str, at: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(
                f"{what} at offset {at} is not valid UTF-8 ({e.reason}, byte {e.start})"
            ) from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value of type `vtype`."""
        if vtype in _VALUE_TYPES:
            value = self.scalar("<" + _VALUE_TYPES[vtype][1], what)
            return value != 0 if vtype == _BOOL else value
        if vtype == _STRING:
            return self.text(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.error(f"{what} has unknown value type {vtype} at offset {self.pos - 4} (known: 0..12)")

    def array(self, what: str, depth: int) -> list[Any]:
        """An array value: element type, count, elements, with the count checked before anything is read."""
        if depth >= MAX_ARRAY_NESTING:
            raise self.error(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        etype = self.u32(f"the element type of {what}")
        at = self.pos
        count = self.u64(f"the element count of {what}")
        if etype not in _ELEMENT_BYTES:
            raise self.error(f"{what} has unknown element type {etype} at offset {at - 4} (known: 0..12)")
        if count > MAX_ARRAY_ELEMENTS or count * _ELEMENT_BYTES[etype] > self.size - self.pos:
            raise self.error(
                f"{what} at offset {at} claims {count} elements, more than fit in the {self.size - self.pos} "
                f"bytes left in the file (size {self.size})"
            )
        if etype in _VALUE_TYPES:
            code = _VALUE_TYPES[etype][1]
            values = np.frombuffer(self.buf, dtype="<" + code, count=count, offset=self.pos).tolist()
            self.pos += count * _ELEMENT_BYTES[etype]
            return [v != 0 for v in values] if etype == _BOOL else values
        if etype == _STRING:
            return self.strings(what, count)
        return [self.array(f"{what} element {i}", depth + 1) for i in range(count)]

    def strings(self, what: str, count: int) -> list[str]:
        """`count` strings: the hot loop of a vocabulary, so it makes no method call per element."""
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        out: list[str] = []
        i = 0
        try:
            for i in range(count):
                if size - pos < 8:
                    self.pos = pos
                    self.need(8, f"the length of {what} element {i}")
                (n,) = unpack(buf, pos)
                if n > size - pos - 8:
                    raise self.error(
                        f"{what} element {i} at offset {pos} has length {n}, more than the "
                        f"{size - pos - 8} bytes left in the file (size {size})"
                    )
                pos += 8
                out.append(buf[pos : pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise self.error(f"{what} element {i} at offset {pos} is not valid UTF-8 ({e.reason})") from None
        self.pos = pos
        return out


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version, tensor count and kv count, with the counts checked against the file size."""
    cur.need(4, "the magic")
    magic = cur.buf[0:4]
    if magic != GGUF_MAGIC:
        raise cur.error(f"not a GGUF file (magic {magic!r} at offset 0, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version != 0:
        raise cur.error(
            f"GGUF version {version:#010x} looks byte-swapped: a big-endian file? edgelm reads little-endian "
            "GGUF only"
        )
    if version not in SUPPORTED_VERSIONS:
        raise cur.error(
            f"GGUF version {version} is not supported (edgelm reads versions 2 and 3; "
            "re-convert the model with a current llama.cpp)"
        )
    tensor_count = cur.u64("the tensor count")
    kv_count = cur.u64("the metadata key-value count")
    left = cur.size - cur.pos
    if tensor_count * _MIN_TENSOR_INFO_BYTES + kv_count * _MIN_KV_BYTES > left:
        raise cur.error(
            f"header claims {tensor_count} tensors and {kv_count} metadata keys, which cannot fit in the "
            f"{left} bytes after the header (each tensor takes at least {_MIN_TENSOR_INFO_BYTES} bytes, each "
            f"key at least {_MIN_KV_BYTES}); the file is corrupt or truncated"
        )
    return version, tensor_count, kv_count


def _read_metadata(cur: _Cursor, kv_count: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The key-value pairs: key -> value and key -> value type id."""
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(kv_count):
        at = cur.pos
        key = cur.text(f"metadata key #{i}")
        if not key:
            raise cur.error(f"metadata key #{i} at offset {at} is empty")
        if key in metadata:
            raise cur.error(f"metadata key #{i} '{key}' at offset {at} is a duplicate")
        vtype = cur.u32(f"the value type of key '{key}'")
        metadata[key] = cur.value(vtype, f"the value of key '{key}'")
        types[key] = vtype
    return metadata, types


def _value_type_name(vtype: int) -> str:
    return _VALUE_TYPES[vtype][0] if vtype in _VALUE_TYPES else {_STRING: "string", _ARRAY: "array"}[vtype]


def _alignment(cur: _Cursor, metadata: dict[str, Any], types: dict[str, int]) -> int:
    """general.alignment: a uint32 power of two, 32 when absent."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value, vtype = metadata["general.alignment"], types["general.alignment"]
    if vtype != _UINT32:
        raise cur.error(f"general.alignment must be a uint32, not a {_value_type_name(vtype)}")
    if value == 0 or value & (value - 1):
        raise cur.error(f"general.alignment {value} is not a power of two")
    return value


def _read_tensor_info(cur: _Cursor, i: int, names: set[str]) -> tuple[str, tuple[int, ...], int, int, int]:
    """One tensor info: (name, shape, ggml type, offset from the data section, nbytes), checked as llama.cpp
    checks it."""
    at = cur.pos
    raw = cur.raw_string(f"the name of tensor #{i}")
    if len(raw) > MAX_NAME_BYTES:
        raise cur.error(
            f"tensor #{i} name at offset {at} is {len(raw)} bytes, more than ggml's limit of "
            f"{MAX_NAME_BYTES} ({raw[:MAX_NAME_BYTES]!r}...)"
        )
    name = cur.decode(raw, f"the name of tensor #{i}", at)
    if name in names:
        raise cur.error(f"tensor #{i} at offset {at}: duplicate tensor name '{name}'")
    where = f"tensor '{name}'"
    n_dims = cur.u32(f"the dimension count of {where}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.error(
            f"{where} has {n_dims} dimensions at offset {cur.pos - 4}; edgelm reads 1..{MAX_DIMS}"
        )
    cur.need(8 * n_dims, f"the dimensions of {where}")
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    for j, ne in enumerate(shape):
        if ne > INT64_MAX:
            raise cur.error(f"{where} dimension {j} is {ne}, which is negative as ggml's int64")
    cur.pos += 8 * n_dims
    count = math.prod(shape)
    if count > INT64_MAX:
        raise cur.error(f"{where} shape {list(shape)} has {count} elements, more than an int64 holds")
    ggml_type = cur.u32(f"the type of {where}")
    info = ggml_type_info(ggml_type)
    if info is None:
        hint = "" if _gguf_installed() else " (the gguf package knows more: pip install 'edgelm[gguf]')"
        raise cur.error(f"{where} has unknown ggml type {ggml_type} at offset {cur.pos - 4}{hint}")
    type_name, block, block_bytes = info
    if shape[0] % block:
        raise cur.error(
            f"{where} of type {type_name} has rows of {shape[0]} values, "
            f"not a multiple of the type's block size {block}"
        )
    offset = cur.u64(f"the data offset of {where}")
    return name, tuple(shape), ggml_type, offset, count // block * block_bytes


def _place_tensors(
    cur: _Cursor, infos: list[tuple[str, tuple[int, ...], int, int, int]], alignment: int
) -> dict[str, GGUFTensor]:
    """Absolute offsets: each tensor aligned, inside the file, and overlapping no other."""
    data_start = cur.pos
    if infos:
        data_start = -(-cur.pos // alignment) * alignment
        if data_start > cur.size:
            raise cur.error(
                f"the data section would start at offset {data_start} (after the header and padding to "
                f"{alignment}), past the end of the file (size {cur.size}); is the file truncated?"
            )
    tensors: dict[str, GGUFTensor] = {}
    for name, shape, ggml_type, relative, nbytes in infos:
        where = f"tensor '{name}' data [offset {data_start + relative}, {nbytes} bytes]"
        if relative % alignment:
            raise cur.error(f"{where} is not aligned to {alignment} bytes (relative offset {relative})")
        if data_start + relative + nbytes > cur.size:
            raise cur.error(f"{where} ends past the end of the file (size {cur.size}); is it truncated?")
        tensors[name] = GGUFTensor(name, shape, ggml_type, data_start + relative, nbytes)
    ordered = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.offset + a.nbytes:
            raise cur.error(
                f"tensor '{b.name}' data [offset {b.offset}, {b.nbytes} bytes] overlaps tensor '{a.name}' "
                f"data [offset {a.offset}, {a.nbytes} bytes]"
            )
    return tensors


def _parse(buf: mmap.mmap, path: Path) -> GGUFFile:
    cur = _Cursor(buf, path)
    version, tensor_count, kv_count = _read_header(cur)
    metadata, types = _read_metadata(cur, kv_count)
    alignment = _alignment(cur, metadata, types)
    left = cur.size - cur.pos
    if tensor_count * _MIN_TENSOR_INFO_BYTES > left:
        raise cur.error(
            f"header claims {tensor_count} tensors, which cannot fit in the {left} bytes left after the "
            f"metadata at offset {cur.pos}; is the file truncated?"
        )
    infos: list[tuple[str, tuple[int, ...], int, int, int]] = []
    names: set[str] = set()
    for i in range(tensor_count):
        infos.append(_read_tensor_info(cur, i, names))
        names.add(infos[-1][0])
    return GGUFFile(path, version, metadata, _place_tensors(cur, infos, alignment))


def read_gguf(path: str | Path) -> GGUFFile:
    """Read and validate a GGUF file's header; the tensor data stays on disk (see GGUFFile.tensor_bytes).

    Any defect raises an EdgelmError naming the file, the defect and its byte offset. The rules follow
    llama.cpp's gguf.cpp (and its model loader for the data ranges); those marked (edgelm) are ours:
    - magic "GGUF"; version 2 or 3 (1 and > 3 refused; a byte-swapped version is called out as big-endian)
    - tensor and key counts that can fit in the bytes after the header (edgelm; llama.cpp: non-negative int64)
    - strings at most 1 GiB, arrays at most 2**30 elements, both within the bytes left, checked before reading
    - keys non-empty, unique, valid UTF-8 (edgelm); value types 0..12
    - arrays nested at most MAX_ARRAY_NESTING deep (edgelm: gguf-py writes any depth, llama.cpp refuses any)
    - general.alignment, if present, a uint32 power of two
    - tensor names unique, at most 63 bytes (GGML_MAX_NAME), valid UTF-8 (edgelm)
    - 1..4 dimensions (edgelm; llama.cpp also takes 0 as a scalar), each in 0..2**63-1, element count in int64
    - a known ggml type whose block size divides the row length ne[0]
    - data offsets aligned, data inside the file, no two tensors overlapping (edgelm; llama.cpp demands the
      exact packed layout gguf writers produce, which implies all three)
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise EdgelmError(f"{path}: not found") from None
    except OSError as e:
        raise EdgelmError(f"{path}: cannot be read ({e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise EdgelmError(f"{path}: not a regular file (give a .gguf file)")
    if info.st_size == 0:
        raise EdgelmError(f"{path}: empty file, not a GGUF file")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise EdgelmError(f"{path}: cannot be read ({e})") from None
    with buf:
        return _parse(buf, path)
