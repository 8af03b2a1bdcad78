"""seqkv: KV caches stored as sequences (arXiv 2604.15356).

Each tier's entry points, from one import (ARCHITECTURE.md draws the layers):

- a model: ``load_model``, ``from_objects``; a cache by prefill: ``prefill_cache``;
- the token tier (a cache as its coded tokens): ``compress_cache`` / ``restore_cache``,
  ``compress_text`` / ``decompress_text``, ``compress_tokens`` / ``decompress_tokens``;
- the delta tier (the tensors themselves, as residuals): ``compress_kv`` / ``decompress_kv``
  of a ``KVCache`` (``load_cachefile`` / ``save_cachefile`` read and write cache files);
- the store (sessions sharing prefixes in a trie): ``Store``;
- per-vector quantizers: ``get_quantizer``, ``get_kv_quantizer``;
- any blob's header: ``inspect_blob``.

They load lazily (PEP 562): ``import seqkv`` and ``seqkv --help`` do not pay for torch and
transformers until an entry point is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .core.errors import BlobError, ModelMismatchError, SeqkvError
from .core.version import __version__

_LAZY = {
    "load_model": "core.models",
    "from_objects": "core.models",
    "prefill_cache": "core.cache",
    "KVCache": "core.cache",
    "load_cachefile": "core.cache",
    "save_cachefile": "core.cache",
    "compress_cache": "tokens.api",
    "restore_cache": "tokens.api",
    "compress_text": "tokens.api",
    "decompress_text": "tokens.api",
    "compress_tokens": "tokens.api",
    "decompress_tokens": "tokens.api",
    "compress_kv": "delta.api",
    "decompress_kv": "delta.api",
    "Store": "store",
    "get_quantizer": "quant",
    "get_kv_quantizer": "quant",
    "inspect_blob": "blobs",
}

__all__ = [
    "BlobError",
    "ModelMismatchError",
    "SeqkvError",
    "__version__",
    "load_model",
    "from_objects",
    "prefill_cache",
    "KVCache",
    "load_cachefile",
    "save_cachefile",
    "compress_cache",
    "restore_cache",
    "compress_text",
    "decompress_text",
    "compress_tokens",
    "decompress_tokens",
    "compress_kv",
    "decompress_kv",
    "Store",
    "get_quantizer",
    "get_kv_quantizer",
    "inspect_blob",
]

if TYPE_CHECKING:
    from .blobs import inspect_blob
    from .core.cache import KVCache, load_cachefile, prefill_cache, save_cachefile
    from .core.models import from_objects, load_model
    from .delta.api import compress_kv, decompress_kv
    from .quant import get_kv_quantizer, get_quantizer
    from .store import Store
    from .tokens.api import (
        compress_cache,
        compress_text,
        compress_tokens,
        decompress_text,
        decompress_tokens,
        restore_cache,
    )


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'seqkv' has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
