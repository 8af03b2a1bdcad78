"""Per-vector quantizers: theory checks, exact bit accounting, packing, error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqkv.core.errors import BlobError, SeqkvError
from seqkv.quant import (
    FP8,
    KIVI,
    Int8,
    QuantizedTensor,
    TurboQuantMSE,
    TurboQuantOutlier,
    TurboQuantProd,
    get_kv_quantizer,
    get_quantizer,
    lloyd_max_codebook,
    packing,
)


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum(-1).mean())


# --- Lloyd-Max codebooks -------------------------------------------------------------------


@pytest.mark.parametrize("bits,expected", [(1, 0.3609), (2, 0.1160), (3, 0.0340), (4, 0.00931)])
def test_codebook_optimum_at_d128_matches_known_values(bits, expected):
    assert lloyd_max_codebook(128, bits).vector_mse == pytest.approx(expected, rel=2e-3)


def sphere_coordinate_pdf(x: np.ndarray, dim: int) -> np.ndarray:
    """Exact density of one coordinate of a uniform point on S^{dim-1}: the reference the
    codebooks (built on a normalized grid) are checked against."""
    lognorm = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):  # x = +-1: density 0 (d > 3) or a pole (d = 2)
        return np.exp(lognorm + 0.5 * (dim - 3) * np.log1p(-x * x))


def test_codebook_is_a_lloyd_max_fixed_point():
    cb = lloyd_max_codebook(128, 3)
    x = np.linspace(-1, 1, 400001)
    f = sphere_coordinate_pdf(x, 128)
    assert np.trapezoid(f, x) == pytest.approx(1.0, rel=1e-6)
    edges = [-1.0, *cb.boundaries, 1.0]
    for c, lo, hi in zip(cb.centroids, edges[:-1], edges[1:], strict=True):
        m = (x >= lo) & (x < hi)
        assert np.trapezoid(x[m] * f[m], x[m]) / np.trapezoid(f[m], x[m]) == pytest.approx(
            c, abs=1e-4
        )


# --- TurboQuant against theory -------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turboquant_mse_within_1pct_of_lloyd_max_optimum(bits):
    x = unit(20000, 128, seed=bits)
    q = TurboQuantMSE(bits, seed=7)
    got = mse(x, q.dequantize(q.quantize(x)))
    assert abs(got / lloyd_max_codebook(128, bits).vector_mse - 1) < 0.01


@pytest.mark.parametrize("bits,dvar", [(2, 0.54), (3, 0.18), (4, 0.052)])
def test_turboquant_prod_is_unbiased_with_known_variance(bits, dvar):
    d, n, seeds = 128, 3000, 10
    slopes, dvars = [], []
    for s in range(seeds):
        x, y = unit(n, d, seed=100 + s), unit(n, d, seed=500 + s)
        q = TurboQuantProd(bits, seed=s)
        est = (q.dequantize(q.quantize(x)) * y).sum(-1).double()
        true = (x * y).sum(-1).double()
        slopes.append(float((est * true).sum() / (true * true).sum()))
        dvars.append(d * float((est - true).var()))
    slopes = np.array(slopes)
    se = slopes.std(ddof=1) / math.sqrt(seeds)
    assert abs(slopes.mean() - 1) < 3 * se + 1e-3
    assert np.mean(dvars) == pytest.approx(dvar, rel=0.1)


def test_turboquant_mse_is_biased_so_the_prod_check_has_teeth():
    x, y = unit(4000, 128, 1), unit(4000, 128, 2)
    q = TurboQuantMSE(1)
    est, true = (q.dequantize(q.quantize(x)) * y).sum(-1), (x * y).sum(-1)
    assert float((est * true).sum() / (true * true).sum()) < 0.75  # 2/pi shrinkage


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
def test_any_head_dim_and_exact_bits(d, cls):
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(d)) * 7.0  # fixed: 15 vectors
    q = cls(3)
    qt = q.quantize(x)
    xh = q.dequantize(qt)
    assert xh.shape == x.shape and xh.dtype == x.dtype
    n = 15
    code_bits = n * d * (3 if cls is TurboQuantMSE else 3)  # prod: 2-bit codes + 1 sign bit
    norm_bits = n * 32 * (1 if cls is TurboQuantMSE else 2)
    assert qt.bits == code_bits + norm_bits + 64
    rel = float(((x - xh) ** 2).sum() / (x**2).sum())
    assert rel < (0.05 if cls is TurboQuantMSE else 0.2)


def test_scale_invariance_and_zero_vector():
    q = TurboQuantMSE(2)
    x = unit(64, 128)
    a = q.dequantize(q.quantize(x))
    b = q.dequantize(q.quantize(x * 1e4)) / 1e4
    assert torch.allclose(a, b, atol=1e-5)
    z = torch.zeros(2, 128)
    assert torch.equal(q.dequantize(q.quantize(z)), z)


def test_separate_key_and_value_bits():
    kv = get_kv_quantizer("turboquant-mse", key_bits=4, value_bits=2)
    x = torch.randn(1, 2, 16, 64)
    qk, qv = kv.key.quantize(x), kv.value.quantize(x)
    assert qk.bits - qv.bits == 2 * 32 * 64  # 2 extra bits per component
    assert mse(x, kv.key.dequantize(qk)) < mse(x, kv.value.dequantize(qv)) / 3


def test_outlier_split_bits_and_that_it_helps_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 256, 128, generator=g)
    x[..., :8] *= 20.0  # a few strong channels, as in real keys
    q = TurboQuantOutlier(2.5)
    qt = q.quantize(x)
    n = 4 * 256
    # 64 channels at 3 bits, 64 at 2, two float32 norms per vector, a 128-bit mask per head, seed
    assert qt.bits == n * (64 * 3 + 64 * 2) + n * 64 + 4 * 128 + 64
    got = mse(x.reshape(-1, 128), q.dequantize(qt).reshape(-1, 128))
    plain2 = TurboQuantMSE(2)
    base = mse(x.reshape(-1, 128), plain2.dequantize(plain2.quantize(x)).reshape(-1, 128))
    assert got < base
    paper = TurboQuantOutlier(2.5, outlier_channels=32).quantize(x)
    assert paper.bits == n * (32 * 3 + 96 * 2) + n * 64 + 4 * 128 + 64
    assert get_quantizer("turboquant-mse", 3.5) == TurboQuantOutlier(3.5)


# --- KIVI, FP8, int8 ------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_kivi_recent_window_is_exact_and_bits_are_exact(axis):
    x = torch.randn(2, 3, 100, 64)
    q = KIVI(bits=2, axis=axis, group_size=32, residual=10)
    qt = q.quantize(x)
    xh = q.dequantize(qt)
    quantized = 64 if axis == "channel" else 90  # keys: whole 32-token groups only
    assert torch.equal(xh[..., quantized:, :], x[..., quantized:, :])
    assert not torch.equal(xh[..., :quantized, :], x[..., :quantized, :])
    groups = 6 * (64 * quantized // 32 if axis == "channel" else quantized * 64 // 32)
    expected = 6 * quantized * 64 * 2 + groups * 2 * 16 + 6 * (100 - quantized) * 64 * 32
    assert qt.bits == expected
    assert float(((x - xh) ** 2).mean()) < 0.15


def test_kivi_key_axis_beats_token_axis_on_channel_outliers():
    x = torch.randn(1, 1, 128, 64)
    x[..., 3] += 30.0
    k, v = KIVI(2, "channel"), KIVI(2, "token")
    assert mse(x[0, 0], k.dequantize(k.quantize(x))[0, 0]) < mse(
        x[0, 0], v.dequantize(v.quantize(x))[0, 0]
    )


def test_fp8_and_int8_round_trip_and_bits():
    x = torch.randn(4, 8, 128, dtype=torch.bfloat16)
    for q, side in ((FP8(), 32), (FP8("vector"), 32 * 32), (Int8(), 32 * 32)):
        qt = q.quantize(x)
        assert qt.bits == x.numel() * 8 + side
        xh = q.dequantize(qt)
        assert xh.dtype == torch.bfloat16
        assert float(((xh.float() - x.float()) ** 2).mean()) < 2e-3
    # values already on the e4m3 grid (scale 1) survive exactly
    grid = torch.tensor([448.0, -448.0, 1.0, 0.5, 0.0, -2.0, 3.0, 240.0])
    assert torch.equal(FP8().dequantize(FP8().quantize(grid)), grid)


# --- packing, composition, serialization, errors -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8), rows=st.integers(1, 4), m=st.integers(1, 70), seed=st.integers(0, 999)
)
def test_pack_round_trip(bits, rows, m, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, m), generator=g)
    p = packing.pack(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (rows, packing.packed_row_bytes(m, bits))
    assert torch.equal(packing.unpack(p, bits, m).long(), codes)
    vals = torch.randn(1 << bits, dtype=torch.float64)
    table, width = packing.lookup_table(vals, bits)
    if width:
        assert torch.equal(packing.decode_with_table(p, table, width, m), vals[codes])


def test_codes_are_truly_packed():
    qt = TurboQuantMSE(3).quantize(torch.randn(10, 128))
    assert qt.data["codes"].dtype == torch.uint8 and qt.data["codes"].shape == (10, 48)


@pytest.mark.parametrize("name,bits", [("turboquant-mse", 3), ("turboquant-prod", 3), ("kivi", 2)])
def test_serialization_keeps_bits_and_dequantization(name, bits):
    x = torch.randn(2, 40, 64)
    q = get_quantizer(name, bits)
    qt = q.quantize(x)
    back = QuantizedTensor.from_bytes(qt.to_bytes())
    assert back.bits == qt.bits and back.shape == qt.shape
    assert torch.equal(q.dequantize(back), q.dequantize(qt))


def test_foreign_and_corrupt_inputs_raise_seqkv_error():
    q = TurboQuantMSE(2)
    with pytest.raises(SeqkvError):
        q.quantize(torch.arange(10))  # integer tensor
    with pytest.raises(SeqkvError):
        q.quantize(torch.zeros(3, 0))
    with pytest.raises(SeqkvError):
        KIVI().quantize(torch.randn(64))  # no token axis
    with pytest.raises(SeqkvError):
        q.dequantize(FP8().quantize(torch.randn(4, 64)))  # another method's tensor
    qt = q.quantize(torch.randn(4, 64))
    qt.data["codes"] = qt.data["codes"][:, :-1]  # truncated codes
    with pytest.raises(SeqkvError):
        q.dequantize(qt)
    with pytest.raises(BlobError):
        QuantizedTensor.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(SeqkvError):
        get_quantizer("nope", 3)
    with pytest.raises(SeqkvError):
        TurboQuantProd(bits=0)
