"""The files of an ONNX folder, named once for the exporters, the runtime, `info` and the evaluation, and
the checks that a folder is what its config.json says before ONNX Runtime reads any of it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError, missing_dependency
from edgelm.files import read_json
from edgelm.model.config import ModelConfig

if TYPE_CHECKING:
    import onnx

MODEL_FILE = "model.onnx"  # the graph
DATA_FILE = "model.onnx.data"  # every weight, as external data (no 2 GiB protobuf limit)
GENAI_CONFIG = "genai_config.json"  # what onnxruntime-genai reads to run the folder
PROVENANCE = "edgelm.json"  # the source checkpoint's hash, the quantization, opsets, tool versions


def read_onnx_folder(folder: Path) -> tuple[ModelConfig, onnx.ModelProto]:
    """An ONNX folder's config and its graph without the weights, checked: model.onnx parses, is of an
    opset this onnx knows and passes ONNX's checker, its external data lie inside the folder, within their
    files and apart, and the graph's cache inputs and attention agree with config.json."""
    try:
        import onnx
    except ModuleNotFoundError as e:
        raise missing_dependency("onnx", "onnx") from e
    folder = Path(folder)
    file = folder / MODEL_FILE
    if not file.is_file():
        raise EdgelmError(f"{folder}: no {MODEL_FILE} (not an ONNX folder, or an incomplete one)")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others for a damaged file
        raise EdgelmError(f"{file}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    check_external_data(folder, model)
    newest = onnx.defs.onnx_opset_version()
    if stamped := [
        o.version for o in model.opset_import if o.domain in ("", "ai.onnx") and o.version > newest
    ]:
        raise EdgelmError(f"{file}: opset {stamped[0]} is newer than the {newest} this onnx knows")
    try:  # given the path, the checker reads the graph alone: external data is only checked to exist
        onnx.checker.check_model(str(file))
    except (onnx.checker.ValidationError, UnicodeDecodeError) as e:  # the latter: a name that is not UTF-8
        raise EdgelmError(f"{file}: not a valid ONNX graph ({' '.join(str(e).split())})") from None
    config = ModelConfig.load(folder)
    check_graph_config(model, config, str(file))
    return config, model


def check_external_data(folder: Path, model: onnx.ModelProto) -> None:
    """Refuse weights stored outside the folder, missing or truncated data files, offsets that are not
    counts and ranges that overlap, before ORT reads any."""
    root = folder.resolve()
    ranges: dict[Path, list[tuple[int, int, str]]] = {}
    for tensor in _external_tensors(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        path = (root / location).resolve()
        if not location or Path(location).is_absolute() or not path.is_relative_to(root):
            raise EdgelmError(
                f"{folder / MODEL_FILE}: tensor {tensor.name!r} points to data outside the folder "
                f"({location!r}); refusing to read it"
            )
        if not path.is_file():
            raise EdgelmError(f"{folder}: external data file {location!r} (of {tensor.name!r}) is missing")
        offset, length = (info.get(key, "0") for key in ("offset", "length"))
        if not (offset.isdigit() and length.isdigit()):
            raise EdgelmError(
                f"{folder / MODEL_FILE}: tensor {tensor.name!r} has external data offset {offset!r} and "
                f"length {length!r}; both must be byte counts"
            )
        start, end = int(offset), int(offset) + int(length)
        if end > path.stat().st_size:
            raise EdgelmError(
                f"{path}: is {path.stat().st_size} bytes, but tensor {tensor.name!r} needs {end}; "
                "the file is truncated (export the model again)"
            )
        ranges.setdefault(path, []).append((start, end, tensor.name))
    for path, spans in ranges.items():
        for (_, end, first), (start, _, second) in itertools.pairwise(sorted(spans)):
            if start < end:
                raise EdgelmError(f"{path}: tensors {first!r} and {second!r} share bytes; it is damaged")


def check_graph_config(model: onnx.ModelProto, config: ModelConfig, where: str) -> None:
    """Refuse a graph whose KV-cache inputs or attention do not have config.json's layers, heads and
    head size (a config.json from another model would make ONNX Runtime fail mid-generation)."""
    inputs = {i.name: i for i in model.graph.input}
    past = [name for name in inputs if name.startswith("past_key_values.")]
    if past and len(past) != 2 * config.num_hidden_layers:
        raise EdgelmError(
            f"{where}: the graph has {len(past) // 2} layers' KV inputs, config.json says "
            f"{config.num_hidden_layers} layers"
        )
    kv, head = config.num_key_value_heads, config.head_dim
    for name in past:
        shape = inputs[name].type.tensor_type.shape.dim
        dims = [d.dim_value if d.HasField("dim_value") else None for d in shape]
        if len(dims) != 4 or dims[1] not in (None, kv) or dims[3] not in (None, head):
            raise EdgelmError(
                f"{where}: {name} has shape {dims}, config.json implies (batch, {kv}, sequence, {head})"
            )
    want = {"num_heads": config.num_attention_heads, "kv_num_heads": kv}
    rows = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        heads = {a.name: a.i for a in node.attribute if a.name in want}
        if any(heads.get(k, v) != v for k, v in want.items()):
            raise EdgelmError(f"{where}: {node.name} attends with {heads}, config.json implies {want}")
        cos = rows.get(node.input[7]) if len(node.input) > 7 else None  # None: computed (LongRoPE's If)
        if cos is not None and cos < config.max_position_embeddings:
            raise EdgelmError(
                f"{where}: the rotary tables hold {cos} positions, config.json's context is "
                f"{config.max_position_embeddings}"
            )


def read_provenance(folder: Path) -> dict[str, Any]:
    """edgelm.json, checked to hold what `info` and `check` read from it ({} in a folder edgelm did not
    make): the quant level's name, and the quantization and source as objects."""
    path = Path(folder) / PROVENANCE
    if not path.exists():
        return {}
    data = read_json(path)
    kinds = {"quant": str, "quantization": dict, "source": dict}
    if not isinstance(data, dict) or any(k in data and not isinstance(data[k], t) for k, t in kinds.items()):
        raise EdgelmError(f"{path}: not edgelm's record (quant a name; quantization, source objects)")
    return data


def check_genai_config(folder: Path, config: ModelConfig, model: onnx.ModelProto) -> None:
    """Refuse a genai_config.json (what onnxruntime-genai reads to run the folder) that does not parse,
    names another graph, gives the decoder another shape than config.json, or names inputs and outputs the
    graph does not have. A folder without one is not checked: edgelm's own runtime does not need it."""
    path = Path(folder) / GENAI_CONFIG
    if not path.exists():
        return
    data = read_json(path)
    model_entry = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model_entry, dict) or not isinstance(model_entry.get("decoder"), dict):
        raise EdgelmError(f"{path}: has no model.decoder object")
    decoder = model_entry["decoder"]
    shape = {
        "head_size": config.head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
    }
    wrong = {k: decoder.get(k) for k, v in shape.items() if decoder.get(k) != v}
    if decoder.get("filename") != MODEL_FILE or model_entry.get("vocab_size") != config.vocab_size:
        wrong |= {"filename": decoder.get("filename"), "vocab_size": model_entry.get("vocab_size")}
    if wrong:
        raise EdgelmError(f"{path}: {wrong} disagree with {MODEL_FILE} and config.json (export it again)")
    names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    for group in ("inputs", "outputs"):
        entries = decoder.get(group)
        for key, name in entries.items() if isinstance(entries, dict) else [(group, entries)]:
            bound = name % 0 if isinstance(name, str) and "%d" in name else name
            if bound not in names:
                raise EdgelmError(f"{path}: decoder {group}.{key} is {name!r}, which the graph does not have")


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored as external data, in subgraphs (an If's branches) too."""
    import onnx

    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = [*graph.initializer]
        for node in graph.node:
            for a in node.attribute:
                tensors += [a.t] if a.type == onnx.AttributeProto.TENSOR else list(a.tensors)
                graphs += [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        yield from (t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)
