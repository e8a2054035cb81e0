"""Hugging Face Llama-family folders (Llama, Mistral, Qwen2) against transformers, the oracle.

Each folder is a tiny random model that transformers builds and saves itself (float32, bf16 or fp16, one
file or several shards) beside the tokenizer; edgelm must compute the same logits from it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SMALL, LiveTensors, make_checkpoint, random_hf_model, saved_weights
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import edgelm
import edgelm.checkpoint as checkpoint_module
from edgelm.checkpoint import (
    iter_weights,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    weight_shapes,
)
from edgelm.errors import EdgelmError
from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_frequencies
from edgelm.model.rope_scaling import Llama3RopeScaling
from edgelm.tokenizer import Tokenizer

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # wavelengths 6..20k: some kept, some smoothed, most slowed
}

# name → (model_type, config keys, dtype of the saved weights, max_shard_size or None for one file)
CASES: dict[str, tuple[str, dict[str, Any], torch.dtype, str | None]] = {
    "llama-gqa-6-3-untied-f32": (
        "llama",
        {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3, "tie_word_embeddings": False},
        torch.float32,
        None,
    ),
    "llama-mqa-headdim-tied-bf16": (
        "llama",
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24},
        torch.bfloat16,
        None,
    ),
    "llama3-rope-fp16-sharded": (
        "llama",
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
        | {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 256},
        torch.float16,
        "40KB",
    ),
    "llama-attention-bias-sharded": (
        "llama",
        {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "attention_bias": True},
        torch.float32,
        "40KB",
    ),
    "mistral-gqa-9-3-bf16-sharded": (
        "mistral",
        {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "sliding_window": None},
        torch.bfloat16,
        "40KB",
    ),
    "mistral-window-tied": (
        "mistral",
        {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 24}
        | {"tie_word_embeddings": True},
        torch.float32,
        None,
    ),
    "qwen2-gqa-6-2-tied": (
        "qwen2",
        {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True},
        torch.float32,
        None,
    ),
    "qwen3-gqa-headdim-bf16-sharded": (
        "qwen3",
        {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16},
        torch.bfloat16,
        "40KB",
    ),
    "gemma2-bf16-sharded": (
        "gemma2",
        {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
        | {"query_pre_attn_scalar": 16},
        torch.bfloat16,
        "40KB",
    ),
    "gemma3-fp16-untied": (
        "gemma3_text",
        {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16}
        | {"query_pre_attn_scalar": 16, "tie_word_embeddings": False},
        torch.float16,
        None,
    ),
    "phi3-bf16-sharded": (
        "phi3",
        {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 1},
        torch.bfloat16,
        "40KB",
    ),
    "qwen2-mqa-headdim-window-fp16-sharded": (
        "qwen2",
        {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24}
        | {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
        torch.float16,
        "40KB",
    ),
}
# the sequence every case is checked on (cut to the context where a sliding window caps it)
IDS = np.random.default_rng(0).integers(0, 300, size=48)


def build_hf_folder(directory: Path, tokenizer: Tokenizer, name: str) -> Path:
    """Save a random transformers model of the case `name` with transformers' save_pretrained."""
    model_type, settings, dtype, shard = CASES[name]
    model = random_hf_model(model_type, settings, tokenizer.vocab_size, seed=sum(map(ord, name)))
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Callable[[str], Path]:
    """The saved folder of a case, built once per module; tests copy it before changing anything."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_hf_folder(tmp_path_factory.mktemp(name), small_tokenizer, name)
        return built[name]

    return get


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def hf_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' logits, computed in float32 from the saved (possibly rounded) weights."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


def edgelm_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    with edgelm.load(directory, runtime="torch", device="cpu") as model:
        return model.runtime.forward(ids.tolist(), all_logits=True)


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_transformers(hf_folder: Callable[[str], Path], name: str) -> None:
    folder = hf_folder(name)
    _, settings, _, shard = CASES[name]
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 2
    config = ModelConfig.load(folder)
    assert config.architecture == json.loads((folder / "config.json").read_text())["architectures"][0]
    assert config.head_dim == settings.get(
        "head_dim", settings["hidden_size"] // settings["num_attention_heads"]
    )
    window = settings.get("sliding_window")
    if window:  # windowed attention equals full attention up to the window: the context stops there
        assert config.max_position_embeddings == window
    ids = IDS[: config.max_position_embeddings]
    ours, theirs = edgelm_logits(folder, ids), hf_logits(folder, ids)
    assert ours.shape == theirs.shape == (len(ids), config.vocab_size)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(theirs).max() > 1.0  # the weights are not trivially small


def test_biases_and_llama3_rope_are_read(hf_folder: Callable[[str], Path]) -> None:
    bias = ModelConfig.load(hf_folder("llama-attention-bias-sharded"))
    qwen = ModelConfig.load(hf_folder("qwen2-gqa-6-2-tied"))
    mistral = ModelConfig.load(hf_folder("mistral-gqa-9-3-bf16-sharded"))
    assert (bias.qkv_bias, bias.o_bias, qwen.qkv_bias, qwen.o_bias) == (True, True, True, False)
    assert (mistral.qkv_bias, mistral.o_bias, mistral.max_position_embeddings) == (False, False, 64)
    rope = ModelConfig.load(hf_folder("llama3-rope-fp16-sharded"))
    assert rope.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64) and rope.rope_theta == 10000.0
    hf = AutoModelForCausalLM.from_pretrained(hf_folder("llama3-rope-fp16-sharded"))
    assert torch.equal(torch.from_numpy(rope_frequencies(rope)), hf.model.rotary_emb.inv_freq)
    assert not torch.equal(
        torch.from_numpy(rope_frequencies(ModelConfig(head_dim=16))), hf.model.rotary_emb.inv_freq
    )


@pytest.mark.parametrize(
    "name", ["llama3-rope-fp16-sharded", "llama-attention-bias-sharded", "qwen2-gqa-6-2-tied"]
)
def test_kv_cache_decoding_equals_full_forward(hf_folder: Callable[[str], Path], name: str) -> None:
    ids = IDS[:40].tolist()
    with edgelm.load(hf_folder(name), device="cpu") as model:
        rt = model.runtime
        full = rt.forward(ids, all_logits=True)
        rt.reset()
        pieces = [rt.forward(ids[:13], all_logits=True), rt.forward(ids[13:25], all_logits=True)]
        pieces += [rt.forward([t], all_logits=True) for t in ids[25:]]
    assert np.abs(np.concatenate(pieces) - full).max() <= 1e-5


def test_context_stops_at_the_sliding_window(hf_folder: Callable[[str], Path]) -> None:
    with edgelm.load(hf_folder("qwen2-mqa-headdim-window-fp16-sharded"), device="cpu") as model:
        model.runtime.forward(IDS[:24].tolist())
        with pytest.raises(EdgelmError, match="context of 24"):
            model.runtime.forward([5])


@pytest.mark.parametrize(
    "name",
    [
        "llama-mqa-headdim-tied-bf16",
        "llama3-rope-fp16-sharded",
        "llama-attention-bias-sharded",
        "mistral-gqa-9-3-bf16-sharded",
        "mistral-window-tied",
        "qwen2-mqa-headdim-window-fp16-sharded",
        "qwen3-gqa-headdim-bf16-sharded",
        "gemma2-bf16-sharded",
        "gemma3-fp16-untied",
        "phi3-bf16-sharded",
    ],
)
def test_resaved_checkpoint_loads_in_transformers(
    hf_folder: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    config, tensors, tokenizer = load_checkpoint(hf_folder(name))
    save_checkpoint(tmp_path, config, tensors, tokenizer)
    assert ModelConfig.load(tmp_path) == config
    # transformers types the result as the model alone, not the (model, info) of output_loading_info
    loaded: tuple[Any, dict[str, Any]] = AutoModelForCausalLM.from_pretrained(  # type: ignore[assignment]
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    hf, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf).__name__ == config.architecture
    ids = IDS[: config.max_position_embeddings]
    with torch.no_grad():
        resaved = hf.eval()(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(resaved - hf_logits(hf_folder(name), ids)).max() <= 1e-5


def test_both_rope_spellings_read_the_same() -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    v5 = ModelConfig.from_hf_dict({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    legacy = ModelConfig.from_hf_dict(
        {**base, "rope_theta": 5e5, "rope_scaling": {**scaling, "type": "llama3"}}
    )
    assert v4 == v5 == legacy and v4.rope_theta == 5e5
    assert v4.rope_scaling is not None and v4.rope_scaling.factor == 8.0
    written = v4.to_hf_dict()
    assert written["rope_theta"] == 5e5 and written["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in written and ModelConfig.from_hf_dict(written) == v4
    without_original = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    default = ModelConfig.from_hf_dict({**base, "rope_scaling": without_original})
    assert default.rope_scaling is not None
    assert default.rope_scaling.original_max_position_embeddings == 128  # transformers' fallback


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_missing_keys_take_transformers_defaults(model_type: str) -> None:
    minimal = {
        "vocab_size": 100,
        "hidden_size": 128,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
    }
    ours = ModelConfig.from_hf_dict({"model_type": model_type, **minimal})
    theirs = AutoConfig.for_model(model_type, **minimal)
    window = getattr(theirs, "sliding_window", None) or theirs.max_position_embeddings
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or 128 // 32)
    assert ours.max_position_embeddings == min(theirs.max_position_embeddings, window)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]


def test_unknown_architecture_is_named(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    config = GPT2Config(vocab_size=small_tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    small_tokenizer.save(tmp_path)
    with pytest.raises(
        EdgelmError, match=r"model_type='gpt2' .*GPT2LMHeadModel.*LlamaForCausalLM \(Llama 2/3"
    ):
        edgelm.load(tmp_path, device="cpu")
    data = json.loads((tmp_path / "config.json").read_text())
    del data["model_type"]  # old files name only the class
    with pytest.raises(EdgelmError, match=r"architecture 'GPT2LMHeadModel' is not supported.*--via optimum"):
        ModelConfig.from_hf_dict(data)


def test_missing_shard_is_named(hf_folder: Callable[[str], Path], tmp_path: Path) -> None:
    folder = copy_of(hf_folder("llama-attention-bias-sharded"), tmp_path)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(EdgelmError, match=f"shard {shards[1].name} is missing"):
        edgelm.load(folder, device="cpu")
    with pytest.raises(EdgelmError, match=f"shard {shards[1].name} is missing"):
        iter_weights(folder)  # refused when called, before the first tensor is read
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(EdgelmError, match="is not a file name in the checkpoint folder"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("rope", "named"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
        (
            {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "'dynamic'",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
            "lacks low_freq_factor, high_freq_factor",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
    ],
)
def test_unsupported_rope_is_refused(
    hf_folder: Callable[[str], Path], tmp_path: Path, rope: dict[str, Any], named: str
) -> None:
    folder = copy_of(hf_folder("llama-gqa-6-3-untied-f32"), tmp_path)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **rope}))
    with pytest.raises(EdgelmError, match=named):
        edgelm.load(folder, device="cpu")


def test_other_refusals(hf_folder: Callable[[str], Path], tmp_path: Path) -> None:
    folder = copy_of(hf_folder("llama-gqa-6-3-untied-f32"), tmp_path)
    data = json.loads((folder / "config.json").read_text())
    changes: list[tuple[dict[str, Any], str]] = [
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"quantization_config": {"quant_method": "gptq"}}, r"quantized \(gptq\)"),
    ]
    for change, named in changes:
        (folder / "config.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(EdgelmError, match=named):
            load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(EdgelmError, match=r"neither a checkpoint \(no config.json\)"):
        edgelm.load(folder, device="cpu")
    with pytest.raises(EdgelmError, match=r"config\.json: not found"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(EdgelmError, match=r"no model\.safetensors .*never unpickles"):
        load_checkpoint(folder)


def test_known_buffers_are_skipped_and_other_extras_refused(
    hf_folder: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = copy_of(hf_folder("qwen2-gqa-6-2-tied"), tmp_path)
    tensors = {name: torch.from_numpy(array) for name, array in iter_weights(folder)}
    assert list(tensors) == list(weight_shapes(folder))
    assert "model.layers.0.self_attn.q_proj.bias" in tensors and "lm_head.weight" not in tensors
    assert weight_shapes(folder)["model.layers.0.self_attn.k_proj.bias"] == (16,)
    inv_freq = torch.ones(8)
    save_file(
        {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq}, folder / "model.safetensors"
    )
    expected = edgelm_logits(hf_folder("qwen2-gqa-6-2-tied"), IDS)
    assert np.array_equal(edgelm_logits(folder, IDS), expected)
    save_file(
        {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
        folder / "model.safetensors",
    )
    assert np.array_equal(edgelm_logits(folder, IDS), expected)  # a tied head stored twice is dropped
    save_file({**tensors, "model.extra.weight": inv_freq}, folder / "model.safetensors")
    with pytest.raises(EdgelmError, match=r"unexpected model\.extra\.weight"):
        load_checkpoint(folder)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(EdgelmError, match=r"missing model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_checkpoint(folder)
    save_file(
        {**tensors, "model.layers.1.self_attn.k_proj.bias": torch.zeros(16, dtype=torch.int64)},
        folder / "model.safetensors",
    )
    with pytest.raises(EdgelmError, match=r"k_proj\.bias is stored as I64; edgelm reads F32, F16 and BF16"):
        load_checkpoint(folder)


def test_bf16_and_fp16_widen_exactly(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-40, -3.5, 65504.0])
    originals = {
        "f32": torch.randn(7, 5, generator=generator),
        "f16": torch.randn(3, 11, generator=generator).half(),
        "bf16": (torch.randn(4, 6, generator=generator) * 1e3).bfloat16(),
        "bf16_special": special.bfloat16(),
        "f16_special": special.half(),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
    }
    save_file(originals, tmp_path / "model.safetensors")
    got = dict(iter_weights(tmp_path))
    assert got.keys() == originals.keys()
    for name, tensor in originals.items():
        assert got[name].dtype == np.float32 and got[name].flags.writeable
        np.testing.assert_array_equal(got[name], tensor.float().numpy(), err_msg=name)
    for value in (float("inf"), float("-inf"), float("nan")):  # damaged weights: refused where read
        save_file({"bf16": torch.tensor([1.0, value]).bfloat16()}, tmp_path / "model.safetensors")
        with pytest.raises(EdgelmError, match="tensor bf16 holds NaN or infinite values"):
            dict(iter_weights(tmp_path))


def write_safetensors(path: Path, header: dict[str, Any], data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "length", "reason"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40, "does not fit"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "not the 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the file"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "invalid data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        ({"__metadata__": {"step": 3}}, b"", None, "__metadata__"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)
def test_malformed_safetensors_are_refused(
    tmp_path: Path, header: Any, data: bytes, length: int | None, reason: str
) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, header, data, length)
    with pytest.raises(EdgelmError, match=f"cannot be read as safetensors .*{reason}"):
        iter_weights(tmp_path)
    path.write_bytes(struct.pack("<Q", 4) + b"{,}x")
    with pytest.raises(EdgelmError, match=r"cannot be read as safetensors .*not JSON"):
        iter_weights(tmp_path)


@pytest.mark.parametrize(
    "name", ["llama3-rope-fp16-sharded", "mistral-gqa-9-3-bf16-sharded", "qwen2-gqa-6-2-tied"]
)
def test_edgelm_import_of_a_folder(hf_folder: Callable[[str], Path], tmp_path: Path, name: str) -> None:
    """`edgelm import`: a checkpoint with the same logits, the EOS list and the chat template kept."""
    source = copy_of(hf_folder(name), tmp_path)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    settings = {**settings, "chat_template": template}
    if name.startswith("qwen2"):  # as Qwen2's own: no BOS token, and add_bos_token left out
        settings = {k: v for k, v in settings.items() if k != "add_bos_token"} | {"bos_token": None}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, 0]}))
    out = tmp_path / "imported"
    result = subprocess.run(
        [sys.executable, "-m", "edgelm", "import", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    ids = IDS[: ModelConfig.load(out).max_position_embeddings]
    assert np.abs(edgelm_logits(out, ids) - hf_logits(source, ids)).max() <= 1e-4
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    with edgelm.load(out) as model:
        assert model.tokenizer.add_bos == (not name.startswith("qwen2"))
        assert len(model.generate("a b", max_new_tokens=3, temperature=0)) > 0
    assert ModelConfig.load(out).eos_token_ids == (1, 0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 0]
    assert read_metadata(out / "model.safetensors").get("format") == "pt"
    again = subprocess.run(
        [sys.executable, "-m", "edgelm", "import", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "not empty" in again.stderr


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weights (one file or all shards), in its stored dtype, as safetensors reads
    it; a tied head stored beside the embeddings left out."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors |= load_file(file)
    if ModelConfig.load(folder).tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


@pytest.mark.parametrize(
    "name", ["llama-mqa-headdim-tied-bf16", "llama3-rope-fp16-sharded", "mistral-gqa-9-3-bf16-sharded"]
)
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "shards"])
def test_import_keeps_the_source_dtype_bit_for_bit(
    hf_folder: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    sharded: bool,
) -> None:
    """A bf16 or fp16 model stays so, the same bits and the same size on disk, in one file or in shards
    with an index as transformers writes them; transformers loads it and computes the same logits."""
    from edgelm.importer import import_model

    if sharded:
        monkeypatch.setattr(checkpoint_module, "SHARD_BYTES", 40_000)  # bytes, for models this small
    source = hf_folder(name)
    out = import_model(source, tmp_path / "imported")
    ours, theirs = stored_tensors(out), stored_tensors(source)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    assert {t.dtype for t in ours.values()} == {CASES[name][2]}
    shards = sorted(out.glob("model-*.safetensors"))
    if not sharded:
        assert not shards and not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(shards) > 2 and not (out / "model.safetensors").exists()
        assert set(index["weight_map"].values()) == {p.name for p in shards}
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in ours.values())
    size = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
    assert size <= 1.02 * sum(p.stat().st_size for p in source.glob("model*.safetensors"))
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == CASES[name][2]
    ids = IDS[: ModelConfig.load(out).max_position_embeddings]
    assert np.array_equal(hf_logits(out, ids), hf_logits(source, ids))
    assert np.abs(edgelm_logits(out, ids) - hf_logits(source, ids)).max() <= 1e-4


@pytest.mark.parametrize(
    "name",
    ["llama3-rope-fp16-sharded", "llama-attention-bias-sharded", "mistral-window-tied", "qwen2-gqa-6-2-tied"],
)
def test_imported_folder_runs_in_llama_cpp(
    hf_folder: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    """Biases, Llama 3's RoPE scaling (rope_freqs) and a capped window survive GGUF export: llama.cpp's
    logits on the F32 file equal edgelm's on the import; imported back, the tensors are the same and the
    scaling read from rope_freqs gives the same frequencies (its numbers for an original context of 8192,
    which the file does not name)."""
    from edgelm.export.gguf import export_gguf
    from edgelm.importer import import_model

    checkpoint = import_model(hf_folder(name), tmp_path / "imported")
    gguf = export_gguf(checkpoint, tmp_path, "f32")
    ids = IDS[: ModelConfig.load(checkpoint).max_position_embeddings]
    with edgelm.load(gguf, kv_cache="f32") as theirs:
        expected = theirs.runtime.forward(ids.tolist(), all_logits=True)
    assert np.abs(edgelm_logits(checkpoint, ids) - expected).max() <= 1e-4
    back = import_model(gguf, tmp_path / "back")  # and back: the same tensors, biases included
    before, after = saved_weights(checkpoint), saved_weights(back)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    source, imported = ModelConfig.load(checkpoint), ModelConfig.load(back)
    np.testing.assert_allclose(rope_frequencies(imported), rope_frequencies(source), rtol=1e-6)
    assert np.abs(edgelm_logits(back, ids) - expected).max() <= 1e-4


def test_import_holds_one_tensor_at_a_time(
    tmp_path: Path, small_tokenizer: Tokenizer, live_tensors: LiveTensors
) -> None:
    """A 12-layer folder streams into the new checkpoint: at most the tensor being written and the one
    being read are alive at once."""
    from edgelm.importer import import_model

    config = dataclasses.replace(SMALL, num_hidden_layers=12)
    source = make_checkpoint(tmp_path / "deep", small_tokenizer, config)
    import_model(source, tmp_path / "imported")
    model_bytes = sum(t.nbytes for t in stored_tensors(source).values())
    assert live_tensors.largest > 0
    assert live_tensors.peak <= 2 * live_tensors.largest < model_bytes / 10
