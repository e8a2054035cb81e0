"""Bad checkpoints fail with one clear error, and `import edgelm` stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.checkpoint import load_checkpoint
from edgelm.errors import EdgelmError
from edgelm.model.config import PRESETS, ModelConfig


def test_missing_and_corrupt_config(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text('{"vocab_size": 10,')
    with pytest.raises(EdgelmError, match=r"config.json: invalid JSON at line 1"):
        load_checkpoint(checkpoint)
    (checkpoint / "config.json").unlink()
    with pytest.raises(EdgelmError, match="neither a checkpoint"):
        edgelm.load(checkpoint)
    with pytest.raises(EdgelmError, match=r"config\.json: not found"):
        load_checkpoint(checkpoint)


def test_config_that_does_not_match_the_weights(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(EdgelmError, match=r"missing model\.layers\.2"):
        load_checkpoint(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(EdgelmError, match="num_key_value_heads=3 does not divide num_attention_heads=4"):
        load_checkpoint(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(EdgelmError, match="model_type='gpt2' is not supported"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_safetensors(checkpoint: Path, keep: int) -> None:
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(EdgelmError, match="cannot be read as safetensors"):
        load_checkpoint(checkpoint)


def test_config_validation() -> None:
    with pytest.raises(EdgelmError, match="head_dim=7 must be even"):
        ModelConfig(head_dim=7)
    with pytest.raises(EdgelmError, match="hidden_size=0"):
        ModelConfig(hidden_size=0)
    with pytest.raises(EdgelmError, match="outside the vocabulary"):
        ModelConfig(vocab_size=100, eos_token_id=(1, 200))
    with pytest.raises(EdgelmError, match="required key 'hidden_size'"):
        ModelConfig.from_hf_dict({"vocab_size": 10})
    config = ModelConfig(eos_token_id=(1, 2))
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_preset_sizes() -> None:
    millions = {name: config.num_parameters / 1e6 for name, config in PRESETS.items()}
    assert 1 <= millions["tiny"] <= 3 and 15 <= millions["small"] <= 30 and 80 <= millions["base"] <= 120


def test_import_edgelm_imports_no_engine() -> None:
    code = "import sys, edgelm; print(sorted({'torch', 'onnxruntime', 'llama_cpp'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_weight_files_of_a_sharded_checkpoint_feed_its_size_and_hash(checkpoint: Path) -> None:
    from edgelm.checkpoint import WEIGHTS_INDEX, checkpoint_sha256, weight_files
    from edgelm.evaluation.check import artifact_size

    assert weight_files(checkpoint) == [checkpoint / "model.safetensors"]
    single_hash = checkpoint_sha256(checkpoint)
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "b.safetensors").write_bytes(data[: len(data) // 2])
    (checkpoint / "a.safetensors").write_bytes(data[len(data) // 2 :])
    index = {"metadata": {}, "weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}
    (checkpoint / WEIGHTS_INDEX).write_text(json.dumps(index))
    files = weight_files(checkpoint)
    assert files == [checkpoint / WEIGHTS_INDEX, checkpoint / "a.safetensors", checkpoint / "b.safetensors"]
    jsons = sum(p.stat().st_size for p in checkpoint.glob("*.json"))
    assert artifact_size(checkpoint) == jsons + len(data)
    assert checkpoint_sha256(checkpoint) != single_hash


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_weights_stored_in_half_precision_round_as_torch_does(checkpoint: Path, dtype: str) -> None:
    """Any finite float32 value becomes the half-precision value torch's own conversion gives (BF16:
    nearest, ties to even; F16 overflowing to infinity); infinities and NaN are refused (test_validation)."""
    import torch
    from safetensors.torch import load_file

    from edgelm.checkpoint import write_weights

    config, tensors, _ = load_checkpoint(checkpoint)
    name = "model.layers.0.mlp.up_proj.weight"
    w = tensors[name].copy()
    w.flat[:4] = [1 + 2**-8, 1 + 3 * 2**-8, -(2**-140), 3e38]  # ties, a subnormal, F16's overflow
    tensors[name] = w
    write_weights(
        checkpoint,
        config,
        {k: v.shape for k, v in tensors.items()},
        iter(tensors.items()),
        None,
        dict.fromkeys(tensors, dtype),
    )
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    stored = load_file(checkpoint / "model.safetensors")
    for key, value in tensors.items():
        assert stored[key].dtype == torch_dtype and torch.equal(
            stored[key], torch.from_numpy(value).to(torch_dtype)
        ), key
    with pytest.raises(EdgelmError, match="cannot store weights as F64"):
        write_weights(
            checkpoint,
            config,
            {k: v.shape for k, v in tensors.items()},
            iter(tensors.items()),
            None,
            dict.fromkeys(tensors, "F64"),
        )


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_rows_read_alone_are_the_tables_rows(checkpoint: Path, dtype: str) -> None:
    """`row_reader` reads only some rows of a matrix (calibration's embeddings): the values safetensors'
    own reader gives for them, in the order asked, repeats too; rows past the table are refused."""
    import torch
    from safetensors.torch import load_file

    from edgelm.checkpoint import row_reader, weight_entries, write_weights

    config, tensors, _ = load_checkpoint(checkpoint)
    shapes = {k: v.shape for k, v in tensors.items()}
    write_weights(checkpoint, config, shapes, iter(tensors.items()), None, dict.fromkeys(tensors, dtype))
    read = row_reader(weight_entries(checkpoint))
    name = "model.embed_tokens.weight"
    table = load_file(checkpoint / "model.safetensors")[name].to(torch.float32).numpy()
    last = table.shape[0] - 1
    rows = np.array([5, 0, last, 5, 17, 17, 3])
    assert np.array_equal(read(name, rows), table[rows])
    assert read(name, np.array([], np.int64)).shape == (0, config.hidden_size)
    with pytest.raises(EdgelmError, match=f"it has {last + 1}"):
        read(name, np.array([1, last + 1]))
