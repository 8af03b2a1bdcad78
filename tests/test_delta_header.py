"""kv-delta headers under a valid checksum: every crafted edit is refused with seqkv's own
error, or the blob still decodes to exactly the original tensors."""

import copy
import math
import random

import pytest
import torch

from seqkv.core.blob import pack, unpack
from seqkv.core.cache import KVCache, prefill_cache
from seqkv.core.errors import BlobError, SeqkvError
from seqkv.delta import compress_kv, decompress_kv, inspect_delta_blob
from seqkv.delta.api import parse
from seqkv.delta.header import DeltaHeader
from tests.conftest import tiny_llama

IDS = list(range(3, 11))
CASES = 12_000
STABLE = ("tokens", "components", "layers", "dtypes", "raw_kv_bits", "residual", "tokens_part",
          "mode", "max_abs_error", "lossy")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is ~20x faster than two contending for a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bases(llama):
    """Blobs of every kind of predictor, mode and token coding, with their restores."""
    other = tiny_llama()
    other.model.to(torch.bfloat16)
    kv = KVCache.from_dynamic(prefill_cache(other.model, IDS).cache, IDS)
    made = [
        compress_kv(kv, None, "none", tokens="raw"),
        compress_kv(kv, llama, "recompute", tokens="raw"),  # searched: exact, flags only
        compress_kv(kv, llama, "recompute", dtype="fp32", tokens="raw"),  # every stream used
        compress_kv(kv, llama, "recompute", dtype="fp32", tokens="external"),
        compress_kv(kv, llama, "recompute", dtype="fp32"),  # coded tokens
        compress_kv(kv, None, "neighbour", tokens="raw"),
        compress_kv(kv, None, "quantized", tokens="raw"),
        compress_kv(kv, None, "quantized", method="turboquant-mse", bits=2, tokens="raw"),
        compress_kv(kv, None, "none", max_abs_error=0.05, tokens="raw"),
        compress_kv(kv, llama, "recompute", dtype="fp32", max_abs_error=0.01, tokens="raw"),
        compress_kv(kv, None, "none", rel_mse=1e-2, tokens="raw"),
    ]
    out = []
    for blob in made:
        back = decompress_kv(blob, llama, ids=IDS)
        out.append((blob, back, inspect_delta_blob(blob)))
    return out


POOL = [None, True, False, 0, 1, -1, 2, 3, 7, 2**31, 2**63, 10**30, 0.0, -0.0, 0.5, 1.0, 2.5,
        1e308, float("nan"), float("inf"), -float("inf"), "", "x", "0", "1", "2", "12", "bfloat16",
        "float16", "float32", "float8_e4m3fn", "int9", "exact", "lossy", "coded", "raw",
        "external", "recompute", "none", "neighbour", "quantized", "int8", "fp8", "kivi",
        "turboquant-mse", "sdpa", "eager", "loaded", "cast", "legacy", "prefill-v1", "cpu",
        "0" * 32, "f" * 32, "kv-delta", [], [0], [1, 2], [[1, 2, 8, 8], "bfloat16", 2], {},
        {"a": 1}, {"max_abs_error": 0.1}, {"rel_mse": 0.01, "method": "turboquant-mse"},
        {"name": "none", "compute": 0.0}, {"n": 8, "coding": "raw", "hash": "0" * 32, "bits": 0}]


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def _nudge(v, rng):
    """A near miss of a value: off by one, another type of the same number, a changed char."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, -v, v * 2, float(v), str(v), True, 0])
    if isinstance(v, float):
        return rng.choice([v * 2, -v, v / 3, int(v), str(v), math.nextafter(v, math.inf)])
    if isinstance(v, str):
        if not v:
            return "0"
        i = rng.randrange(len(v))
        return rng.choice([v[:i] + chr(ord(v[i]) ^ 1) + v[i + 1:], v[:i], v + v[-1], v.upper()])
    if isinstance(v, list):
        return rng.choice([v[:-1], v + v[-1:] if v else [0], list(reversed(v)), [v]])
    return rng.choice(POOL)


def _edit(header: dict, donors: list[dict], rng: random.Random) -> dict:
    h = copy.deepcopy(header)
    path = rng.choice(list(_paths(h))[1:])
    parent = h
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    roll = rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif roll < 0.2 and isinstance(parent, dict):
        parent[rng.choice(["extra", "n", "name", "build", "dtype", "bits"])] = rng.choice(POOL)
    elif roll < 0.45:
        parent[key] = rng.choice(POOL)
    elif roll < 0.75:
        parent[key] = _nudge(parent[key], rng)
    else:  # the same field from another blob: plausible, but not this blob's
        donor = rng.choice(donors)
        try:
            for k in path:
                donor = donor[k]
        except (KeyError, IndexError, TypeError):
            donor = rng.choice(POOL)
        parent[key] = copy.deepcopy(donor)
    return h


def test_crafted_headers_are_refused_or_decode_exactly(bases, llama):
    rng = random.Random(12)
    donors = []
    for blob, _, _ in bases:
        header = unpack(blob)[0]
        header.pop("sections")
        donors.append(header)
    refused = decoded = 0
    for case in range(CASES):
        i = rng.randrange(len(bases))
        blob, back, info = bases[i]
        header, sections = unpack(blob)
        header.pop("sections")
        for _ in range(1 + (rng.random() < 0.3)):  # one edit, sometimes two
            header = _edit(header, donors, rng)
        edited = pack(header, sections)
        try:
            out = decompress_kv(edited, llama, ids=IDS)
        except SeqkvError:
            refused += 1
            out = None
        else:
            decoded += 1
            assert out.equal_bits(back), (case, header)
        try:
            seen = inspect_delta_blob(edited)
        except SeqkvError:
            continue
        if out is not None:  # what inspect states is what the blob bears out
            assert {k: seen[k] for k in STABLE} == {k: info[k] for k in STABLE}, (case, header)
    print(f"{refused} refused, {decoded} decoded exactly")
    assert refused + decoded == CASES >= 10_000
    assert refused > CASES // 2 and decoded > 100  # both outcomes were exercised


@pytest.mark.parametrize("key, value", [
    ("raw_bits", None), ("components", "many"), ("components", 1.5), ("predictor", None),
    ("model_bits", 5), ("residual_bits", 8), ("lossy", {"max_abs_error": 0.1}),
    ("max_abs_error", 0.1), ("components", True), ("tokens", {"n": 8}),
])
def test_the_issues_examples(bases, llama, key, value):
    """Headers that once crashed the reader (TypeError, ValueError, AttributeError) or passed
    unchecked fields."""
    blob = bases[2][0]
    header, sections = unpack(blob)
    header.pop("sections")
    header[key] = value
    edited = pack(header, sections)
    if key == "model_bits":  # no kv-delta field: ignored; inspect counts the section itself
        assert decompress_kv(edited, llama).equal_bits(bases[2][1])
        assert inspect_delta_blob(edited)["residual"] == bases[2][2]["residual"]
        return
    for read in (inspect_delta_blob, lambda b: decompress_kv(b, llama)):
        with pytest.raises(BlobError, match="corrupt kv-delta header"):
            read(edited)


def test_parse_gives_a_checked_header(bases):
    header, sections = parse(bases[6][0])
    assert isinstance(header, DeltaHeader)
    assert header.predictor["name"] == "quantized"
    assert header.tokens.coding == "raw"
    assert header.residual_bits == 8 * sum(len(sections[k]) for k in
                                           ("side", "models", "words", "raw", "lossy"))
