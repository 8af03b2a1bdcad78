"""The compact token blob: what the engine's numerics rule needs, and nothing else.

    magic        b"SKV2"                          4 bytes
    flags        bit 0: text recipe and text hash follow; other bits must be 0
    engine       the integer engine's version (seqkv.engine.ENGINE_ID)
    model        first 8 bytes of the engine's integer-weights digest
    tokens       varint
    chunk_size   varint; chunks = ceil(tokens / chunk_size), all full but the last
    words        one varint per chunk: the 32-bit words of its rANS stream
    token hash   8 bytes: blake2b of the ids, checked after decoding
    [text]       varint head, varint tail, varint patch length, patch (JSON), 8-byte text hash
    streams      the chunks' words, little-endian u32
    checksum     8 bytes: blake2b of everything above

A 1-chunk blob of the default model has a 36-byte header and checksum (45 with text), so a
short session pays for its tokens, not its metadata. Every field is checked on read; any
inconsistency is a BlobError, never another exception.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import BlobError
from ..core.textcodec import TextRecipe

MAGIC = b"SKV2"
_TEXT = 1
_DIGEST = 8
_MAX_VARINT = 1 << 40


def short_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


def ids_hash(ids) -> bytes:
    return short_hash(np.asarray(ids, dtype="<i8").tobytes())


def text_hash(text: str) -> bytes:
    return short_hash(text.encode("utf-8", "surrogatepass"))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, end: int) -> None:
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise BlobError("truncated or corrupt token blob")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 42:
                raise BlobError("corrupt token blob (varint)")
        if value > _MAX_VARINT:
            raise BlobError("corrupt token blob (field out of range)")
        return value


@dataclass
class TokenHeader:
    engine: int
    model: bytes  # 8 bytes
    n_tokens: int
    chunk_size: int
    words: list[int]  # per chunk
    token_hash: bytes
    text: TextRecipe | None = None
    text_hash: bytes | None = None

    @property
    def chunk_lengths(self) -> list[int]:
        n, c = self.n_tokens, self.chunk_size
        return [min(c, n - s) for s in range(0, n, c)]


def pack(header: TokenHeader, streams: list[np.ndarray]) -> bytes:
    parts = [MAGIC, bytes([_TEXT if header.text is not None else 0, header.engine]),
             header.model, _varint(header.n_tokens), _varint(header.chunk_size)]
    parts += [_varint(int(w.size)) for w in streams]
    parts.append(header.token_hash)
    if header.text is not None:
        patch = json.dumps(header.text.patch, ensure_ascii=False,
                           separators=(",", ":")).encode() if header.text.patch else b""
        parts += [_varint(header.text.head), _varint(header.text.tail), _varint(len(patch)),
                  patch, header.text_hash]
    parts += [np.asarray(w, dtype="<u4").tobytes() for w in streams]
    body = b"".join(parts)
    return body + short_hash(body)


def is_token_blob(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def _patch(raw: bytes) -> list[list]:
    if not raw:
        return []
    try:
        patch = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BlobError("corrupt token blob (text patch)") from e
    ok = isinstance(patch, list) and all(
        isinstance(p, list) and len(p) == 3 and type(p[0]) is int and type(p[1]) is int
        and 0 <= p[0] <= p[1] and isinstance(p[2], str) for p in patch
    )
    if not ok or any(a[1] > b[0] for a, b in zip(patch, patch[1:], strict=False)):
        raise BlobError("corrupt token blob (text patch)")
    return patch


def unpack(data: bytes) -> tuple[TokenHeader, list[np.ndarray]]:
    """Header and streams of a compact token blob, every field checked."""
    if len(data) < len(MAGIC) + 2 + _DIGEST * 3:
        raise BlobError("truncated token blob")
    if short_hash(data[:-_DIGEST]) != data[-_DIGEST:]:
        raise BlobError("corrupt or truncated blob (checksum mismatch)")
    r = _Reader(data, len(data) - _DIGEST)
    r.take(len(MAGIC))
    flags, engine = r.take(2)
    if flags & ~_TEXT:
        raise BlobError(f"token blob has unknown flags {flags:#x} (written by a newer seqkv?)")
    model = r.take(_DIGEST)
    n_tokens, chunk_size = r.varint(), r.varint()
    if n_tokens < 1 or chunk_size < 1:
        raise BlobError("corrupt token blob (token count)")
    n_chunks = math.ceil(n_tokens / chunk_size)
    if n_chunks > r.end:  # every chunk needs at least a byte of its word count
        raise BlobError("corrupt token blob (chunk table)")
    words = [r.varint() for _ in range(n_chunks)]
    header = TokenHeader(engine, model, n_tokens, chunk_size, words, r.take(_DIGEST))
    if flags & _TEXT:
        head, tail = r.varint(), r.varint()
        patch = _patch(r.take(r.varint()))
        if head + tail > n_tokens:
            raise BlobError("corrupt token blob (text recipe)")
        header.text = TextRecipe(head, tail, patch)
        header.text_hash = r.take(_DIGEST)
    if r.end - r.pos != 4 * sum(words):
        raise BlobError("corrupt token blob (stream lengths)")
    streams = []
    for n in words:
        streams.append(np.frombuffer(r.take(4 * n), dtype="<u4").astype(np.uint32))
    return header, streams


def describe(data: bytes) -> dict:
    """What a compact blob holds, from its header alone (no model, no torch)."""
    from ..core.packaged import model_name, packaged_kv_bits

    header, streams = unpack(data)
    n = header.n_tokens
    bits = 32 * sum(int(w.size) for w in streams)
    name = model_name(header.model)
    kv = packaged_kv_bits(name, n)
    return {
        "kind": "tokens",
        "format": "compact",
        "tokens": n,
        "bits": bits,
        "bytes": len(data),
        "header_bytes": len(data) - bits // 8,
        "bits_per_token": bits / n,
        "file_bits_per_token": 8 * len(data) / n,
        "model": name,
        "engine": header.engine,
        "engine_weights": header.model.hex(),
        "chunks": len(streams),
        "chunk_size": header.chunk_size,
        "coder": "ans",
        "text": header.text is not None,
        "fp16_kv_bits": kv[0] if kv else None,
        "turboquant3_kv_bits": kv[1] if kv else None,
        "ratio_vs_fp16": kv[0] / bits if kv else None,
        "ratio_vs_turboquant3": kv[1] / bits if kv else None,
    }
