"""The JSON token blob: what the HF lockstep procedure writes, read field by field.

The blob is the container of seqkv.core.blob (a JSON header and sections, checksummed); its
header names the model's fingerprint and the numerics profile the probabilities were
computed under (device, dtype, attention path, group size, CPU threads), and each section is
one chunk's coded words. Every header field is checked against ``JSON_TOKEN_HEADER`` before
any is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.blob import unpack
from ..core.errors import BlobError
from .codec import CodedChunk

KIND = "tokens"


@dataclass
class TokenBlob:
    """A parsed token blob: its header and coded chunks, not yet decoded."""

    header: dict
    chunks: list[CodedChunk]

    @classmethod
    def parse(cls, blob: bytes) -> TokenBlob:
        return cls.from_parts(*unpack(blob))

    @classmethod
    def from_parts(cls, header: dict, sections: list[bytes]) -> TokenBlob:
        """From a container already unpacked (and so already checksum-verified); every
        header field is checked against ``JSON_TOKEN_HEADER`` first."""
        if not isinstance(header, dict) or header.get("kind") != KIND:
            kind = header.get("kind") if isinstance(header, dict) else None
            raise BlobError(f"not a token blob (kind {kind!r})")
        check_json_header(header)
        lengths = header["chunks"]
        if (len(lengths) != len(sections) or sum(lengths) != header["tokens"]
                or max(lengths) > header["chunk_size"] or any(len(x) % 4 for x in sections)):
            raise BlobError("corrupt blob (chunk table)")
        chunks = [
            CodedChunk(n, np.frombuffer(s, dtype="<u4").astype(np.uint32))
            for n, s in zip(lengths, sections, strict=True)
        ]
        return cls(header, chunks)

    @property
    def n_tokens(self) -> int:
        return int(self.header["tokens"])

    @property
    def bits(self) -> int:
        return sum(c.bits for c in self.chunks)


def _is_int(x, low: int = 0) -> bool:
    return type(x) is int and x >= low


def _is_str(x) -> bool:
    return isinstance(x, str)


def _is_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and x >= 0


def _is_recipe(x) -> bool:
    return x is None or (
        isinstance(x, dict) and set(x) <= {"head", "tail", "patch"}
        and _is_int(x.get("head", 0)) and _is_int(x.get("tail", 0))
        and isinstance(x.get("patch", []), list)
        and all(isinstance(p, list) and len(p) == 3 and _is_int(p[0]) and _is_int(p[1])
                and p[0] <= p[1] and _is_str(p[2]) for p in x.get("patch", [])))


# The JSON token header (the HF lockstep procedure's blobs): field -> check, all required
# except the optional ones. Read through check_json_header only.
JSON_TOKEN_HEADER = {
    "kind": lambda x: x == KIND,
    "tokens": lambda x: _is_int(x, 1),
    "chunk_size": lambda x: _is_int(x, 1),
    "coder": lambda x: x in ("range", "ans"),
    "chunks": lambda x: isinstance(x, list) and len(x) > 0 and all(_is_int(n, 1) for n in x),
    "token_hash": lambda x: _is_str(x) and len(x) == 32,
    "model": lambda x: isinstance(x, dict) and all(
        _is_str(x.get(k)) for k in ("name", "weights", "tokenizer", "dtype")),
    "numerics": lambda x: isinstance(x, dict) and all(
        _is_str(x.get(k)) for k in ("procedure", "device", "dtype", "attn"))
        and _is_int(x.get("batch"), 1) and ("threads" not in x or _is_int(x["threads"])),
}
_OPTIONAL = {
    "seqkv": _is_str,
    "torch": _is_str,
    "model_bits": lambda x: x is None or _is_number(x),
    "kv": lambda x: isinstance(x, dict) and _is_int(x.get("fp16_bits"))
        and _is_int(x.get("turboquant3_bits")),
    "text": _is_recipe,
    "sections": lambda x: isinstance(x, list),
}


def check_json_header(header: dict) -> None:
    """Refuse a JSON token header with any missing, unknown or ill-typed field."""
    for key, ok in JSON_TOKEN_HEADER.items():
        if key not in header or not ok(header[key]):
            raise BlobError(f"corrupt blob header (field {key!r})")
    for key, value in header.items():
        if key not in JSON_TOKEN_HEADER and (key not in _OPTIONAL or not _OPTIONAL[key](value)):
            raise BlobError(f"corrupt blob header (field {key!r})")
    text = header.get("text")
    if text is not None and text.get("head", 0) + text.get("tail", 0) > header["tokens"]:
        raise BlobError("corrupt blob header (field 'text')")


def describe(blob: bytes, header: dict, sections: list[bytes]) -> dict:
    """What a JSON token blob holds, from its (unpacked) header and sections alone."""
    parsed = TokenBlob.from_parts(header, sections)
    h = parsed.header
    kv = h.get("kv") or {}
    n, bits = parsed.n_tokens, parsed.bits
    return {
        "kind": h["kind"],
        "format": "json",
        "tokens": n,
        "bits": bits,
        "bytes": len(blob),
        "bits_per_token": bits / n if n else 0.0,
        "file_bits_per_token": 8 * len(blob) / n if n else 0.0,
        "model_bits": h.get("model_bits"),
        "coder_overhead": (bits / h["model_bits"] - 1) if h.get("model_bits") else None,
        "model": h["model"]["name"],
        "fingerprint": h["model"],
        "numerics": h["numerics"],
        "chunks": len(parsed.chunks),
        "chunk_size": h["chunk_size"],
        "coder": h.get("coder"),
        "text": h.get("text") is not None,
        "fp16_kv_bits": kv.get("fp16_bits"),
        "turboquant3_kv_bits": kv.get("turboquant3_bits"),
        "ratio_vs_fp16": kv["fp16_bits"] / bits if bits and kv else None,
        "ratio_vs_turboquant3": kv["turboquant3_bits"] / bits if bits and kv else None,
    }
