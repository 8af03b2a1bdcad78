"""Which backend a store URL names: a small registry keyed by URL scheme.

    PATH (no scheme)                      the SQLite file at PATH (sqlite.py)
    redis://HOST:PORT/N[#PREFIX]          Redis (redis.py); also rediss:// and unix://

A backend module registers its scheme(s) here with a factory; ``open_backend`` parses the URL
once and refuses, with one line, anything that looks like a URL but is not a registered one
(``redis:/host``, ``rdis://host``, ``http://...``): a typo never silently becomes a SQLite
file named after it. This module sits above ``backend.py`` (the interface the backends import),
so there is no import cycle; backends are imported only when their scheme is opened (Redis's
client package is not loaded for a SQLite store).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from .backend import Backend, StoreError

SQLITE = "sqlite"  # a plain path: the embedded default
# scheme -> "module:factory" (imported on first use) or a factory callable
_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    SQLITE: "seqkv.store.sqlite:SqliteBackend",
    "redis": "seqkv.store.redis:RedisBackend",
    "rediss": "seqkv.store.redis:RedisBackend",
    "unix": "seqkv.store.redis:RedisBackend",
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def register_backend(scheme: str, factory: str | Callable[..., Backend]) -> None:
    """Make ``scheme://...`` open a store through ``factory(url, create=...)``."""
    _REGISTRY[scheme.lower()] = factory


def schemes() -> list[str]:
    return sorted(s for s in _REGISTRY if s != SQLITE)


def backend_kind(db: str) -> str:
    """The registered scheme ``db`` selects (``"sqlite"`` for a plain path), or StoreError
    naming the problem: an unknown scheme, or a known one without ``//``."""
    if not isinstance(db, str) or not db:
        raise StoreError("no store given (a SQLite path or redis://HOST:PORT/N)")
    m = _SCHEME.match(db)
    if m is None or len(m.group(1)) == 1:  # a plain path (or a drive letter)
        return SQLITE
    scheme = m.group(1).lower()
    if scheme not in _REGISTRY or scheme == SQLITE:
        raise StoreError(f"unknown store URL scheme {scheme!r} in {db!r} (a SQLite path, or "
                         f"one of {', '.join(s + '://' for s in schemes())}; a file name "
                         "with a colon: write ./NAME)")
    if not db[m.end():].startswith("//"):
        raise StoreError(f"malformed store URL {db!r} (expected {scheme}://HOST:PORT/N)")
    return scheme


def _factory(kind: str) -> Callable[..., Backend]:
    f = _REGISTRY[kind]
    if isinstance(f, str):
        module, _, name = f.partition(":")
        f = getattr(importlib.import_module(module), name)
    return f


def open_backend(db: str, create: bool = True) -> Backend:
    """The backend ``db`` names. With ``create=False`` a SQLite file that does not exist is
    refused, not created."""
    return _factory(backend_kind(db))(db, create=create)
