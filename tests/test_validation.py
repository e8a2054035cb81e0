"""Nothing gets past the door: a damaged artifact, fed to each command that reads it, gives one line on
stderr and exit status 1, writes nothing, and is refused before any work sized by what it claims."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_checkpoint

from edgelm.cli import main
from edgelm.export.gguf import export_gguf
from edgelm.tokenizer import Tokenizer

# a command line for each command that reads a model: MODEL and OUT are filled in
COMMANDS = {
    "info": ["info", "MODEL"],
    "generate": ["generate", "MODEL", "--prompt", "x", "--max-new-tokens", "2"],
    "import": ["import", "MODEL", "--out", "OUT"],
    "export-gguf": ["export", "gguf", "MODEL", "--quant", "q8_0", "--out", "OUT"],
    "export-onnx": ["export", "onnx", "MODEL", "--quant", "fp32", "--out", "OUT"],
}
# config.json keys set to what a careless or hostile file holds
CONFIG_DAMAGE: dict[str, dict[str, Any]] = {
    "eps-string": {"rms_norm_eps": "abc"},
    "theta-string": {"rope_theta": "10000"},
    "eos-strings": {"eos_token_id": ["a"]},
    "rope-factor-string": {"rope_scaling": {"rope_type": "linear", "factor": "2"}},
    "rope-scaling-list": {"rope_scaling": [1, 2]},
    "ten-million-layers": {"num_hidden_layers": 10**7},
    "a-billion-layers": {"num_hidden_layers": 10**9},
    "context-10^12": {"max_position_embeddings": 10**12},
    "float-bos": {"bos_token_id": 0.5},
    "bias-string": {"attention_bias": "false"},
    "model-type-list": {"model_type": ["llama"]},
    "architectures-object": {"architectures": [{"a": 1}]},
    "window-layers-string": {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": "2"},
    "no-heads": {"num_attention_heads": 0, "head_dim": None},  # head_dim derived: no division by zero
    "hidden-string": {"hidden_size": "64", "head_dim": None},
}
# GGUF metadata keys set to another type or past what llama.cpp builds: (value, gguf-py value type name)
GGUF_DAMAGE: dict[str, dict[str, tuple[Any, str]]] = {
    "head-count-string": {"llama.attention.head_count": ("4", "STRING")},
    "block-count-513": {"llama.block_count": (513, "UINT32")},
    "block-count-10^9": {"llama.block_count": (10**9, "UINT32")},
    "context-2^63": {"llama.context_length": (2**63, "UINT64")},
    "head-dim-zero": {"llama.attention.key_length": (0, "UINT32")},
}


def run(args: list[str], model: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command line in this process; its stderr, after asserting exit status 1 and one line."""
    argv = [str(model) if a == "MODEL" else str(out) if a == "OUT" else a for a in args]
    assert main(argv) == 1, argv
    stderr = capsys.readouterr().err
    assert stderr.startswith("edgelm: error: ") and stderr.count("\n") == 1, stderr
    return stderr


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_damaged_config_json_is_refused_by_every_command(
    tmp_path: Path, small_tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str], damage: str, command: str
) -> None:
    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer)
    path = checkpoint / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | CONFIG_DAMAGE[damage]))
    stderr = run(COMMANDS[command], checkpoint, tmp_path / "out", capsys)
    assert "config.json" in stderr or "config:" in stderr
    assert not (tmp_path / "out").exists()


def rewritten_gguf(source: Path, dest: Path, changes: dict[str, tuple[Any, str]]) -> Path:
    """A copy of an F32 GGUF file (gguf-py reads and writes it) with metadata keys set to other values."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, str(reader.get_field("general.architecture").contents()))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in changes:
            value, kind = changes[name]
            writer.add_key_value(name, value, gguf.GGUFValueType[kind])
        else:
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    return export_gguf(make_checkpoint(root / "model", small_tokenizer), root / "model.gguf", "f32")


def test_the_gguf_rewriter_keeps_a_file_that_loads(
    f32_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The damage below is in the one key it changes: the rewritten file itself imports."""
    copy = rewritten_gguf(f32_gguf, tmp_path / "copy.gguf", {})
    assert main(["import", str(copy), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("command", ["info", "generate", "import"])
@pytest.mark.parametrize("damage", GGUF_DAMAGE)
def test_damaged_gguf_metadata_is_refused_by_every_command(
    f32_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, command: str
) -> None:
    damaged = rewritten_gguf(f32_gguf, tmp_path / "damaged.gguf", GGUF_DAMAGE[damage])
    run(COMMANDS[command], damaged, tmp_path / "out", capsys)
    assert not (tmp_path / "out").exists()


def damage_weights(checkpoint: Path, how: str) -> None:
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    if how == "missing":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "shape":  # a config.json of another width
        config = checkpoint / "config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | {"intermediate_size": 64}))
    elif how == "tokenizer":
        (checkpoint / "tokenizer.json").write_text("{not json")


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage", "shape", "tokenizer"])
def test_info_checks_the_checkpoint_it_describes(
    tmp_path: Path, small_tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """`info` is what a user runs before shipping a file: weights missing, truncated, garbage or of
    another shape than config.json says, or a tokenizer that does not parse, are errors, not a summary."""
    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer)
    assert main(["info", str(checkpoint)]) == 0
    capsys.readouterr()
    damage_weights(checkpoint, how)
    run(COMMANDS["info"], checkpoint, tmp_path / "out", capsys)


def reshaped_safetensors(weights: Path, how: str) -> None:
    """The file with 64 bytes between its header and its data ("gap", every offset moved past them) or
    after its data ("trailing")."""
    import struct

    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header, tensors = json.loads(data[8 : 8 + length]), data[8 + length :]
    if how == "trailing":
        weights.write_bytes(data + bytes(64))
        return
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [offset + 64 for offset in entry["data_offsets"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64) + tensors)


@pytest.mark.parametrize("command", ["info", "generate", "export-gguf", "export-onnx"])
@pytest.mark.parametrize("how", ["gap", "trailing"])
def test_safetensors_that_safetensors_refuses_are_refused(
    tmp_path: Path, small_tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str], how: str, command: str
) -> None:
    """safetensors packs the tensors end to end from the header to the file's end; its own reader refuses
    a file with bytes between or after them, and so does every command."""
    from safetensors.numpy import load_file

    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer)
    reshaped_safetensors(checkpoint / "model.safetensors", how)
    with pytest.raises(Exception, match=r"(?i)offset|incomplete"):
        load_file(checkpoint / "model.safetensors")
    stderr = run(COMMANDS[command], checkpoint, tmp_path / "out", capsys)
    assert "64 bytes" in stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    from edgelm.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return export_onnx(make_checkpoint(root / "model", small_tokenizer), root / "onnx", "fp32")


def damage_onnx(folder: Path, how: str) -> None:
    import onnx

    graph = folder / "model.onnx"
    config = folder / "config.json"
    if how == "no-model-onnx":
        graph.unlink()
    elif how == "garbage":
        graph.write_bytes(np.random.default_rng(0).bytes(graph.stat().st_size))
    elif how == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif how in ("opset-999", "ir-99"):
        model = onnx.load(str(graph), load_external_data=False)
        if how == "opset-999":
            model.opset_import[0].version = 999
        else:
            model.ir_version = 99
        onnx.save(model, str(graph))
    elif how in ("offset-not-a-count", "overlapping"):
        model = onnx.load(str(graph), load_external_data=False)
        first, second = model.graph.initializer[:2]
        place = {e.key: e for e in first.external_data}
        if how == "offset-not-a-count":
            place["offset"].value = "abc"
        else:  # the second tensor's bytes start inside the first's
            second_place = {e.key: e for e in second.external_data}
            second_place["offset"].value = str(
                int(place.get("offset", "0").value if "offset" in place else 0)
            )
        onnx.save(model, str(graph))
    else:  # config.json of another model
        change = {"heads": {"num_key_value_heads": 4}, "context": {"max_position_embeddings": 4096}}[how]
        config.write_text(json.dumps(json.loads(config.read_text()) | change))


@pytest.mark.parametrize(
    "how",
    [
        "no-model-onnx",
        "garbage",
        "truncated",
        "opset-999",
        "ir-99",
        "offset-not-a-count",
        "overlapping",
        "heads",
        "context",
    ],
)
@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_damaged_onnx_folder_is_refused(
    onnx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, command: str
) -> None:
    import shutil

    folder = shutil.copytree(onnx_folder, tmp_path / "onnx")
    damage_onnx(folder, how)
    run(COMMANDS[command], folder, tmp_path / "out", capsys)
    assert capsys.readouterr().out == ""  # refused before any text


@pytest.mark.parametrize("command", ["generate", "import", "export-gguf", "export-onnx"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_weights_that_are_not_finite_are_refused_where_they_are_read(
    tmp_path: Path, small_tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str], value: float, command: str
) -> None:
    from safetensors.numpy import load_file, save_file

    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer)
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, checkpoint / "model.safetensors")
    stderr = run(COMMANDS[command], checkpoint, tmp_path / "out", capsys)
    assert "model.layers.1.mlp.down_proj.weight holds NaN or infinite values" in stderr
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_with_nan_weights_does_not_import(
    f32_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gguf

    damaged = tmp_path / "nan.gguf"
    damaged.write_bytes(f32_gguf.read_bytes())
    tensor = next(t for t in gguf.GGUFReader(damaged, "r+").tensors if t.name == "blk.0.ffn_up.weight")
    tensor.data[0, 0] = np.nan  # in place, in the file's memory map
    del tensor
    stderr = run(COMMANDS["import"], damaged, tmp_path / "out", capsys)
    assert "holds NaN or infinite values" in stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_a_config_json_that_is_a_fifo_is_not_waited_on(
    tmp_path: Path, small_tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    import os
    import threading

    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer)
    (checkpoint / "config.json").unlink()
    os.mkfifo(checkpoint / "config.json")

    def unblock() -> None:  # should the command open the FIFO, it gets "{}" after a while, not a hang
        with open(checkpoint / "config.json", "w") as fifo:
            fifo.write("{}")

    timer = threading.Timer(10.0, unblock)
    timer.daemon = True
    timer.start()
    assert "not a regular file" in run(COMMANDS[command], checkpoint, tmp_path / "out", capsys)


def test_what_transformers_reads_as_absent_is_accepted(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """The checks refuse wrong types, not the nulls transformers' own configs hold."""
    from edgelm.model.config import ModelConfig

    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer)
    data = json.loads((checkpoint / "config.json").read_text())
    config = ModelConfig.from_hf_dict(data | {"attention_bias": None, "sliding_window": None})
    assert config == ModelConfig.load(checkpoint)


def test_external_data_inside_a_subgraph_is_checked_too(onnx_folder: Path, tmp_path: Path) -> None:
    """An If's branch may hold initializers (edgelm's LongRoPE graph has one): a tensor there pointing
    outside the folder is refused like one at the top."""
    import onnx
    from onnx import TensorProto, helper

    from edgelm.errors import EdgelmError
    from edgelm.formats.onnx import check_external_data

    model = onnx.load(str(onnx_folder / "model.onnx"), load_external_data=False)
    hidden = helper.make_tensor("stolen", TensorProto.FLOAT, [4], bytes(16), raw=True)
    onnx.external_data_helper.set_external_data(hidden, "../../etc/passwd", 0, 16)
    hidden.ClearField("raw_data")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph([helper.make_node("Identity", ["stolen"], ["y"])], "b", [], [out], [hidden])
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    with pytest.raises(EdgelmError, match="points to data outside the folder"):
        check_external_data(onnx_folder, model)


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("genai_config.json", {"num_hidden_layers": 3}, "disagree with model.onnx"),
        ("genai_config.json", {"filename": "other.onnx"}, "disagree with model.onnx"),
        ("genai_config.json", {"outputs": {"logits": "logit"}}, "which the graph does not have"),
        ("genai_config.json", {"inputs": {"past_key_names": "past.%d.key"}}, "which the graph does not have"),
        ("edgelm.json", {"quantization": [4]}, "not edgelm's record"),
    ],
)
def test_info_checks_what_genai_and_edgelm_json_say(
    onnx_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file: str,
    change: dict[str, Any],
    message: str,
) -> None:
    """onnxruntime-genai runs the folder by genai_config.json: a decoder of another shape, or names the
    graph does not have, fail there; `info` says so first."""
    import shutil

    folder = shutil.copytree(onnx_folder, tmp_path / "onnx")
    data = json.loads((folder / file).read_text())
    if file == "genai_config.json":
        data["model"]["decoder"] |= change
    else:
        data |= change
    (folder / file).write_text(json.dumps(data))
    assert message in run(COMMANDS["info"], folder, tmp_path / "out", capsys)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("gguf", ".model.f32.tmp.gguf"),  # export gguf --via llama.cpp's F32 file, complete
        ("gguf", ".model.gguf.tmp"),  # export gguf's own file, complete but not yet renamed
        ("onnx", ".onnx.tmp"),  # export onnx's folder, complete but not yet renamed
    ],
)
@pytest.mark.parametrize("command", ["info", "generate", "import"])
def test_what_a_killed_export_left_is_never_an_artifact(
    f32_gguf: Path,
    onnx_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    name: str,
    command: str,
) -> None:
    """kill -9 can stop an export after its temporary output is complete and before the rename: what it
    left loads as nothing, whichever command is given it."""
    import shutil

    left = tmp_path / name
    if kind == "gguf":
        shutil.copy(f32_gguf, left)
    else:
        shutil.copytree(onnx_folder, left)
    stderr = run(COMMANDS[command], left, tmp_path / "out", capsys)
    assert "interrupted edgelm run" in stderr
    assert not (tmp_path / "out").exists()
