"""seqkv: KV caches stored as sequences (arXiv 2604.15356).

The entry points load lazily (PEP 562), so `import seqkv` and `seqkv --help` do not pay for
torch and transformers until a function that needs them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BlobError, ModelMismatchError, SeqkvError

__version__ = "0.1.0"

_LAZY = {
    "compress_cache": "compress",
    "compress_text": "compress",
    "compress_tokens": "compress",
    "decompress_text": "compress",
    "decompress_tokens": "compress",
    "inspect_blob": "compress",
    "restore_cache": "compress",
    "from_objects": "models",
    "load_model": "models",
    "token_blob": None,
}

__all__ = [
    "BlobError",
    "ModelMismatchError",
    "SeqkvError",
    "compress_cache",
    "compress_text",
    "compress_tokens",
    "decompress_text",
    "decompress_tokens",
    "from_objects",
    "inspect_blob",
    "load_model",
    "restore_cache",
    "token_blob",
]

if TYPE_CHECKING:
    from . import token_blob
    from .compress import (
        compress_cache,
        compress_text,
        compress_tokens,
        decompress_text,
        decompress_tokens,
        inspect_blob,
        restore_cache,
    )
    from .models import from_objects, load_model


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'seqkv' has no attribute {name!r}")
    import importlib

    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{module}", __name__), name)
