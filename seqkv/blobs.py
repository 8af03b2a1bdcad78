"""Every kind of blob seqkv writes, told apart in one place: ``inspect_blob``.

This module stands above the tiers, so no tier needs to know another's format: a compact
token blob (the integer engine's, read without torch), a JSON token blob (the HF lockstep
procedure's) or a kv-delta blob (the delta tier's), each described from its header alone.
"""

from __future__ import annotations

from .core.blob import unpack
from .core.errors import BlobError
from .tokens import compact


def inspect_blob(blob: bytes) -> dict:
    """What a blob holds, read from its header alone (no model needed)."""
    if compact.is_token_blob(blob):
        return compact.describe(blob)
    header, sections = unpack(blob)
    kind = header.get("kind") if isinstance(header, dict) else None
    if kind == "kv-delta":
        from .delta import inspect_delta_blob

        return inspect_delta_blob(blob)
    if kind == "tokens":
        from .tokens import json_blob

        return json_blob.describe(blob, header, sections)
    raise BlobError(f"not a seqkv blob of a known kind (kind {kind!r})")
