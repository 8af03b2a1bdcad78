"""What a store backend is: namespaced, checksummed records and atomic write transactions.

A backend holds opaque records ``(namespace, kind, key) -> bytes`` (each a checksummed
``seqkv.blob`` container, so corruption is caught on read) and one generation counter per
namespace, bumped by every committed write. Writers run inside ``transaction(ns)``: exclusive
per store, all-or-nothing (a writer killed before commit leaves nothing behind), and they see
the latest committed state. Readers take a consistent ``snapshot``.

The backends: :mod:`.sqlite` (one file, WAL, the embedded default) and :mod:`.redis`
(a store shared by many machines).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from ..core.errors import SeqkvError


class StoreError(SeqkvError):
    """A store operation was refused (unknown session, bad URL, busy store)."""


META_NS = ""  # store-wide records live in the empty namespace, which users cannot name


class SessionExistsError(StoreError):
    """A put of a session id that exists, without replace."""


class NoSessionError(StoreError):
    """The namespace holds no session of that id."""


class StoreBusyError(StoreError):
    """Other writers held the store for longer than the busy bound: retry later."""


class StoreConflict(Exception):
    """Another writer committed first (optimistic backends): retry the operation."""


class Txn(Protocol):
    generation: int

    def read_kind(self, kind: str) -> dict[str, bytes]: ...
    def read(self, kind: str, key: str) -> bytes | None: ...
    def put(self, kind: str, key: str, value: bytes) -> None: ...
    def delete(self, kind: str, key: str) -> None: ...


class Backend(Protocol):
    url: str

    def transaction(self, ns: str) -> AbstractContextManager[Txn]: ...
    def snapshot(
        self, ns: str, kinds: tuple[str, ...]
    ) -> tuple[int, dict[str, dict[str, bytes]]]: ...
    def generation(self, ns: str) -> int: ...
    def read(self, ns: str, kind: str, key: str) -> bytes | None: ...
    def namespaces(self) -> list[str]: ...
    def close(self) -> None: ...


PAUSE_ENV = "SEQKV_STORE_PAUSE_BEFORE_COMMIT"
BUSY_ENV = "SEQKV_STORE_BUSY_TIMEOUT"
T = TypeVar("T")


def busy_timeout() -> float:
    """How long a writer keeps retrying a busy store (s): $SEQKV_STORE_BUSY_TIMEOUT or 30."""
    try:
        return float(os.environ.get(BUSY_ENV, "30"))
    except ValueError as e:
        raise StoreError(f"${BUSY_ENV} must be a number of seconds") from e


def retry_busy(attempt: Callable[[], T], is_busy: Callable[[BaseException], bool],
               bound: float, what: str) -> T:
    """Run ``attempt`` until it does not fail as busy: exponential backoff with jitter (5 ms
    doubling to 250 ms) for at most ``bound`` seconds, then StoreBusyError."""
    deadline = time.monotonic() + bound
    delay = 0.005
    while True:
        try:
            return attempt()
        except Exception as e:
            if not is_busy(e):
                raise
            if time.monotonic() + delay > deadline:
                raise StoreBusyError(f"store busy, retry: {what} stayed locked by other "
                                     f"writers for {bound:g} s") from e
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, 0.25)


def pause_before_commit() -> None:
    """Test hook: with $SEQKV_STORE_PAUSE_BEFORE_COMMIT=FILE, a writer creates FILE just before
    committing and then sleeps, so a test can kill -9 it in the middle of a write."""
    marker = os.environ.get(PAUSE_ENV)
    if marker:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)


def is_redis_url(db: str) -> bool:
    return db.startswith(("redis://", "rediss://", "unix://"))


def open_backend(db: str, create: bool = True) -> Backend:
    """``redis://HOST:PORT/N`` selects Redis; anything else is a SQLite file path. With
    ``create=False`` a SQLite file that does not exist is refused, not created."""
    if is_redis_url(db):
        from .redis import RedisBackend

        return RedisBackend(db)
    from .sqlite import SqliteBackend

    return SqliteBackend(db, create=create)
