"""GPTQ error feedback (`hessian=`): a lower output error ||(W - Wq) X||² than importance = diag(H) and than
round-to-nearest, with results that keep the format (gguf-py dequantizes the packed bytes to our values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from test_quant import ALL

from edgelm.errors import EdgelmError
from edgelm.quant.blocks import QuantizedBlocks, quantize_blocks, quantize_q4_k, quantize_q6_k
from edgelm.quant.calibration import activation_covariance

ROWS, COLS, TOKENS = 64, 256, 1024


def activations(kind: str, seed: int = 0) -> np.ndarray:
    """X (tokens, cols): Gaussian mixed by a random matrix (H far from diagonal), or nearly independent
    channels of which a few are 20 times larger."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((TOKENS, COLS))
    mixing = rng.standard_normal((COLS, COLS)) / np.sqrt(COLS)
    if kind == "mixed":
        return z @ mixing
    x = z @ (np.eye(COLS) + 0.3 * mixing)
    x[:, [3, 77, 200]] *= 20
    return x


def second_moment(x: np.ndarray) -> np.ndarray:
    return (x.T @ x / len(x)).astype(np.float32)


def matrix(seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)


def output_error(w: np.ndarray, values: np.ndarray, x: np.ndarray) -> float:
    return float((((w - values).astype(np.float64) @ x.T) ** 2).sum())


@pytest.mark.parametrize("kind", ["mixed", "outliers"])
@pytest.mark.parametrize("qtype", list(ALL), ids=lambda t: t.name)
def test_hessian_lowers_the_output_error(qtype: T, kind: str) -> None:
    quantize = ALL[qtype][0]
    w, x = matrix(), activations(kind)
    h = second_moment(x)
    rtn = output_error(w, quantize(w, search=False).dequantize(), x)
    diagonal = output_error(w, quantize(w, importance=np.diag(h)).dequantize(), x)
    gptq = output_error(w, quantize(w, hessian=h).dequantize(), x)
    # measured (seed 0): mixed ≈ 0.42-0.54 of RTN and 0.50-0.65 of diag; outliers ≈ 0.12-0.21 / 0.84-0.90
    assert gptq < 0.75 * rtn
    assert gptq < (0.8 if kind == "mixed" else 0.95) * diagonal


@pytest.mark.parametrize("qtype", list(ALL), ids=lambda t: t.name)
def test_format_is_unchanged(qtype: T) -> None:
    quantize, pack = ALL[qtype]
    w = matrix()
    w[:5, :40] *= 30  # outliers
    result = quantize(w, hessian=second_moment(activations("mixed")))
    assert np.array_equal(gguf_dequantize(pack(result), qtype), result.dequantize())
    reference = quantize(w)  # same arrays, dtypes and shapes as without the hessian
    for name, value in vars(result).items():
        if isinstance(value, np.ndarray):
            expected = getattr(reference, name)
            assert value.dtype == expected.dtype and value.shape == expected.shape, name
    if isinstance(result, QuantizedBlocks):
        assert result.codes.max() < 1 << result.bits
        for v in (result.scales, result.zeros):
            if v is not None:
                assert np.array_equal(v.astype(np.float16).astype(np.float32), v)
    else:
        assert np.array_equal(result.d.astype(np.float16).astype(np.float32), result.d)


@pytest.mark.parametrize("qtype", list(ALL), ids=lambda t: t.name)
def test_dead_and_singular_columns(qtype: T) -> None:
    quantize, pack = ALL[qtype]
    w, x = matrix(), activations("mixed")
    x[:, [0, 5, 100]] = 0  # inputs that are never active: H has zero rows and columns
    x[:, 7] = x[:, 8]  # and two equal inputs make it singular
    result = quantize(w, hessian=second_moment(x))
    assert np.array_equal(gguf_dequantize(pack(result), qtype), result.dequantize())
    # the weights of dead inputs cost nothing; the rest is still fitted to x
    rtn = output_error(w, quantize(w, search=False).dequantize(), x)
    assert output_error(w, result.dequantize(), x) < 0.75 * rtn
    zero = quantize(w, hessian=np.zeros((COLS, COLS), np.float32))  # nothing measured: plain rounding
    assert np.array_equal(zero.dequantize(), quantize(w).dequantize())


def test_more_rows_than_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgelm.quant.blocks as quant

    w, h = matrix(), second_moment(activations("mixed"))
    whole = [quantize_blocks(w, 4, 32, False, hessian=h), quantize_q4_k(w, hessian=h)]
    monkeypatch.setattr(quant, "_GPTQ_CHUNK_VALUES", 10 * COLS)  # 7 chunks of rows
    chunked = [quantize_blocks(w, 4, 32, False, hessian=h), quantize_q4_k(w, hessian=h)]
    for a, b in zip(whole, chunked, strict=True):
        assert np.array_equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize(
    ("hessian", "message"),
    [
        (np.eye(COLS - 1), r"hessian has shape \(255, 255\), expected \(256, 256\)"),
        (np.ones(COLS), r"hessian has shape \(256,\)"),
        (np.full((COLS, COLS), np.nan), "NaN or infinity"),
        (-np.eye(COLS), "negative diagonal"),
        (np.eye(COLS) - 2 * np.ones((COLS, COLS)) / COLS * 40, "not positive semi-definite"),
    ],
)
def test_bad_hessian(hessian: np.ndarray, message: str) -> None:
    for quantize in (
        lambda w, h: quantize_blocks(w, 4, 32, True, hessian=h),
        lambda w, h: quantize_q6_k(w, hessian=h),
    ):
        with pytest.raises(EdgelmError, match=message):
            quantize(matrix(), hessian)


# ------------------------------------------------------------------------------------------ calibration


def test_activation_covariance(checkpoint: Path) -> None:
    """Symmetric and positive semi-definite (its values against transformers' inputs: test_calibration.py);
    and it steers quantize_blocks."""
    from conftest import SAMPLE_TEXT

    covariance = activation_covariance(checkpoint, SAMPLE_TEXT, context=24)
    for name, h in covariance.items():
        np.testing.assert_allclose(h, h.T, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.linalg.eigvalsh(h.astype(np.float64)).min() > -1e-5 * np.trace(h), name
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert covariance[q] is covariance[k] and not covariance[q].flags.writeable  # one input, shared
    h = covariance[q].astype(np.float64)
    w = matrix()[:, : len(h)]

    def error(values: np.ndarray) -> float:  # E||(W - Wq) x||² over the measured inputs: tr(ΔW H ΔWᵀ)
        delta = w - values
        return float(np.einsum("ij,jk,ik->", delta, h, delta))

    rtn = quantize_blocks(w, 4, 32, True, search=False).dequantize()
    assert error(quantize_blocks(w, 4, 32, True, hessian=covariance[q]).dequantize()) < 0.9 * error(rtn)
