"""The Probabilistic Language Trie store (arXiv 2604.15356 §3, arXiv 2604.06228).

Many sessions' token sequences as paths of one radix trie per namespace, each edge range-coded
under the model given its full prefix, so shared prefixes are stored once; KV checkpoints at
chosen nodes (prior-guided or LRU under a byte budget); SQLite (default) or Redis persistence.

    trie.py         the radix trie (pure: match / insert / split / remove)
    coding.py       the canonical per-path context, an edge's rANS stream, and the one seam
                    to the model (encode_edges / decode_edges, a batch of edges at a time)
    records.py      the record codec: raw and coded edges, sessions, meta; a trie from records
    compaction.py   pending raw edges coded later and swapped in by compare-and-swap
    backend.py      the backend protocol; sqlite.py, redis.py; registry.py: URL scheme -> backend
    checkpoints.py  the checkpoint manager: KV checkpoints at nodes under a byte budget
    policies.py     which nodes keep one: the Policy interface, LRU and prior-guided
    store.py        the facade: put / get / delete / stats / nearest / compact
"""

from .backend import (
    META_NS,
    ModelNeededError,
    NoSessionError,
    NoStoreError,
    SessionExistsError,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
)
from .registry import open_backend

__all__ = ["META_NS", "ModelNeededError", "NoSessionError", "NoStoreError", "PutResult",
           "SessionExistsError", "Store", "StoreBusyError", "StoreCorruptError", "StoreError",
           "StoreUnavailableError", "open_backend"]

_LAZY = {"PutResult": ".store", "Store": ".store", "StoreCorruptError": ".records"}


def __getattr__(name: str):
    """The model-side names load on first use (torch), so that opening a backend to check a
    path, and `seqkv --help`, stay light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
