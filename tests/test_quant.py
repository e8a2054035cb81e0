"""Block quantizers against gguf-py: packed into GGUF block bytes, our dequantize() must equal gguf-py's
dequantizer bit for bit, and round-to-nearest must equal gguf-py's own quantizer byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import edgelm.quant.rows
from edgelm.errors import EdgelmError
from edgelm.export.gguf_blocks import pack_q4_0, pack_q4_1, pack_q4_k, pack_q5_0, pack_q6_k, pack_q8_0
from edgelm.quant.blocks import quantize_blocks, quantize_q4_k, quantize_q6_k

# quantizer and packer for each GGUF type
PLAIN = {
    T.Q8_0: (lambda w, **kw: quantize_blocks(w, 8, 32, True, **kw), pack_q8_0),
    T.Q4_0: (lambda w, **kw: quantize_blocks(w, 4, 32, True, **kw), pack_q4_0),
    T.Q4_1: (lambda w, **kw: quantize_blocks(w, 4, 32, False, **kw), pack_q4_1),
    T.Q5_0: (lambda w, **kw: quantize_blocks(w, 5, 32, True, **kw), pack_q5_0),
}
K_QUANTS = {T.Q4_K: (quantize_q4_k, pack_q4_k), T.Q6_K: (quantize_q6_k, pack_q6_k)}
ALL = {**PLAIN, **K_QUANTS}


# ------------------------------------------------------------------------------------------------ weights

KINDS = ["normal", "outliers", "zero_blocks", "constant_blocks", "tiny"]


def weights(rows: int, cols: int, kind: str, seed: int = 0) -> np.ndarray:
    """A float32 test matrix: Gaussian, with outliers, all-zero or constant blocks, or float16-tiny scales."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.02)
    if kind == "outliers":
        hit = rng.random((rows, cols)) < 0.02
        w[hit] *= np.float32(60)
    elif kind == "zero_blocks":
        w[:, :32] = 0  # a whole block, and a whole super-block for small matrices
        w[::2, cols // 2 : cols // 2 + 16] = 0  # half blocks / one Q6_K sub-block
        if cols >= 512:
            w[:, 256:512] = 0
    elif kind == "constant_blocks":
        w[:, :32] = np.float32(0.25)
        w[1::2, -32:] = np.float32(-0.125)
    elif kind == "tiny":
        w *= np.float32(1e-4)  # scales near and below float16's smallest normal
    return w


def weighted_error(w: np.ndarray, values: np.ndarray, importance: np.ndarray | None = None) -> float:
    diff = (values - w).astype(np.float64)
    return float(((importance if importance is not None else 1.0) * diff * diff).sum())


# ---------------------------------------------------------------------------------------- bit-exactness


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (5, 256), (7, 512)])
@pytest.mark.parametrize("qtype", list(PLAIN), ids=lambda t: t.name)
def test_plain_dequantize_equals_gguf(qtype: T, shape: tuple[int, int], kind: str, search: bool) -> None:
    quantize, pack = PLAIN[qtype]
    result = quantize(weights(*shape, kind), search=search)
    assert np.array_equal(gguf_dequantize(pack(result), qtype), result.dequantize())


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (5, 256), (2, 768)])
@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_k_quant_dequantize_equals_gguf(qtype: T, shape: tuple[int, int], kind: str, search: bool) -> None:
    quantize, pack = K_QUANTS[qtype]
    result = quantize(weights(*shape, kind), search=search)
    assert np.array_equal(gguf_dequantize(pack(result), qtype), result.dequantize())


@pytest.mark.parametrize("kind", [*KINDS, "ties"])
@pytest.mark.parametrize("qtype", list(PLAIN), ids=lambda t: t.name)
def test_round_to_nearest_equals_gguf_quantize(qtype: T, kind: str) -> None:
    if kind == "ties":  # many values at exact halves of a level, and +-peaks of equal size
        w = np.tile(np.arange(-16, 16, dtype=np.float32) / 4, (4, 3))
        w[1] = -w[1]
    else:
        w = weights(9, 256, kind)
    quantize, pack = PLAIN[qtype]
    assert np.array_equal(pack(quantize(w, search=False)), gguf_quantize(w, qtype))


@pytest.mark.parametrize(("qtype", "symmetric"), [(T.Q5_0, True), (T.Q5_1, False)], ids=["Q5_0", "Q5_1"])
def test_other_bit_widths_follow_llama_cpp(qtype: T, symmetric: bool) -> None:
    w = weights(6, 128, "outliers")
    ours = quantize_blocks(w, 5, 32, symmetric, search=False).dequantize()
    assert np.array_equal(ours, gguf_dequantize(gguf_quantize(w, qtype), qtype))


# ------------------------------------------------------------------------------------------ the search


@pytest.mark.parametrize("use_importance", [False, True])
@pytest.mark.parametrize("qtype", list(ALL), ids=lambda t: t.name)
def test_search_is_never_worse_than_round_to_nearest(qtype: T, use_importance: bool) -> None:
    quantize = ALL[qtype][0]
    for seed, kind in enumerate(["normal", "outliers", "zero_blocks"]):
        w = weights(8, 512, kind, seed)
        importance = np.random.default_rng(seed).gamma(0.5, size=512) if use_importance else None
        rtn = weighted_error(w, quantize(w, search=False).dequantize(), importance)
        searched = weighted_error(w, quantize(w, importance=importance, search=True).dequantize(), importance)
        assert searched <= rtn
        if kind == "normal":
            assert searched < 0.97 * rtn  # and it does search


@pytest.mark.parametrize("qtype", list(ALL), ids=lambda t: t.name)
def test_importance_lowers_error_on_heavy_columns(qtype: T) -> None:
    quantize = ALL[qtype][0]
    w = weights(16, 512, "normal", seed=3)
    heavy = np.arange(512) % 16 < 2  # two columns of every 16
    importance = np.where(heavy, 100.0, 1.0)
    plain = quantize(w).dequantize()
    steered = quantize(w, importance=importance).dequantize()
    assert weighted_error(w[:, heavy], steered[:, heavy]) < 0.9 * weighted_error(w[:, heavy], plain[:, heavy])


# ------------------------------------------------------------------------------------------- the arrays


def test_array_types_and_ranges() -> None:
    w = weights(3, 512, "outliers")
    for bits, symmetric in [(8, True), (4, True), (4, False), (2, False)]:
        r = quantize_blocks(w, bits, 64, symmetric)
        assert r.codes.dtype == np.uint8 and r.codes.shape == w.shape and r.codes.max() < 2**bits
        assert r.scales.dtype == np.float32 and r.scales.shape == (3, 8)
        assert np.array_equal(r.scales.astype(np.float16).astype(np.float32), r.scales)
        assert (r.zeros is None) == symmetric
        if not symmetric:
            assert r.zeros.shape == (3, 8)
            assert np.array_equal(r.zeros.astype(np.float16).astype(np.float32), r.zeros)
    k4 = quantize_q4_k(w)
    assert k4.codes.max() <= 15 and k4.scales.max() <= 63 and k4.mins.max() <= 63
    assert k4.scales.shape == k4.mins.shape == (3, 16) and k4.d.shape == k4.dmin.shape == (3, 2)
    k6 = quantize_q6_k(w)
    assert k6.codes.max() <= 63 and k6.scales.dtype == np.int8
    assert k6.scales.shape == (3, 32) and k6.d.shape == (3, 2)
    for d in (k4.d, k4.dmin, k6.d):
        assert d.dtype == np.float32 and np.array_equal(d.astype(np.float16).astype(np.float32), d)


def test_chunks_of_rows_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    w = weights(7, 512, "outliers")
    whole = {t: ALL[t][0](w) for t in ALL}
    monkeypatch.setattr(edgelm.quant.rows, "CHUNK_VALUES", 1000)  # two rows per chunk
    for qtype, (quantize, pack) in ALL.items():
        assert np.array_equal(pack(quantize(w)), pack(whole[qtype]))


def test_threads_change_nothing() -> None:
    """Rows quantized on 1, 3 or every core's thread give the same bytes; a bad count is refused."""
    w = weights(37, 512, "outliers")
    for quantize, pack in ALL.values():
        one = pack(quantize(w, threads=1))
        assert np.array_equal(pack(quantize(w, threads=3)), one) and np.array_equal(pack(quantize(w)), one)
        with pytest.raises(EdgelmError, match="threads=0 must be an integer >= 1"):
            quantize(w, threads=0)


def test_bad_input_raises() -> None:
    w = weights(2, 96, "normal")
    with pytest.raises(EdgelmError, match="multiple of 64"):
        quantize_blocks(w, 4, 64, True)
    with pytest.raises(EdgelmError, match="multiple of 256"):
        quantize_q4_k(w)
    with pytest.raises(EdgelmError, match="multiple of 256"):
        quantize_q6_k(weights(2, 384, "normal"))
    with pytest.raises(EdgelmError, match="2-D"):
        quantize_blocks(w[0], 4, 32, True)
    with pytest.raises(EdgelmError, match="2-D"):
        quantize_q6_k(np.zeros((0, 256), np.float32))
    with pytest.raises(EdgelmError, match="bits"):
        quantize_blocks(w, 3.5, 32, True)  # type: ignore[arg-type]
    with pytest.raises(EdgelmError, match="block"):
        quantize_blocks(w, 4, 0, True)
    with pytest.raises(EdgelmError, match="importance"):
        quantize_blocks(w, 4, 32, True, importance=np.ones(32))
    with pytest.raises(EdgelmError, match="importance"):
        quantize_q4_k(weights(1, 256, "normal"), importance=-np.ones(256))
    with pytest.raises(EdgelmError, match="NaN"):
        quantize_blocks(np.where(w > 0, np.nan, w), 8, 32, True)
    with pytest.raises(EdgelmError, match="float16"):
        quantize_blocks(np.full((1, 32), 1e5, np.float32), 4, 32, False)
