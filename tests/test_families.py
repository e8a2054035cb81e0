"""Every model family edgelm runs, on every path, against someone else's implementation of it.

Each case is a tiny random model that transformers builds and saves itself (its norms far from 1, so that a
missed norm shows), imported with `edgelm import`. Then: edgelm's PyTorch model against transformers'
(prefill and decode step by step), the GGUF export in llama.cpp and back through `edgelm import`, the ONNX
export in ONNX Runtime and onnxruntime-genai, and a calibrated export.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GEMMA2, PHI3, SAMPLE_TEXT, kept_prefix_error, make_checkpoint, random_hf_model
from test_onnx import dequantized_checkpoint, genai_greedy_tokens, greedy_tokens

import edgelm
from edgelm.errors import EdgelmError
from edgelm.evaluation.metrics import kl_divergence, log_probs
from edgelm.export.gguf import export_gguf
from edgelm.export.onnx import export_onnx
from edgelm.formats.gguf_reader import read_gguf
from edgelm.importer import import_model
from edgelm.model.config import ModelConfig
from edgelm.model.rope import rope_frequencies
from edgelm.model.rope_scaling import LongRopeScaling
from edgelm.quant.calibration import activation_covariance
from edgelm.tokenizer import Tokenizer

GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
}
PHI3_PAD = {"pad_token_id": 1}  # Phi3Config's default, 32000, is past these vocabularies
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,
    # a factor for each of the 24 rotated pairs (head_dim 64, three quarters rotated)
    "short_factor": [1.0 + 0.25 * i for i in range(24)],
    "long_factor": [1.0 + 2.0 * i for i in range(24)],
    "original_max_position_embeddings": 256,
}
# name → (transformers model_type, config keys)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-gqa-untied": (
        "qwen3",
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
        | {"tie_word_embeddings": False},
    ),
    "qwen3-mqa-tied": (
        "qwen3",
        {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 16}
        | {"tie_word_embeddings": True},
    ),
    # soft-caps small enough to bend these logits; a window shorter than the sequence
    "gemma2-softcap-window": (
        "gemma2",
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
        | {"query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}
        | {"sliding_window": 24},
    ),
    # a local, a local and a global layer; the global one with linear RoPE scaling, the local ones with
    # their own base
    "gemma3-local-global-untied": (
        "gemma3_text",
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}
        | {"num_hidden_layers": 3, "sliding_window_pattern": 3, "sliding_window": 24}
        | {"query_pre_attn_scalar": 32, "tie_word_embeddings": False}
        | {"rope_parameters": GEMMA3_ROPE},
    ),
    # fused qkv_proj and gate_up_proj, multi-head attention, plain RoPE, tied
    "phi3-mha-tied": (
        "phi3",
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True}
        | PHI3_PAD,
    ),
    # Phi-4-mini's kind: partial rotary and LongRoPE, within its original context (where llama.cpp, whose
    # context is padded to 256, takes the short factors too); past it: test_longrope_past_the_original_context
    "phi3-partial-longrope": (
        "phi3",
        {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
        | {"max_position_embeddings": 256, "original_max_position_embeddings": 256}
        | {"rope_parameters": PHI3_LONGROPE | {"attention_factor": 1.19}}
        | PHI3_PAD,
    ),
}
# long enough that a top-1 agreement of 0.98 allows two near-ties to fall the other way
CONTEXT = {"max_position_embeddings": 128}
IDS = np.random.default_rng(1).integers(0, 300, size=120)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Callable[[str], Path]:
    """The case's transformers folder imported as an edgelm checkpoint, built once per module; the
    transformers folder lies beside it as `<checkpoint>.hf`."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            model_type, settings = FAMILIES[name]
            root = tmp_path_factory.mktemp(name)
            model = random_hf_model(model_type, CONTEXT | settings, small_tokenizer.vocab_size, len(built))
            model.save_pretrained(root / "hf")
            small_tokenizer.save(root / "hf")
            built[name] = import_model(root / "hf", root / "checkpoint")
        return built[name]

    return get


class HalfPrecisionActivation(torch.nn.Module):
    """An activation whose input and output are rounded to float16, as ggml's CPU GELU is (a table of
    float16 values indexed by the float16 input)."""

    def __init__(self, activation: torch.nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x.half().float()).half().float()


def transformers_logits(folder: Path, ids: np.ndarray, ggml_gelu: bool = False) -> np.ndarray:
    """transformers' logits for ids from a model folder, in float32; with `ggml_gelu`, a GELU's input and
    output rounded to float16 as llama.cpp computes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if ggml_gelu and "gelu" in str(getattr(model.config, "hidden_activation", "")):
        for layer in model.model.layers:
            layer.mlp.act_fn = HalfPrecisionActivation(layer.mlp.act_fn)
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


def hf_logits(checkpoint: Path, ids: np.ndarray, ggml_gelu: bool = False) -> np.ndarray:
    """transformers' logits for ids, from the folder edgelm imported."""
    return transformers_logits(checkpoint.parent / "hf", ids, ggml_gelu)


def stepwise_logits(artifact: Path, ids: np.ndarray, prefill: int = 20, **options: Any) -> np.ndarray:
    """A runtime's logits for ids: `prefill` tokens at once, then one token at a time through its cache."""
    with edgelm.load(artifact, **options) as model:
        first = model.runtime.forward(ids[:prefill].tolist(), all_logits=True)
        steps = [model.runtime.forward([int(t)]) for t in ids[prefill:]]
    return np.concatenate([first, *(s.reshape(1, -1) for s in steps)])


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_computes_what_transformers_computes(imported: Callable[[str], Path], name: str) -> None:
    checkpoint = imported(name)
    config = ModelConfig.load(checkpoint)
    assert (
        config.architecture
        == json.loads((checkpoint.parent / "hf" / "config.json").read_text())["architectures"][0]
    )
    want = hf_logits(checkpoint, IDS)
    assert np.abs(want).max() > 1.0  # the weights are not trivially small
    with edgelm.load(checkpoint, runtime="torch", device="cpu") as model:
        full = model.runtime.forward(IDS.tolist(), all_logits=True)
    assert np.abs(full - want).max() <= 1e-4
    assert np.abs(stepwise_logits(checkpoint, IDS, runtime="torch", device="cpu") - want).max() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_in_llama_cpp_and_back(imported: Callable[[str], Path], tmp_path: Path, name: str) -> None:
    checkpoint = imported(name)
    want = hf_logits(checkpoint, IDS)
    f32 = export_gguf(checkpoint, tmp_path, "f32")
    arch = FAMILIES[name][0].removesuffix("_text")  # llama.cpp's gemma3 is transformers' gemma3_text
    assert read_gguf(f32).metadata["general.architecture"] == arch
    got = stepwise_logits(f32, IDS, kv_cache="f32")
    # ggml's GELU rounds through float16 (measured: 9e-3 from transformers' exact GELU on the Gemma 3 case,
    # 2e-3 from transformers with that rounding, where an input near a float16 step may fall either side)
    gemma = ModelConfig.load(checkpoint).gemma_layout
    llama_cpp_like = hf_logits(checkpoint, IDS, ggml_gelu=True)
    assert top1(got, llama_cpp_like) == 1.0
    assert np.abs(got - llama_cpp_like).max() <= (3e-3 if gemma else 1e-3)
    # llama.cpp rounds the activations of a Q8_0 product to 8 bits too: on these random models, whose top
    # two logits are often close, that alone moves 2-6 % of the top tokens (measured against transformers
    # on the Q8_0 file's own dequantized weights); a misplaced tensor would move nearly all
    q8 = stepwise_logits(export_gguf(checkpoint, tmp_path, "q8_0"), IDS)
    assert top1(q8, want) >= 0.9
    back = import_model(f32, tmp_path / "back")
    assert ModelConfig.load(back) == ModelConfig.load(checkpoint)
    with edgelm.load(back, runtime="torch", device="cpu") as model:
        again = model.runtime.forward(IDS.tolist(), all_logits=True)
    assert np.abs(again - want).max() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_in_onnx_runtime_and_genai(imported: Callable[[str], Path], tmp_path: Path, name: str) -> None:
    checkpoint = imported(name)
    want = hf_logits(checkpoint, IDS)
    fp32 = export_onnx(checkpoint, tmp_path / "fp32", "fp32")
    assert np.abs(stepwise_logits(fp32, IDS) - want).max() <= 1e-4
    # int4 moves many top tokens of a random model (its top logits are close): held instead against
    # transformers on the int4 file's own weights, where ONNX Runtime's int8 activations are the difference
    int4 = export_onnx(checkpoint, tmp_path / "int4", "int4")
    own = transformers_logits(dequantized_checkpoint(checkpoint, int4, tmp_path / "own"), IDS)
    assert top1(stepwise_logits(int4, IDS), own) >= 0.9

    prompt = IDS[:12].tolist()
    with edgelm.load(fp32) as model:  # to an end-of-sequence token, as genai stops there
        ours = greedy_tokens(model.runtime, prompt, 16, stop=model.config.eos_token_ids)
    assert genai_greedy_tokens(fp32, prompt, 16) == ours


@pytest.mark.parametrize("name", FAMILIES)
def test_calibration_lowers_the_kl_divergence(
    imported: Callable[[str], Path], tmp_path: Path, small_tokenizer: Tokenizer, name: str
) -> None:
    """Calibration statistics come through the family's layers: on the calibration text, Q4_0 in llama.cpp
    and int4 in ONNX Runtime come closer to transformers' float model with them than without."""
    checkpoint = imported(name)
    ids = np.array(small_tokenizer.encode(SAMPLE_TEXT)[:120])
    want = log_probs(hf_logits(checkpoint, ids))
    statistics = activation_covariance(checkpoint, SAMPLE_TEXT, context=120)
    kld = {}
    for calibrated in (False, True):
        hessians = statistics if calibrated else None
        gguf = export_gguf(checkpoint, tmp_path / f"{calibrated}.gguf", "q4_0", hessians=hessians)
        onnx = export_onnx(checkpoint, tmp_path / f"int4-{calibrated}", "int4", hessians=hessians)
        for path in (gguf, onnx):
            got = log_probs(stepwise_logits(path, ids))
            kld[path.suffix or "onnx", calibrated] = float(kl_divergence(want, got).mean())
    assert kld[".gguf", True] < 0.9 * kld[".gguf", False], kld
    assert kld["onnx", True] < 0.9 * kld["onnx", False], kld


def test_unknown_families_and_options_are_refused_in_one_line(tmp_path: Path) -> None:
    from transformers import GPTBigCodeConfig

    bigcode = GPTBigCodeConfig(n_layer=1, n_embd=32, n_head=2).to_dict()
    with pytest.raises(EdgelmError, match="'gpt_bigcode' is not supported") as refused:
        ModelConfig.from_hf_dict(bigcode)
    assert "\n" not in str(refused.value)
    qwen3 = random_hf_model("qwen3", FAMILIES["qwen3-gqa-untied"][1], 300, seed=0).config.to_dict()
    with pytest.raises(EdgelmError, match="hidden_act='gelu' is not supported"):
        ModelConfig.from_hf_dict({**qwen3, "hidden_act": "gelu"})
    with pytest.raises(EdgelmError, match="rope_type 'yarn' is not supported"):
        ModelConfig.from_hf_dict({**qwen3, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize(
    ("config", "refusal"),
    [
        (
            ModelConfig(architecture="Qwen3ForCausalLM", qkv_bias=True, o_bias=True),
            r"llama\.cpp's qwen3 has no attention biases",
        ),
        (GEMMA2, r"llama\.cpp's gemma2 scales attention by 1/√16 .* this model by 1/√24"),
        (
            dataclasses.replace(GEMMA2, query_pre_attn_scalar=16, tie_word_embeddings=False),
            "gemma2 has no output matrix of its own",
        ),
    ],
    ids=["qwen3-biases", "gemma2-query-scalar", "gemma2-untied"],
)
def test_what_llama_cpp_lacks_is_refused_before_writing(
    tmp_path: Path, small_tokenizer: Tokenizer, config: ModelConfig, refusal: str
) -> None:
    """Models that run in torch and ONNX (test_model, test_onnx) but that llama.cpp's architecture would
    compute otherwise, or not load: the GGUF export says so and writes nothing."""
    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer, config)
    with pytest.raises(EdgelmError, match=refusal):
        export_gguf(checkpoint, tmp_path / "out", "q8_0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_every_mixture_takes_llama_cpp_types_and_runs(
    imported: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    """llama.cpp's per-tensor rules for the family's architecture, for every mixture: its own quantizer,
    given only the file type, picks the types edgelm's export picked (where edgelm's two own levels differ
    by design, as test_gguf's llama_cpp_type says), and llama.cpp runs each file close to transformers."""
    import llama_cpp
    from gguf import GGUFReader
    from test_gguf import llama_cpp_type

    from edgelm.export.gguf_types import MIXTURES

    checkpoint = imported(name)
    config = ModelConfig.load(checkpoint)
    want = hf_logits(checkpoint, IDS[:48])
    f32 = export_gguf(checkpoint, tmp_path / "f32.gguf", "f32")
    for quant, mixture in MIXTURES.items():
        ours = export_gguf(checkpoint, tmp_path / f"{quant}.gguf", quant)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(mixture.file_type)
        theirs = tmp_path / f"{quant}-llama.cpp.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
        types = [{t.name: t.tensor_type.name for t in GGUFReader(path).tensors} for path in (ours, theirs)]
        layers = config.num_hidden_layers
        assert types[1] == {t: llama_cpp_type(quant, t, kind, layers) for t, kind in types[0].items()}, quant
        # 4 bits move many top tokens of a random model; a misplaced tensor moves nearly all (~1/vocab kept)
        assert top1(stepwise_logits(ours, IDS[:48]), want) >= 0.2, quant


@pytest.mark.parametrize("name", FAMILIES)
def test_every_onnx_precision_runs(imported: Callable[[str], Path], tmp_path: Path, name: str) -> None:
    """fp16, int8, int8_dynamic and int4_mixed of the family in ONNX Runtime: fp16 within half precision of
    transformers, the quantized ones near it (4 bits move many top tokens of a random model, a misplaced
    weight nearly all: ~1/vocab kept)."""
    checkpoint = imported(name)
    want = hf_logits(checkpoint, IDS[:48])
    for quant in ("fp16", "int8", "int8_dynamic", "int4_mixed"):
        got = stepwise_logits(export_onnx(checkpoint, tmp_path / quant, quant), IDS[:48])
        assert np.isfinite(got).all(), quant
        if quant == "fp16":
            assert np.abs(got - want).max() <= 0.05 and top1(got, want) >= 0.9
        else:
            assert top1(got, want) >= 0.2, quant


@pytest.mark.parametrize(
    "name",
    ["qwen3-gqa-untied", "gemma2-softcap-window", "gemma3-local-global-untied", "phi3-partial-longrope"],
)
def test_compare_and_generation_run_unchanged(
    imported: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    """The runtime-agnostic layers need nothing of a family: `compare` checks the checkpoint and its
    exports against one reference, and greedy generation gives the same text in all three runtimes."""
    from edgelm.evaluation.compare import compare

    checkpoint = imported(name)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    targets = ["torch", "gguf:q8_0", "onnx:fp32"]
    compared = compare(
        checkpoint,
        tmp_path / "report",
        targets,
        text,
        ctx=64,
        repetitions=1,
        isolate=False,
        show_progress=False,
    )
    results = {r.target: r for r in compared.results}
    assert sorted(results) == sorted(targets) and all(r.error is None for r in results.values())
    assert all(r.tokenizer is not None and r.tokenizer.match for r in results.values())
    torch_accuracy, onnx_accuracy = results["torch"].accuracy, results["onnx:fp32"].accuracy
    assert torch_accuracy is not None and torch_accuracy.kld_mean.value == 0
    assert onnx_accuracy is not None and onnx_accuracy.same_top_p.value == 1
    assert compared.report_md.is_file()

    texts = []
    for artifact in (checkpoint, results["gguf:q8_0"].artifact, results["onnx:fp32"].artifact):
        with edgelm.load(artifact, device="cpu") as model:
            texts.append(model.generate("def fibonacci(n):", max_new_tokens=12, temperature=0.0))
    assert texts[0] == texts[2] and len(texts[1]) > 0


@pytest.mark.parametrize("name", ["gemma2-softcap-window", "gemma3-local-global-untied"])
def test_a_kept_prefix_longer_than_the_window(
    imported: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    """Sliding-window layers: a sequence cut back to 48 tokens (twice the window) and continued gives a
    fresh prefill's logits in every runtime (llama.cpp's window cache included)."""
    checkpoint = imported(name)
    artifacts = {
        checkpoint: ({}, 1e-5),
        export_onnx(checkpoint, tmp_path / "onnx", "fp32"): ({}, 1e-4),
        export_gguf(checkpoint, tmp_path, "f32"): ({"kv_cache": "f32"}, 1e-3),
    }
    ids = IDS[:96].tolist()
    for artifact, (options, tolerance) in artifacts.items():
        with edgelm.load(artifact, device="cpu", **options) as model:
            assert kept_prefix_error(model.runtime, ids, 48, IDS[96:].tolist()) <= tolerance, artifact


def test_rotary_width_onnx_runtime_cannot_rotate_is_refused(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    """GroupQueryAttention rotates a multiple of 16 dimensions: a Phi-3 rotating 8 (Phi-4-mini rotates 96)
    is refused before anything is written."""
    checkpoint = make_checkpoint(tmp_path / "model", small_tokenizer, PHI3)
    with pytest.raises(
        EdgelmError, match="rotates a multiple of 16 dimensions per head, and this model rotates 8"
    ):
        export_onnx(checkpoint, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3"])
def test_missing_keys_take_transformers_defaults(model_type: str) -> None:
    """A config.json that names only the shape reads as transformers' config class reads it: Gemma's layer
    pattern, window, soft-caps, attention scalar and RoPE bases, Phi-3's context."""
    from transformers import AutoConfig

    shape = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 8}
    shape |= {"num_attention_heads": 4}
    ours = ModelConfig.from_hf_dict({"model_type": model_type, **shape})
    theirs = AutoConfig.for_model(model_type, **shape)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert (ours.head_dim, ours.num_key_value_heads) == (head_dim, theirs.num_key_value_heads)
    assert (ours.tie_word_embeddings, ours.rms_norm_eps) == (theirs.tie_word_embeddings, theirs.rms_norm_eps)
    if model_type == "phi3":
        assert ours.max_position_embeddings == theirs.max_position_embeddings
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
        return
    assert list(ours.layer_types) == theirs.layer_types and ours.sliding_window == theirs.sliding_window
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    assert ours.attn_logit_softcapping == theirs.attn_logit_softcapping
    assert ours.final_logit_softcapping == theirs.final_logit_softcapping
    rope = theirs.rope_parameters
    if model_type == "gemma3_text":
        assert ours.rope_theta == rope["full_attention"]["rope_theta"]
        assert ours.rope_local_theta == rope["sliding_attention"]["rope_theta"]
    else:
        assert ours.rope_theta == rope["rope_theta"]


def test_phi4_mini_shaped_config_reads_as_transformers() -> None:
    """Phi-4-mini's config.json (partial rotary 0.75, LongRoPE from a 4 k original context to 128 k, a
    window past the context): the published context, and transformers' own attention factor."""
    from transformers import Phi3Config

    pairs = 48  # head_dim 128, three quarters rotated
    data = {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "vocab_size": 200064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0 + i / pairs for i in range(pairs)],
            "long_factor": [1.0 + 40 * i / pairs for i in range(pairs)],
        },
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "bos_token_id": 199999,
        "eos_token_id": 199999,
        "pad_token_id": 199999,
    }
    ours = ModelConfig.from_hf_dict(data)
    assert (ours.rotary_dim, ours.max_position_embeddings) == (96, 131072)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS["longrope"](Phi3Config(**data), "cpu", seq_len=4096)
    assert isinstance(ours.rope_scaling, LongRopeScaling)
    assert ours.rope_scaling.attention_factor == pytest.approx(factor, rel=1e-7)
    # torch rounds its float32 power once in a while otherwise (one pair here, by 2 units)
    np.testing.assert_array_max_ulp(rope_frequencies(ours), inv_freq.numpy(), maxulp=2)


def test_longrope_past_the_original_context(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """Across LongRoPE's original context (32 positions here, of a published 128) every runtime computes
    what transformers' generation computes: the short factors within it, and from the step that passes it
    on, the whole sequence with the long ones (transformers drops its cache there; edgelm's torch and ONNX
    Runtime runtimes compute the sequence again). llama.cpp chooses the factors by its context: past the
    original one, the long ones throughout, which is a single forward over the whole sequence."""
    settings = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    settings |= {"max_position_embeddings": 128, "original_max_position_embeddings": 32}
    settings |= {"rope_parameters": PHI3_LONGROPE | {"original_max_position_embeddings": 32}} | PHI3_PAD
    model = random_hf_model("phi3", settings, small_tokenizer.vocab_size, seed=0)
    model.save_pretrained(tmp_path / "hf")
    small_tokenizer.save(tmp_path / "hf")
    checkpoint = import_model(tmp_path / "hf", tmp_path / "checkpoint")
    assert ModelConfig.load(checkpoint).max_position_embeddings == 128

    ids = IDS[:48]
    within, past = transformers_logits(tmp_path / "hf", ids[:32]), transformers_logits(tmp_path / "hf", ids)
    assert np.abs(within - past[:32]).max() > 0.5  # the two sets of factors differ clearly
    want = np.concatenate([within, past[32:]])
    with edgelm.load(checkpoint, runtime="torch", device="cpu") as ours:
        assert np.abs(ours.runtime.forward(ids.tolist(), all_logits=True) - past).max() <= 1e-4
    assert np.abs(stepwise_logits(checkpoint, ids, runtime="torch", device="cpu") - want).max() <= 1e-4
    onnx = export_onnx(checkpoint, tmp_path / "onnx", "fp32")
    assert np.abs(stepwise_logits(onnx, ids, context=128) - want).max() <= 1e-4
    gguf = export_gguf(checkpoint, tmp_path, "f32")
    assert np.abs(stepwise_logits(gguf, ids, context=128, kv_cache="f32") - past).max() <= 1e-3

    for artifact in (checkpoint, onnx):  # keys rotated with the long factors are not kept below them
        with edgelm.load(artifact, device="cpu", context=128) as ours:
            ours.runtime.forward(ids.tolist())
            assert ours.runtime.keep(40) == 40 and ours.runtime.keep(20) == 0
            assert np.abs(ours.runtime.forward(ids[:32].tolist(), all_logits=True) - within).max() <= 1e-4

    prompt = ids[:20].tolist()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=28, min_new_tokens=28, do_sample=False
        )
    for artifact in (checkpoint, onnx):
        with edgelm.load(artifact, device="cpu", context=128) as ours:
            assert greedy_tokens(ours.runtime, prompt, 28) == generated[0, 20:].tolist(), artifact
