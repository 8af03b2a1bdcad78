"""The delta tier: bit-exact round trips, corrupt streams, NaN/Inf, empty caches, lossy bounds."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqkv.core.blob import pack, unpack
from seqkv.core.cache import KVCache, prefill_cache
from seqkv.core.errors import BlobError, ModelMismatchError, SeqkvError
from seqkv.delta import compress_kv, decompress_kv, inspect_delta_blob
from seqkv.delta import residual_coding as rc
from seqkv.delta.api import parse
from tests.conftest import tiny_llama

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
IDS = list(range(3, 27))


@pytest.fixture(scope="module")
def caches(llama, gemma3):
    return {name: (lm, prefill_cache(lm.model, IDS).cache)
            for name, lm in (("llama", llama), ("gemma3", gemma3))}


def specials(kv: KVCache) -> KVCache:
    """NaN, +-Inf and -0 planted in the first and last layers."""
    k, v = kv.keys[0], kv.values[-1]
    k[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]).to(k.dtype)
    v[0, -1, -1, -1] = float("nan")
    return kv


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("predictor", ["none", "neighbour", "recompute", "quantized"])
def test_exact_round_trip(caches, arch, dtype, predictor):
    lm, cache = caches[arch]
    kv = specials(KVCache.from_dynamic(cache, IDS, dtype))
    blob = compress_kv(kv, lm, predictor, tokens="raw")
    assert decompress_kv(blob, lm).equal_bits(kv)
    assert inspect_delta_blob(blob)["predictor"]["name"] == predictor


def test_cheap_predictors_cost_no_compute_and_charge_side_info(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    q = inspect_delta_blob(compress_kv(kv, None, "quantized", method="turboquant-mse", bits=4,
                                       tokens="raw"))
    assert q["predictor"]["compute"] == 0.0 and q["predictor"]["bits"] == 4
    assert q["residual"]["side_bits"] >= 4 * kv.numel  # the copy's codes are charged
    n = inspect_delta_blob(compress_kv(kv, None, "neighbour", tokens="raw"))
    assert n["predictor"]["compute"] == 0.0 and n["residual"]["side_bits"] == 0
    with pytest.raises(SeqkvError, match="exact mode only"):
        compress_kv(kv, None, "neighbour", max_abs_error=0.1)


def test_engine_numerics_make_the_residual_vanish(caches):
    """Recomputed in the cache's own dtype and attention path, the prediction is the cache."""
    lm, _ = caches["llama"]
    engine = lm.variant("bfloat16", "sdpa")
    kv = KVCache.from_dynamic(prefill_cache(engine, IDS).cache, IDS)
    fp32 = inspect_delta_blob(compress_kv(kv, lm, "recompute", dtype="fp32", tokens="raw"))
    blob = compress_kv(kv, lm, "recompute", dtype="bf16", attn="sdpa", tokens="raw")
    same = inspect_delta_blob(blob)
    assert same["predictor"]["numerics"]["attn"] == "sdpa"
    assert same["predictor"]["build"] == "cast"  # lm.variant casts RoPE's buffers too
    # Every residual is zero: each tensor is flagged so, nothing else is stored.
    assert unpack(blob)[0]["stream_bytes"][:3] == [0, 0, 0]
    assert set(parse(blob)[0].coded) == {2}
    assert same["residual"]["bits"] < fp32["residual"]["bits"] / 4
    assert decompress_kv(blob, lm).equal_bits(kv)
    with pytest.raises(SeqkvError, match="dtype"):
        compress_kv(kv, lm, "recompute", dtype="int8")
    with pytest.raises(SeqkvError, match="attention"):
        compress_kv(kv, lm, "recompute", attn="magic")


def test_external_tokens(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    blob = compress_kv(kv, lm, "recompute", tokens="external")
    assert inspect_delta_blob(blob)["tokens_part"]["bits"] == 0
    assert decompress_kv(blob, lm, ids=IDS).equal_bits(kv)
    with pytest.raises(SeqkvError, match="stored elsewhere"):
        decompress_kv(blob, lm)
    with pytest.raises(BlobError, match="hash"):
        decompress_kv(blob, lm, ids=IDS[::-1])


def test_recompute_of_own_numerics_is_nearly_free(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    info = inspect_delta_blob(compress_kv(kv, lm, "recompute", tokens="raw"))
    assert info["residual"]["bits_per_component"] < 1.0
    assert info["mode"] == "exact" and info["predictor"]["compute"] == 1.0


def test_other_numerics_round_trip_and_cost(caches):
    """A cache 'computed elsewhere' (bf16 model) restored by the fp32 recomputation."""
    lm, _ = caches["llama"]
    other = tiny_llama()
    other.model.to(torch.bfloat16)
    kv = KVCache.from_dynamic(prefill_cache(other.model, IDS).cache, IDS)
    blob = compress_kv(kv, lm, "recompute", tokens="raw")
    assert decompress_kv(blob, lm).equal_bits(kv)
    none = inspect_delta_blob(compress_kv(kv, None, "none", tokens="raw"))
    assert inspect_delta_blob(blob)["residual"]["bits"] < none["residual"]["bits"]


def test_coded_tokens_and_inspect_contract(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    blob = compress_kv(kv, lm, "recompute")
    assert decompress_kv(blob, lm).equal_bits(kv)
    info = inspect_delta_blob(blob)
    assert info["kind"] == "kv-delta" and info["tokens_part"]["coding"] == "coded"
    for part in ("residual", "tokens_part"):
        assert {"bits_per_component", "bits_per_token"} <= set(info[part])
    n = info["tokens"]
    assert info["residual"]["bits_per_token"] == pytest.approx(info["residual"]["bits"] / n)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_empty_caches(caches, arch):
    lm, cache = caches[arch]
    full = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    empty = KVCache([], [k[:, :, :0] for k in full.keys], [v[:, :, :0] for v in full.values])
    for predictor in ("none", "recompute"):
        blob = compress_kv(empty, lm, predictor)
        assert decompress_kv(blob, lm).equal_bits(empty)
    no_layers = KVCache(IDS, [], [])
    assert decompress_kv(compress_kv(no_layers, None, "none"), None).equal_bits(no_layers)


def _tamper(blob: bytes, section: int, fn) -> bytes:
    header, sections = unpack(blob)
    sections[section] = fn(sections[section])
    header.pop("sections")
    return pack(header, sections)


def test_corrupted_residual_streams(caches):
    lm, _ = caches["llama"]
    other = tiny_llama()
    other.model.to(torch.bfloat16)  # other numerics than fp32: every stream is non-empty
    kv = KVCache.from_dynamic(prefill_cache(other.model, IDS).cache, IDS)
    blob = compress_kv(kv, lm, "recompute", dtype="fp32", tokens="raw")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    with pytest.raises(BlobError):
        decompress_kv(bytes(flipped), lm)
    with pytest.raises(BlobError):
        decompress_kv(blob[:-10], lm)
    # A consistent container around a damaged stream: caught by the decoder or the hash.
    for section in (2, 3, 4):
        for fn in (lambda s: bytes([s[0] ^ 1]) + s[1:] if s else b"\x01",
                   lambda s: s[:-4], lambda s: s + b"\x00\x00\x00\x00"):
            assert unpack(blob)[1][section]
            with pytest.raises(BlobError):
                decompress_kv(_tamper(blob, section, fn), lm)


@pytest.mark.parametrize("how", ["quantized-side", "rel-mse-payload"])
def test_corrupted_side_info_and_lossy_payloads(caches, how):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    if how == "quantized-side":
        blob, section = compress_kv(kv, None, "quantized", tokens="raw"), 1
    else:
        blob, section = compress_kv(kv, None, "none", rel_mse=1e-2, tokens="raw"), 5
    assert unpack(blob)[1][section]
    for fn in (lambda s: s[:7] + bytes([s[7] ^ 0x10]) + s[8:], lambda s: s[:-3],
               lambda s: s + b"\x00"):
        with pytest.raises(BlobError):
            decompress_kv(_tamper(blob, section, fn), None)


def test_other_model_or_numerics_refused(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    blob = compress_kv(kv, lm, "recompute", tokens="raw")
    with pytest.raises(ModelMismatchError):
        decompress_kv(blob, tiny_llama(seed=1))
    with pytest.raises(SeqkvError):
        decompress_kv(blob, None)
    header, sections = unpack(blob)
    header.pop("sections")
    header["prediction_hash"] = "0" * 32  # as if this machine computed another prediction
    with pytest.raises(ModelMismatchError, match="prediction differs"):
        decompress_kv(pack(header, sections), lm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn],
                         ids=str)
@pytest.mark.parametrize("bound", [1e-3, 0.05])
def test_lossy_bound(caches, dtype, bound):
    lm, cache = caches["gemma3"]
    kv = specials(KVCache.from_dynamic(cache, IDS, dtype))
    for predictor in ("none", "recompute"):
        blob = compress_kv(kv, lm, predictor, max_abs_error=bound, tokens="raw")
        back = decompress_kv(blob, lm)
        for a, b in zip(back.tensors, kv.tensors, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            af, bf = a.float(), b.float()
            same_special = (torch.isnan(af) & torch.isnan(bf)) | (~torch.isfinite(bf) & (af == bf))
            assert bool((((af - bf).abs() <= bound) | same_special).all())
    with pytest.raises(SeqkvError):
        compress_kv(kv, lm, "recompute", max_abs_error=-1.0)


def _rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b.float())
    err = torch.where(fin, a.double() - b.double(), 0.0).pow(2).sum()
    return float(err / (torch.where(fin, b.double(), 0.0) ** 2).sum().clamp_min(1e-300))


@pytest.mark.parametrize("predictor", ["none", "recompute"])
@pytest.mark.parametrize("target", [1e-2, 1e-4])
def test_rel_mse_bound_with_per_vector_quantizers(caches, predictor, target):
    lm, _ = caches["llama"]
    other = tiny_llama()
    other.model.to(torch.bfloat16)
    kv = specials(KVCache.from_dynamic(prefill_cache(other.model, IDS).cache, IDS))
    blob = compress_kv(kv, lm, predictor, rel_mse=target, tokens="raw")
    back = decompress_kv(blob, lm)
    for a, b in zip(back.tensors, kv.tensors, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel_mse(a, b) <= target
        nonfinite = ~torch.isfinite(b.float())
        assert torch.equal(a[nonfinite].float().isnan(), b[nonfinite].float().isnan())
    info = inspect_delta_blob(blob)
    assert info["lossy"] == {"rel_mse": target, "method": "turboquant-mse"}
    if predictor == "recompute" or target >= 1e-2:  # head_dim 8: norms cost 4 bits/component
        assert info["residual"]["bits_per_component"] < 16


def test_rel_mse_finer_than_the_dtype_falls_back_to_exact(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    blob = compress_kv(kv, None, "none", rel_mse=1e-12, tokens="raw")
    assert decompress_kv(blob, None).equal_bits(kv)
    assert all(parse(blob)[0].coded)
    with pytest.raises(SeqkvError, match="one bound"):
        compress_kv(kv, None, "none", rel_mse=1e-2, max_abs_error=0.1)


def test_ordered_mapping_exhaustive_16_bit():
    pats = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        x = pats.view(dtype)
        o = rc.to_ordered(x)
        assert torch.equal(rc.from_ordered(o, dtype, x.shape).view(torch.int16), pats)
        finite = torch.isfinite(x.float()).numpy()
        xs, os_ = x.float().numpy()[finite], o[finite]
        order = np.argsort(os_, kind="stable")
        assert (np.diff(xs[order]) >= 0).all()  # integer order is float order
        assert len(np.unique(o)) == len(o)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(1 << 33), 1 << 33), min_size=0, max_size=300))
def test_residual_symbols_round_trip(values):
    r = np.asarray(values, dtype=np.int64)
    sym, off, nbits = rc.residual_symbols(r)
    assert sym.size == 0 or (sym.min() >= 0 and sym.max() < rc.N_SYMBOLS)
    data = rc.pack_bits(off, nbits)
    back = rc.unpack_bits(data, rc.raw_bit_counts(sym))
    assert np.array_equal(rc.symbols_to_residuals(sym, back), r)
    coded = rc.encode_blocks([sym[: len(sym) // 2], sym[len(sym) // 2:]])
    blocks = rc.decode_blocks(coded, [len(sym) // 2, len(sym) - len(sym) // 2])
    assert np.array_equal(np.concatenate(blocks), sym)


def test_recompute_in_another_dtype(caches):
    """The bf16 prediction of a bf16 cache: the predictor's dtype is recorded and checked."""
    lm, _ = caches["llama"]
    other = tiny_llama()
    other.model.to(torch.bfloat16)
    kv = KVCache.from_dynamic(prefill_cache(other.model, IDS).cache, IDS)
    blob = compress_kv(kv, lm, "recompute", dtype="bfloat16", tokens="raw")
    info = inspect_delta_blob(blob)
    assert info["predictor"]["dtype"] == "bfloat16"
    assert info["predictor"]["numerics"]["dtype"] == "bfloat16"
    assert decompress_kv(blob, lm).equal_bits(kv)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 9), st.integers(1, 6),
       st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1,
                max_size=8))
def test_context_blocks_round_trip(heads, t, d, pool):
    """Blocks by head and prediction exponent: split then join is the identity."""
    shape = (1, heads, t, d)
    n = heads * t * d
    pred = torch.tensor([pool[i % len(pool)] for i in range(n)], dtype=torch.float32)
    keys, n_blocks = rc.block_keys(shape, pred.reshape(shape))
    assert keys.min(initial=0) >= 0 and keys.max(initial=0) < n_blocks
    values = np.arange(n, dtype=np.int64) * 7 - 3
    parts = rc.split_blocks(values, keys, n_blocks)
    assert [len(p) for p in parts] == rc.block_sizes(keys, n_blocks)
    assert np.array_equal(rc.join_blocks(parts, keys), values)


def test_restore_retries_a_prediction_that_did_not_repeat(caches, monkeypatch):
    """A recompute that comes out different once (kernels that do not repeat) is retried."""
    from seqkv.delta.predictors import Recompute

    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    blob = compress_kv(kv, lm, "recompute", tokens="raw")
    real, calls = Recompute.predict, []

    def flaky(self, *args):
        pred = real(self, *args)
        calls.append(1)
        if len(calls) == 1:
            pred[0] = pred[0].clone()
            pred[0].view(-1)[0] += 1.0
        return pred

    monkeypatch.setattr(Recompute, "predict", flaky)
    assert decompress_kv(blob, lm).equal_bits(kv) and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(Recompute, "predict", lambda self, *a: [t + 1 for t in real(self, *a)])
    with pytest.raises(ModelMismatchError, match="3 attempts"):
        decompress_kv(blob, lm)
    def drifting(self, *args):  # a different prediction on every run
        calls.append(1)
        return [t + len(calls) for t in real(self, *args)]

    monkeypatch.setattr(Recompute, "predict", drifting)
    with pytest.raises(SeqkvError, match="not repeatable"):
        compress_kv(kv, lm, "recompute", tokens="raw")


def test_corrupt_header_layout_and_flags(caches):
    lm, cache = caches["llama"]
    kv = KVCache.from_dynamic(cache, IDS, torch.bfloat16)
    blob = compress_kv(kv, None, "none", tokens="raw")
    header, sections = unpack(blob)
    header.pop("sections")
    assert len(header["layout"]) < len(kv.tensors)  # run-length coded: layers repeat
    for key, value in (("layout", [[[1, 2, 24, 8], "bfloat16", -1]]),
                       ("layout", [[[1, 2, 24, 8], "int9", 6]]),
                       ("coded", "1" * (len(kv.tensors) - 1)), ("coded", "7" * len(kv.tensors))):
        with pytest.raises(BlobError, match="corrupt kv-delta header"):
            decompress_kv(pack({**header, key: value}, sections), None)
