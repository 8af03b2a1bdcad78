"""The token tier: a KV cache stored as its token ids, entropy-coded under the model itself.

``compress_cache`` / ``restore_cache`` (a DynamicCache), ``compress_text`` /
``decompress_text`` and ``compress_tokens`` / ``decompress_tokens`` (api.py). The blob is
compact (compact.py) under the integer engine, JSON (json_blob.py) under the HF lockstep
procedure (codec.py). The entry points load lazily: the CLI reads compact headers through
this package without importing torch.
"""

from __future__ import annotations

from importlib import import_module

_API = ("compress_cache", "restore_cache", "compress_text", "decompress_text", "text_of",
        "compress_tokens", "decompress_tokens")

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'seqkv.tokens' has no attribute {name!r}")
    return getattr(import_module(".api", __name__), name)
