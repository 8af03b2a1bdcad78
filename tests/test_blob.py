"""Every way a blob can be wrong gives a clear SeqkvError, never wrong tokens."""

import json
import random

import pytest
import torch

from seqkv import compress_tokens, decompress_tokens, inspect_blob
from seqkv.core.blob import MAGIC, pack, unpack, write_atomic
from seqkv.core.errors import BlobError, ModelMismatchError, SeqkvError
from seqkv.core.stepper import PROCEDURE as LOCKSTEP
from seqkv.tokens import compact

from .conftest import memoize_method, tiny_gemma3, tiny_llama

IDS = list(range(3, 60, 2))


@pytest.fixture(scope="module")
def blob(llama) -> bytes:
    """A compact (engine) token blob."""
    return compress_tokens(llama, IDS, chunk_size=10)


@pytest.fixture(scope="module")
def json_blob(llama) -> bytes:
    """A JSON-container token blob (the HF lockstep procedure's)."""
    return compress_tokens(llama, IDS, chunk_size=10, batch=2, procedure=LOCKSTEP)


def test_container_round_trip():
    header, sections = unpack(pack({"kind": "x", "n": 1}, [b"ab", b"", b"\x00" * 5]))
    assert header["kind"] == "x" and sections == [b"ab", b"", b"\x00" * 5]


def test_empty_blob(llama):
    with pytest.raises(BlobError, match="empty"):
        decompress_tokens(llama, b"")


@pytest.mark.parametrize("data", [b"hello world, not a blob", b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
                                  bytes(range(256))])
def test_foreign_blob(llama, data):
    with pytest.raises(BlobError, match="not a seqkv blob"):
        decompress_tokens(llama, data)


@pytest.mark.parametrize("kind", ["blob", "json_blob"])
def test_every_truncation_refused(llama, kind, request):
    blob = request.getfixturevalue(kind)
    for n in range(1, len(blob)):
        with pytest.raises(BlobError):
            inspect_blob(blob[:n])


@pytest.mark.parametrize("kind", ["blob", "json_blob"])
def test_corruption_fuzz_never_gives_wrong_tokens(llama, kind, request):
    blob = request.getfixturevalue(kind)
    rng = random.Random(0)
    for _ in range(150):
        data = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(BlobError):
            decompress_tokens(llama, bytes(data))


def test_future_version_refused(json_blob):
    data = bytearray(json_blob)
    data[len(MAGIC)] = 99
    with pytest.raises(BlobError, match="version 99"):
        inspect_blob(bytes(data))


def test_wrong_model_refused(blob):
    other = tiny_llama(seed=1)
    with pytest.raises(ModelMismatchError, match="weights"):
        decompress_tokens(other, blob)
    with pytest.raises(ModelMismatchError):
        decompress_tokens(tiny_gemma3(), blob)


def test_corrupt_stream_with_valid_checksum_is_caught(llama, blob):
    """A payload damaged before checksumming still fails: the token hash catches it."""
    header, streams = compact.unpack(blob)
    streams[0] = streams[0].copy()
    streams[0][0] ^= 0x10
    bad = compact.pack(header, streams)
    assert inspect_blob(bad)["tokens"] == len(IDS)
    with pytest.raises(BlobError):
        decompress_tokens(llama, bad)


def test_compact_header_is_small(blob):
    info = inspect_blob(blob)
    assert info["format"] == "compact"
    assert info["header_bytes"] <= 64  # magic, engine, model, sizes, hashes, checksum


def test_engine_version_and_flags_checked(llama, blob):
    header, streams = compact.unpack(blob)
    header.engine += 1
    with pytest.raises(BlobError, match="engine version"):
        decompress_tokens(llama, compact.pack(header, streams))
    data = bytearray(blob[:-8])
    data[4] |= 0x80
    with pytest.raises(BlobError, match="flags"):
        inspect_blob(bytes(data) + compact.short_hash(bytes(data)))


def test_numerics_mismatch_refused(llama):
    header, sections = unpack(compress_tokens(llama, IDS, procedure=LOCKSTEP))
    header["numerics"]["device"] = "cuda:NVIDIA H200"
    bad = pack({k: v for k, v in header.items() if k != "sections"}, sections)
    with pytest.raises(ModelMismatchError, match="device"):
        decompress_tokens(llama, bad)


def test_atomic_write(tmp_path):
    target = tmp_path / "x.skv"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.skv"]
    with pytest.raises(SeqkvError, match="no such directory"):
        write_atomic(tmp_path / "missing" / "x.skv", b"")


def test_token_ids_as_tensor(llama):
    blob = compress_tokens(llama, torch.tensor([IDS]))
    assert decompress_tokens(llama, blob) == IDS


_ODD_VALUES = [None, True, -1, 0, 1, 2**40, 1.5, float("nan"), "", "x", [], [1], [[0, 1, 2]],
               {}, {"a": 1}, "0" * 32]


def test_crafted_json_headers_are_refused_or_exact(llama, json_blob, monkeypatch):
    """10,000 checksum-valid edits of the JSON token header (wrong types, missing or unknown
    fields, nested edits): each refused with seqkv's own error or decoded exactly."""
    from seqkv.tokens.codec import TokenCodec

    memoize_method(monkeypatch, TokenCodec, "decode", lambda self, chunks, profile=None, *rest: (
        tuple(c.words.tobytes() for c in chunks), repr(profile), self.batch))
    header, sections = unpack(json_blob)
    header.pop("sections")
    rng = random.Random(11)
    refused = exact = 0
    for _ in range(10_000):
        h = json.loads(json.dumps(header))
        for _ in range(rng.randint(1, 2)):
            target = h
            key = rng.choice([*h.keys(), "extra"])
            if isinstance(h.get(key), dict) and h[key] and rng.random() < 0.5:
                target, key = h[key], rng.choice([*h[key].keys(), "extra"])
            if rng.random() < 0.15:
                target.pop(key, None)
            else:
                target[key] = rng.choice(_ODD_VALUES)
        try:
            crafted = pack(h, sections)
        except ValueError:  # NaN inside JSON is still written; anything json refuses is moot
            continue
        try:
            inspect_blob(crafted)
            assert decompress_tokens(llama, crafted) == IDS
            exact += 1
        except SeqkvError:
            refused += 1
    assert refused > 5_000 and refused + exact >= 9_900
