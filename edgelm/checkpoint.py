"""The checkpoint directory, in the Hugging Face layout: config.json, model.safetensors (HF tensor names),
tokenizer.json, tokenizer_config.json, generation_config.json. Read and written with numpy, never pickled.

Weights are read without torch, one tensor at a time, from one safetensors file or from the shards that
`model.safetensors.index.json` lists, stored as F32, F16 or BF16 and always handed out as float32:

    header (8-byte length, JSON: dtype, shape, data_offsets per tensor) ──validated──▶ TensorEntry list
    TensorEntry ──seek + readinto──▶ stored array ──widened──▶ float32 array
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np

from edgelm.errors import EdgelmError
from edgelm.files import read_json, temporary_sibling, write_json_atomic
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import Tokenizer
from edgelm.values import is_int

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONVERT_VALUES = 1 << 20  # values converted between dtypes at a time: temporaries stay small
SHARD_BYTES = 5 * 10**9  # above this the weights go into shards, as transformers' save_pretrained makes them
# buffers that some writers store beside the weights and that the model recomputes from config.json
IGNORED_BUFFERS = ("rotary_emb.inv_freq",)
# the float dtypes read as weights → how their bytes are stored (BF16 as raw 16-bit patterns)
FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # as config.json names them
# bytes per element of every safetensors dtype, to validate the byte ranges of any file
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself puts on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies: its file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint by its Hugging Face name, with its shape."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes |= _attention_shapes(config, p + "self_attn.")
        if config.gemma_layout:  # the norms after the attention and after the MLP
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (h,),
                p + "post_feedforward_layernorm.weight": (h,),
            }
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        inner = config.intermediate_size
        if config.fused_projections:  # Phi-3: gate and up as one matrix
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inner, h)
        else:
            shapes |= {p + "mlp.gate_proj.weight": (inner, h), p + "mlp.up_proj.weight": (inner, h)}
        shapes[p + "mlp.down_proj.weight"] = (h, inner)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _attention_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """One layer's attention tensors (prefix `p`, "model.layers.N.self_attn.")."""
    h, hd = config.hidden_size, config.head_dim
    rows = {"q": config.num_attention_heads * hd, "k": config.num_key_value_heads * hd}
    rows["v"] = rows["k"]
    shapes: dict[str, tuple[int, ...]] = {}
    if config.fused_projections:  # Phi-3: q, k and v as one matrix
        shapes[p + "qkv_proj.weight"] = (sum(rows.values()), h)
    else:
        shapes |= {f"{p}{m}_proj.weight": (n, h) for m, n in rows.items()}
    shapes[p + "o_proj.weight"] = (h, rows["q"])
    if config.qkv_bias:
        shapes |= {f"{p}{m}_proj.bias": (n,) for m, n in rows.items()}
    if config.o_bias:
        shapes[p + "o_proj.bias"] = (h,)
    if config.qk_norm:
        shapes |= {p + "q_norm.weight": (hd,), p + "k_norm.weight": (hd,)}
    return shapes


def save_checkpoint(
    directory: Path,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a complete checkpoint directory; each file goes to a temporary name and is renamed into place.

    A tied head stored beside the embeddings (some writers do) is left out; `write_weights` checks the rest.
    """
    directory = Path(directory)
    if config.tie_word_embeddings:
        tensors = {name: t for name, t in tensors.items() if name != "lm_head.weight"}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    write_weights(directory, config, shapes, iter(tensors.items()), metadata)
    tokenizer.save(directory, context_length=config.max_position_embeddings)
    config.save(directory)
    write_generation_config(directory, config, max_length=config.max_position_embeddings)


def write_weights(
    directory: Path,
    config: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
) -> None:
    """Stream tensors, in the order `shapes` lists them, into directory/model.safetensors, or above
    SHARD_BYTES into shards and their index (model.safetensors.index.json), as the hub ships them.

    Each tensor is stored as `dtypes[name]` (F32, F16 or BF16; F32 when not given), exactly when its values
    are of that dtype, so that an import keeps its source's bits. The names and shapes are checked against
    the config first; the headers are computed from the shapes, each tensor is then written and dropped, so
    memory holds one tensor, whatever the model's size. Each file is written to a temporary name and renamed
    when complete; the index comes last.
    """
    check_shapes(config, shapes, str(directory))
    stored = {name: (dtypes or {}).get(name, "F32") for name in shapes}
    if unknown := {d for d in stored.values() if d not in FLOAT_DTYPES}:
        raise EdgelmError(f"cannot store weights as {', '.join(sorted(unknown))}; use F32, F16 or BF16")
    sizes = {name: math.prod(shape) * DTYPE_SIZES[stored[name]] for name, shape in shapes.items()}
    shards = _shards(sizes)
    n = len(shards)
    files = [WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    directory.mkdir(parents=True, exist_ok=True)
    for file, shard in zip(files, shards, strict=True):
        _write_file(directory / file, {name: shapes[name] for name in shard}, stored, tensors, metadata)
    if next(tensors, None) is not None:
        raise EdgelmError(f"{directory}: more tensors came than the {len(shapes)} the shapes list")
    if n == 1:
        (directory / WEIGHTS_INDEX).unlink(missing_ok=True)
        return
    weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    write_json_atomic(directory / WEIGHTS_INDEX, index)
    (directory / WEIGHTS).unlink(missing_ok=True)  # weights_path prefers the single file


def weights_dtype(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> str:
    """The torch name of the dtype that holds most of the weights, for config.json's `torch_dtype`."""
    held: dict[str, int] = {}
    for name, shape in shapes.items():
        held[dtypes[name]] = held.get(dtypes[name], 0) + math.prod(shape)
    return TORCH_DTYPE_NAMES[max(held, key=held.__getitem__)] if held else "float32"


def _shards(sizes: Mapping[str, int]) -> list[list[str]]:
    """Consecutive tensor names grouped into files of at most SHARD_BYTES (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def _write_file(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    tensors: Iterator[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None,
) -> None:
    """One safetensors file of the tensors `shapes` names, taken in that order from `tensors`."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * DTYPE_SIZES[dtypes[name]]
        header[name] = {"dtype": dtypes[name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for expected in shapes:
                name, w = next(tensors, ("(none)", np.empty(0)))
                if name != expected or tuple(w.shape) != tuple(shapes[name]):
                    raise EdgelmError(f"{path.parent}: tensor {name} {w.shape} came where {expected} was due")
                flat = w.reshape(-1)
                for start in range(0, flat.size, CONVERT_VALUES):  # converted in pieces: small temporaries
                    f.write(stored_bytes(flat[start : start + CONVERT_VALUES], dtypes[name]))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def stored_bytes(w: np.ndarray, dtype: str) -> bytes:
    """A float array as safetensors stores `dtype` (F32, F16, BF16: rounded to nearest even, as torch does),
    little-endian; exact for values of that dtype."""
    if dtype == "F16":
        return np.ascontiguousarray(w, dtype="<f2").tobytes()
    if dtype == "F32":
        return np.ascontiguousarray(w, dtype="<f4").tobytes()
    return bfloat16_bits(w).tobytes()


def bfloat16_bits(w: np.ndarray) -> np.ndarray:
    """Finite float values as bfloat16 bit patterns (little-endian uint16), rounded to nearest even as torch
    rounds them; converted CONVERT_VALUES at a time."""
    values = np.ascontiguousarray(w, dtype="<f4").reshape(-1)
    out = np.empty(values.size, "<u2")
    for start in range(0, values.size, CONVERT_VALUES):
        bits = values[start : start + CONVERT_VALUES].view("<u4")
        out[start : start + CONVERT_VALUES] = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return out.reshape(np.shape(w))


def write_generation_config(directory: Path, config: ModelConfig, max_length: int | None = None) -> None:
    """Write generation_config.json: the BOS id and the EOS id (or list), and `max_length` if given."""
    eos = config.eos_token_ids
    settings: dict[str, object] = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else list(eos),
    }
    if max_length is not None:
        settings["max_length"] = max_length
    write_json_atomic(Path(directory) / "generation_config.json", settings)


def load_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Read and validate a checkpoint directory: its config, float32 weights by HF name, and tokenizer.

    Names and shapes are checked against config.json before any tensor is read.
    """
    config, entries = checked_entries(directory)
    return config, dict(read_entries(entries)), Tokenizer.load(directory)


def checked_entries(directory: Path) -> tuple[ModelConfig, list[TensorEntry]]:
    """A checkpoint directory's config and the weights it implies, checked against it, in `model_order`;
    nothing is read but the headers (`read_entries` then gives the tensors one at a time)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgelmError(f"{directory}: not a checkpoint directory")
    config = ModelConfig.load(directory)
    entries = weight_entries(directory)
    check_shapes(config, {e.name: e.shape for e in entries}, str(weights_path(directory)))
    expected = tensor_shapes(config)  # without a tied head that some writers store twice
    return config, model_order(e for e in entries if e.name in expected)


def weight_files(directory: Path) -> list[Path]:
    """A checkpoint's weight files: model.safetensors, or the shards' index and then its shards, sorted."""
    weights = weights_path(directory)
    if weights.name != WEIGHTS_INDEX:
        return [weights]
    return [
        weights,
        *sorted({Path(directory) / shard for shard in read_json(weights)["weight_map"].values()}),
    ]


def weights_path(directory: Path) -> Path:
    """The file that holds or lists a checkpoint's weights: model.safetensors, else the shards' index."""
    directory = Path(directory)
    for name in (WEIGHTS, WEIGHTS_INDEX):  # transformers prefers the single file too
        if (directory / name).is_file():
            return directory / name
    hint = ""
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        hint = (
            "; edgelm never unpickles .bin/.pt weights: re-save them as safetensors, e.g. "
            "transformers' model.save_pretrained(folder)"
        )
    raise EdgelmError(f"{directory}: no {WEIGHTS} or {WEIGHTS_INDEX} (the weights are missing){hint}")


def weight_entries(directory: Path) -> list[TensorEntry]:
    """Every weight tensor of a checkpoint directory, its one file or all its shards, validated and in
    reading order; known buffers like `rotary_emb.inv_freq` are left out."""
    path = weights_path(directory)
    entries = shard_entries(path) if path.name == WEIGHTS_INDEX else read_header(path)[0]
    return float_weights(entries)


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each weight of a checkpoint directory, read from the headers alone."""
    return {e.name: e.shape for e in weight_entries(directory)}


def iter_weights(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for each weight of a checkpoint directory, one tensor in memory at a time.

    Every header (and, for a sharded checkpoint, every shard) is validated when this is called, before
    the first tensor is read, so a broken checkpoint fails before a conversion writes anything.
    """
    return read_entries(weight_entries(directory))


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    return read_header(Path(path))[1]


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header: its tensors in file order, and its string metadata.

    Layout: an 8-byte little-endian header length, the JSON header
    ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data,
    offsets counted from its start. Every range must lie inside the file and match its shape and dtype, and
    the ranges must follow each other without gaps or overlaps to the file's end, as safetensors requires.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise unreadable(path, f"{size} bytes, too short for the header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise unreadable(path, f"a header of {length} bytes does not fit in the {size}-byte file")
            raw = f.read(length)
    except FileNotFoundError:
        raise EdgelmError(f"{path}: not found (a checkpoint keeps its weights in {WEIGHTS})") from None
    except OSError as e:
        raise unreadable(path, str(e)) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unreadable(path, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise unreadable(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise unreadable(path, "__metadata__ is not a map of strings")
    entries = sorted(
        (header_entry(path, name, info, 8 + length, size) for name, info in header.items()),
        key=lambda e: (e.start, e.end),
    )
    place, previous = 8 + length, "the header"  # as safetensors reads: data end to end, to the file's end
    for entry in entries:
        if entry.start < place:
            raise unreadable(path, f"the data of {previous} and {entry.name} overlap")
        if entry.start > place:
            raise unreadable(path, f"{entry.start - place} bytes lie between {previous} and {entry.name}")
        place, previous = entry.end, entry.name
    if place != size:
        raise unreadable(path, f"{size - place} bytes follow the last tensor's data")
    return entries, metadata


def header_entry(path: Path, name: str, info: object, data_start: int, file_size: int) -> TensorEntry:
    """Validate one tensor's header entry and place it in the file."""
    if not isinstance(info, dict):
        raise unreadable(path, f"the header entry of {name} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise unreadable(path, f"{name} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        raise unreadable(path, f"{name} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(n) for n in offsets)):
        raise unreadable(path, f"{name} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= file_size - data_start:
        raise unreadable(path, f"the data of {name}, bytes {begin}..{end}, lie outside the file")
    needed = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != needed:
        raise unreadable(path, f"{name} holds {end - begin} bytes, not the {needed} of {dtype} {shape}")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def shard_entries(index: Path) -> list[TensorEntry]:
    """The tensors that a `model.safetensors.index.json` places in its shards, shard by shard."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EdgelmError(f"{index}: no weight_map of tensor names to shard files")
    entries: list[TensorEntry] = []
    for shard in sorted(set(weight_map.values())):
        names = [name for name, file in weight_map.items() if file == shard]
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise EdgelmError(f"{index}: shard {shard!r} is not a file name in the checkpoint folder")
        path = index.parent / shard
        if not path.is_file():
            raise EdgelmError(
                f"{index}: shard {shard} is missing (it holds {names[0]} and {len(names) - 1} more "
                "tensors); download every file that the index lists"
            )
        found = {e.name: e for e in read_header(path)[0]}
        absent = [name for name in names if name not in found]
        if absent:
            raise EdgelmError(f"{path}: {absent[0]} is missing, though {index.name} places it in this shard")
        entries += sorted((found[name] for name in names), key=lambda e: e.start)
    return entries


def float_weights(entries: list[TensorEntry]) -> list[TensorEntry]:
    """Drop known harmless buffers; refuse tensors that are not F32, F16 or BF16."""
    kept = [e for e in entries if not e.name.endswith(IGNORED_BUFFERS)]
    for e in kept:
        if e.dtype not in FLOAT_DTYPES:
            raise EdgelmError(
                f"{e.path}: {e.name} is stored as {e.dtype}; edgelm reads F32, F16 and BF16 weights "
                "(a quantized checkpoint needs its unquantized original)"
            )
    return kept


def read_entries(entries: Iterable[TensorEntry]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for each entry, opening each file once for its consecutive entries."""
    for path, group in itertools.groupby(entries, key=lambda e: e.path):
        with open(path, "rb") as f:
            for entry in group:
                yield entry.name, read_tensor(f, entry)


def model_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The entries in the order the model computes: the embeddings, then layer 0, 1, ... (each layer's
    tensors as the file has them), then the rest. Files that transformers writes list their tensors by
    name (layers 0, 1, 10, 11, ..., 2), which would have a layer-by-layer calibration start over."""

    def rank(entry: TensorEntry) -> tuple[int, int]:
        parts = entry.name.split(".")
        if entry.name.startswith("model.embed_tokens."):
            return (0, 0)
        if entry.name.startswith("model.layers.") and parts[2].isdigit():
            return (1, int(parts[2]))
        return (2, 0)

    return sorted(entries, key=rank)  # stable: file order within each rank


def tensor_reader(entries: Iterable[TensorEntry]) -> Callable[[str], np.ndarray]:
    """A function that reads one of the entries' tensors by name, as float32, when called: nothing is kept,
    so a caller that asks for each tensor when it needs it holds one at a time."""
    by_name = {entry.name: entry for entry in entries}

    def read(name: str) -> np.ndarray:
        entry = by_name[name]
        with open(entry.path, "rb") as f:
            return read_tensor(f, entry)

    return read


def row_reader(entries: Iterable[TensorEntry]) -> Callable[[str, np.ndarray], np.ndarray]:
    """A function that reads some rows of one of the entries' matrices by name, as float32: only those
    rows' bytes (an embedding table's rows for a few thousand tokens, not the table)."""
    by_name = {entry.name: entry for entry in entries}

    def read(name: str, rows: np.ndarray) -> np.ndarray:
        entry = by_name[name]
        with open(entry.path, "rb") as f:
            return read_rows(f, entry, rows)

    return read


def read_rows(f: BinaryIO, entry: TensorEntry, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (ids into the first axis, in their order, repeats allowed) of a tensor from its open
    file, as float32 (len(rows), *shape[1:])."""
    wanted = np.unique(rows)
    if wanted.size and not 0 <= wanted[0] <= wanted[-1] < entry.shape[0]:
        raise EdgelmError(
            f"rows {int(wanted[0])}..{int(wanted[-1])} of {entry.name}: it has {entry.shape[0]}"
        )
    stored = np.empty((wanted.size, *entry.shape[1:]), FLOAT_DTYPES[entry.dtype])
    row_bytes = stored[0].nbytes if wanted.size else 0
    for i, row in enumerate(wanted.tolist()):
        f.seek(entry.start + row * row_bytes)
        _read_into(f, stored[i], entry)
    out = np.empty(stored.shape, np.float32)
    _widen_into(stored.reshape(-1), out.reshape(-1), entry.dtype)
    check_finite(out, entry.name, str(entry.path))
    return out[np.searchsorted(wanted, rows)]


def read_tensor(f: BinaryIO, entry: TensorEntry) -> np.ndarray:
    """One tensor from its open file as float32. A 16-bit tensor is read and widened CONVERT_VALUES values
    at a time, so that it costs its float32 size in memory, not both sizes (BF16: its 16 bits put on top
    of 32)."""
    out = np.empty(entry.shape, np.float32)
    flat = out.reshape(-1)
    f.seek(entry.start)
    if entry.dtype == "F32":
        _read_into(f, flat, entry)
    else:
        piece = np.empty(min(CONVERT_VALUES, flat.size), FLOAT_DTYPES[entry.dtype])
        for start in range(0, flat.size, CONVERT_VALUES):
            stored, target = piece[: flat.size - start], flat[start : start + CONVERT_VALUES]
            _read_into(f, stored, entry)
            _widen_into(stored, target, entry.dtype)
    check_finite(out, entry.name, str(entry.path))
    return out


def _widen_into(stored: np.ndarray, target: np.ndarray, dtype: str) -> None:
    """Stored values of a safetensors dtype (BF16 as its uint16 bits) into a float32 array of their size."""
    if dtype == "BF16":
        bits = target.view(np.uint32)
        bits[:] = stored
        bits <<= 16
    else:
        target[:] = stored


def _read_into(f: BinaryIO, array: np.ndarray, entry: TensorEntry) -> None:
    """Fill a contiguous array from the file's next bytes, or refuse a file that ends first."""
    view = memoryview(array).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    if f.readinto(view) != array.nbytes:  # type: ignore[attr-defined]  # every binary file has it
        raise unreadable(entry.path, f"the file ended inside {entry.name}")


def check_finite(w: np.ndarray, name: str, where: str) -> None:
    """Refuse a tensor that holds NaN or an infinity (damaged weights, which would give NaN logits):
    checked through its float64 sum, one pass without a temporary the size of the tensor."""
    if not math.isfinite(float(w.sum(dtype=np.float64))):
        raise EdgelmError(f"{where}: tensor {name} holds NaN or infinite values; the weights are damaged")


def is_count(value: object) -> bool:
    """A non-negative integer that is not a bool (JSON true would pass isinstance(int))."""
    return is_int(value) and cast(int, value) >= 0


def unreadable(path: Path, reason: str) -> EdgelmError:
    """The error for a file that is not valid safetensors."""
    return EdgelmError(
        f"{path}: cannot be read as safetensors ({reason}); the file may be truncated or corrupt, "
        "re-create or re-download it"
    )


def check_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse weight names or shapes that do not match the config, naming the first few problems.

    A tied head stored beside the embeddings (some writers do) is accepted and ignored.
    """
    expected = tensor_shapes(config)
    problems = [f"missing {n}" for n in expected if n not in shapes]
    problems += [
        f"unexpected {n}"
        for n in shapes
        if n not in expected and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    problems += [
        f"{n} has shape {tuple(shape)}, config.json implies {expected[n]}"
        for n, shape in shapes.items()
        if n in expected and tuple(shape) != expected[n]
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise EdgelmError(f"{where}: weights do not match config.json: {'; '.join(problems[:3])}{more}")


def checkpoint_sha256(directory: Path) -> str:
    """A hash of what makes the model: config.json, the weights (each shard) and tokenizer.json."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in (directory / "config.json", *weight_files(directory), directory / "tokenizer.json"):
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
