"""Activation statistics against transformers' LlamaForCausalLM on the same checkpoint, and their use as
quantization importance."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, SMALL, LiveTensors, make_checkpoint
from transformers import LlamaForCausalLM

from edgelm.checkpoint import iter_weights, load_checkpoint, save_checkpoint, tensor_shapes
from edgelm.errors import EdgelmError
from edgelm.quant.blocks import quantize_blocks
from edgelm.quant.calibration import activation_covariance, calibration_windows, read_calibration_text
from edgelm.tokenizer import Tokenizer

CONTEXT = 24  # SAMPLE_TEXT (86 tokens) becomes 3 windows of 24 and a short one of 18
TIED = dataclasses.replace(SMALL, tie_word_embeddings=True, num_key_value_heads=4)


def activation_importance(checkpoint: Path, text: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """The diagonal of each weight's E[x xᵀ]: the mean squared input per column, as the exporters use it."""
    return {name: np.diag(h).copy() for name, h in activation_covariance(checkpoint, text, **kwargs).items()}


def reference_windows(tokenizer: Tokenizer, text: str, context: int) -> list[list[int]]:
    """BOS and then the next context - 1 tokens of the text, written out independently of edgelm."""
    ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
    return [[tokenizer.bos_id, *ids[i : i + context - 1]] for i in range(0, len(ids), context - 1)]


def hf_linear_inputs(directory: Path, windows: list[list[int]]) -> dict[str, np.ndarray]:
    """The inputs (tokens, in) of every nn.Linear of transformers' model over the windows, by weight name."""
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    captured: dict[str, list[np.ndarray]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = f"{name}.weight"
            captured[key] = []
            module.register_forward_pre_hook(
                lambda _m, args, key=key: captured[key].append(args[0][0].double().numpy())
            )
    with torch.no_grad():
        for window in windows:
            model(torch.tensor([window]))
    return {key: np.concatenate(xs) for key, xs in captured.items()}


@pytest.fixture(scope="module", params=["untied", "tied"])
def measured(request, tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer):
    """(checkpoint, our importance, transformers' linear inputs, our covariance) for SAMPLE_TEXT in windows
    of CONTEXT."""
    config = TIED if request.param == "tied" else SMALL
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", small_tokenizer, config)
    covariance = activation_covariance(directory, SAMPLE_TEXT, context=CONTEXT)
    ours = {name: np.diag(h).copy() for name, h in covariance.items()}
    theirs = hf_linear_inputs(directory, reference_windows(small_tokenizer, SAMPLE_TEXT, CONTEXT))
    return directory, ours, theirs, covariance


# ----------------------------------------------------------------------------------------------- values


def test_keys_and_shapes(measured) -> None:
    directory, ours, _, _ = measured
    config, tensors, _ = load_checkpoint(directory)
    quantized = {n for n, shape in tensor_shapes(config).items() if len(shape) == 2} | {"lm_head.weight"}
    assert set(ours) == quantized - {"model.embed_tokens.weight"}
    for name, importance in ours.items():
        weight = tensors.get(name, tensors["model.embed_tokens.weight"])  # tied: the head is the embedding
        assert importance.dtype == np.float32 and importance.shape == (weight.shape[1],), name
        assert np.isfinite(importance).all() and (importance > 0).all(), name
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q = ours[p + "self_attn.q_proj.weight"]
        assert np.array_equal(q, ours[p + "self_attn.k_proj.weight"])
        assert np.array_equal(q, ours[p + "self_attn.v_proj.weight"])
        assert np.array_equal(ours[p + "mlp.gate_proj.weight"], ours[p + "mlp.up_proj.weight"])


def test_equal_to_second_moment_of_transformers_inputs(measured) -> None:
    _, ours, theirs, covariance = measured
    assert set(ours) == set(theirs) == set(covariance)
    for name, x in theirs.items():
        assert x.shape[0] == 86 + 4  # every token, the BOS of each of the 4 windows included
        np.testing.assert_allclose(ours[name], (x * x).mean(axis=0), rtol=1e-4, err_msg=name)
        expected = x.T @ x / x.shape[0]
        assert covariance[name].dtype == np.float32 and covariance[name].shape == expected.shape, name
        np.testing.assert_allclose(
            covariance[name], expected, rtol=1e-4, atol=1e-6 * expected.max(), err_msg=name
        )


def test_any_order_of_keys_gives_the_same_statistics(measured) -> None:
    """Measured layer by layer on demand: the head first, a later layer, then an earlier one (which starts
    again from the embeddings) give the arrays of a pass in layer order."""
    directory, _, _, in_order = measured
    expected = {name: in_order[name] for name in in_order}
    again = activation_covariance(directory, SAMPLE_TEXT, context=CONTEXT)
    for name in [
        "lm_head.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ]:
        assert np.array_equal(again[name], expected[name]), name
    assert all(np.array_equal(again[name], expected[name]) for name in reversed(list(expected)))
    with pytest.raises(KeyError):
        again["model.embed_tokens.weight"]  # a lookup table has no input activations


def test_through_the_quantized_layers_as_transformers_computes_them(
    checkpoint: Path, small_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """GPTQ's sequential scheme: with layer 0's weights handed back quantized, layer 1 is measured on the
    activations of the quantized layer 0 (transformers' inputs on a checkpoint that holds those values);
    through="float" ignores them, and the float model's statistics stay those of the float model. The head's
    is the float model's in both (the exporters quantize it first), even when asked after layer 0 was
    handed back."""
    config, tensors, tokenizer = load_checkpoint(checkpoint)
    layer0 = [name for name in tensors if name.startswith("model.layers.0.") and name.endswith("proj.weight")]
    rounded = {name: quantize_blocks(tensors[name], 4, 32, True).dequantize() for name in layer0}
    statistics = {
        through: activation_covariance(checkpoint, SAMPLE_TEXT, context=CONTEXT, through=through)
        for through in ("quantized", "float")
    }
    for covariance in statistics.values():
        covariance["model.layers.0.self_attn.q_proj.weight"]
        for name, values in rounded.items():
            covariance.record_quantized(name, values)
    save_checkpoint(tmp_path / "rounded", config, {**tensors, **rounded}, tokenizer)
    windows = reference_windows(small_tokenizer, SAMPLE_TEXT, CONTEXT)
    quantized_inputs = hf_linear_inputs(tmp_path / "rounded", windows)
    float_inputs = hf_linear_inputs(checkpoint, windows)
    layer1 = ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
    cases = [
        (name, through, inputs)
        for name in layer1
        for through, inputs in (("quantized", quantized_inputs), ("float", float_inputs))
    ] + [("lm_head.weight", through, float_inputs) for through in statistics]
    for name, through, inputs in cases:
        expected = inputs[name].T @ inputs[name] / len(inputs[name])
        np.testing.assert_allclose(
            statistics[through][name],
            expected,
            rtol=1e-4,
            atol=1e-6 * expected.max(),
            err_msg=f"{through} {name}",
        )
    for name in layer1:
        assert not np.allclose(statistics["quantized"][name], statistics["float"][name], rtol=1e-3), name
    with pytest.raises(EdgelmError, match="through='fixed'"):
        activation_covariance(checkpoint, SAMPLE_TEXT, through="fixed")


def test_holds_one_layer_at_a_time(
    tmp_path: Path, small_tokenizer: Tokenizer, live_tensors: LiveTensors
) -> None:
    """Over a 12-layer model, the checkpoint tensors alive at once never weigh more than one layer's."""
    config = dataclasses.replace(SMALL, num_hidden_layers=12)
    directory = make_checkpoint(tmp_path / "deep", small_tokenizer, config)
    covariance = activation_covariance(directory, SAMPLE_TEXT, context=CONTEXT)
    assert len([covariance[name] for name in covariance]) == 7 * 12 + 1
    shapes = tensor_shapes(config)
    layer = 4 * sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("model.layers.0."))
    embedding = 4 * math.prod(shapes["model.embed_tokens.weight"])
    assert 0 < live_tensors.peak <= max(layer, embedding) < 4 * sum(map(math.prod, shapes.values())) / 6


def test_equal_to_norms_of_transformers_hidden_states(checkpoint: Path, small_tokenizer: Tokenizer) -> None:
    """q_proj of layer 1 reads input_layernorm(layer 0's output), lm_head reads the final norm's output."""
    _, tensors, _ = load_checkpoint(checkpoint)
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    windows = reference_windows(small_tokenizer, SAMPLE_TEXT, CONTEXT)
    layer1, final = [], []
    with torch.no_grad():
        for window in windows:
            out = model.model(torch.tensor([window]), output_hidden_states=True)
            layer1.append(out.hidden_states[1][0].double().numpy())  # (T, h): the input of layer 1
            final.append(out.last_hidden_state[0].double().numpy())  # (T, h): after the final norm

    def rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return weight * x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + SMALL.rms_norm_eps)

    q_input = rms_norm(np.concatenate(layer1), tensors["model.layers.1.input_layernorm.weight"])
    head_input = np.concatenate(final)
    ours = activation_importance(checkpoint, SAMPLE_TEXT, context=CONTEXT)
    q_name = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_allclose(ours[q_name], (q_input**2).mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(ours["lm_head.weight"], (head_input**2).mean(axis=0), rtol=1e-4)


def test_default_context_and_max_tokens(checkpoint: Path, small_tokenizer: Tokenizer) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    # the model's context (96) holds BOS + the 86 tokens: one window
    one_window = hf_linear_inputs(checkpoint, reference_windows(small_tokenizer, SAMPLE_TEXT, 96))[name]
    ours = activation_importance(checkpoint, SAMPLE_TEXT)
    np.testing.assert_allclose(ours[name], (one_window**2).mean(0), rtol=1e-4)
    # 30 tokens: a window of 24, then BOS + 5 tokens
    first = reference_windows(small_tokenizer, SAMPLE_TEXT, CONTEXT)[:2]
    first[1] = first[1][:6]
    cut = hf_linear_inputs(checkpoint, first)[name]
    assert cut.shape[0] == 30
    ours = activation_importance(checkpoint, SAMPLE_TEXT, context=CONTEXT, max_tokens=30)
    np.testing.assert_allclose(ours[name], (cut**2).mean(0), rtol=1e-4)


def test_calibration_windows() -> None:
    ids = list(range(10, 20))
    assert calibration_windows(ids, 1, 4, 100) == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19]]
    assert calibration_windows(ids, 1, 4, 6) == [[1, 10, 11, 12], [1, 13]]
    assert calibration_windows(ids, 1, 4, 5) == [[1, 10, 11, 12]]  # BOS alone is no window
    assert calibration_windows(ids, 1, 20, 100) == [[1, *ids]]
    assert calibration_windows(ids, 1, 2, 4) == [[1, 10], [1, 11]]
    with pytest.raises(EdgelmError, match="context=1 is too small"):
        calibration_windows(ids, 1, 1, 100)


# ------------------------------------------------------------------------------- use as importance


def test_importance_lowers_the_output_error_of_quantized_weights(measured) -> None:
    """||(W - Wq) x||² summed over the calibration activations, 4-bit symmetric blocks of 32 (Q4_0's layout),
    quantized with and without the importance."""
    directory, ours, theirs, _ = measured
    _, tensors, _ = load_checkpoint(directory)
    plain_total = steered_total = 0.0
    wins = 0
    for name, importance in ours.items():
        w = tensors.get(name, tensors["model.embed_tokens.weight"])
        x = theirs[name]  # (tokens, in)
        errors = []
        for imp in (None, importance):
            wq = quantize_blocks(w, 4, 32, True, importance=imp).dequantize()
            errors.append(float((((w - wq).astype(np.float64) @ x.T) ** 2).sum()))
        plain, steered = errors
        wins += steered <= plain
        plain_total, steered_total = plain_total + plain, steered_total + steered
    assert wins >= 0.75 * len(ours), f"importance helped only {wins} of {len(ours)} weights"
    assert steered_total < 0.97 * plain_total


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "calibration text is empty"),
        ({"text": " \n\t "}, "calibration text is empty"),
        ({"text": "a"}, r"only 1 token\(s\): too short"),
        ({"text": b"hello world"}, "must be a str, not bytes"),
        ({"context": 0}, "context=0 is too small"),
        ({"context": -5}, "context=-5 is too small"),
        ({"context": 1}, "context=1 is too small"),
        ({"context": 2.5}, "context must be an integer"),
        ({"context": 97}, "context=97 exceeds the model's context of 96 tokens"),
        ({"max_tokens": 1}, "max_tokens=1 is too small"),
    ],
)
def test_bad_arguments(checkpoint: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(EdgelmError, match=message):
        activation_importance(checkpoint, **{"text": SAMPLE_TEXT, **kwargs})


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(EdgelmError, match="not a checkpoint directory"):
        activation_importance(tmp_path / "nothing", SAMPLE_TEXT)


def test_without_torch(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    with pytest.raises(EdgelmError, match=r"pip install 'edgelm\[torch\]'"):
        activation_importance(checkpoint, SAMPLE_TEXT)


def test_read_calibration_text(tmp_path: Path) -> None:
    path = tmp_path / "calibration.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two \xf0\x9f\x9a\x80\n")
    assert read_calibration_text(path) == "line one\r\nline two 🚀\n"  # BOM dropped, bytes kept as they are
    with pytest.raises(EdgelmError, match=r"missing\.txt: not found"):
        read_calibration_text(tmp_path / "missing.txt")
    with pytest.raises(EdgelmError, match="not a file"):
        read_calibration_text(tmp_path)
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(EdgelmError, match=r"not UTF-8 \(byte 3: invalid continuation byte\)"):
        read_calibration_text(path)
    for empty in (b"", b" \n\n", b"\xef\xbb\xbf"):
        path.write_bytes(empty)
        with pytest.raises(EdgelmError, match=r"calibration\.txt: empty"):
            read_calibration_text(path)


def test_a_file_in_name_order_is_calibrated_in_one_pass(
    tmp_path: Path, small_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers writes tensors by name (layers 0, 1, 10, 11, 2, ...): the exporters and the import take
    them in the model's order, so the statistics never start over."""
    from safetensors.numpy import save_file

    import edgelm.quant.calibration as calibration
    from edgelm.export.gguf import export_gguf
    from edgelm.importer import import_model

    directory = make_checkpoint(
        tmp_path / "ckpt", small_tokenizer, dataclasses.replace(TIED, num_hidden_layers=12)
    )
    _, tensors, _ = load_checkpoint(directory)
    save_file(tensors, str(directory / "model.safetensors"))  # by name, as transformers' files are
    starts = []
    restart = calibration.ActivationCovariance._restart
    monkeypatch.setattr(
        calibration.ActivationCovariance, "_restart", lambda self: (starts.append(1), restart(self))[1]
    )
    covariance = activation_covariance(directory, SAMPLE_TEXT, context=CONTEXT)
    path = export_gguf(directory, tmp_path / "out.gguf", "q4_0", covariance)
    assert len(starts) == 1  # the head's pass (a tied model's head comes first) leaves the walk alone
    from gguf import GGUFReader

    layers = [int(t.name.split(".")[1]) for t in GGUFReader(path).tensors if t.name.startswith("blk.")]
    assert layers == sorted(layers)
    imported = import_model(directory, tmp_path / "imported")
    written = [
        int(name.split(".")[2]) for name, _ in iter_weights(imported) if name.startswith("model.layers.")
    ]
    assert written == sorted(written)


def test_one_calibration_serves_several_exports(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """Statistics that went on through one export's quantized layers start over for the next, the head's
    included: on a tied model, whose head both exporters quantize first, a Q4_0 file and an int4 ONNX
    folder calibrated after other exports with the same statistics equal ones calibrated on their own."""
    from edgelm.export.gguf import export_gguf
    from edgelm.export.onnx import export_onnx

    tied = make_checkpoint(tmp_path / "tied", small_tokenizer, TIED)

    def fresh() -> Mapping[str, np.ndarray]:
        return activation_covariance(tied, SAMPLE_TEXT, context=CONTEXT)

    shared = fresh()
    export_gguf(tied, tmp_path / "first.gguf", "q8_0", shared)
    after = export_gguf(tied, tmp_path / "after.gguf", "q4_0", shared)
    onnx_after = export_onnx(tied, tmp_path / "after-int4", "int4", hessians=shared)
    alone = export_gguf(tied, tmp_path / "alone.gguf", "q4_0", fresh())
    onnx_alone = export_onnx(tied, tmp_path / "alone-int4", "int4", hessians=fresh())
    assert after.read_bytes() == alone.read_bytes()
    data = "model.onnx.data"
    assert (onnx_after / data).read_bytes() == (onnx_alone / data).read_bytes()
