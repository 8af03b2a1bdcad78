"""What a store backend is: namespaced, checksummed records and atomic write transactions.

A backend holds opaque records ``(namespace, kind, key) -> bytes`` (each a checksummed
``seqkv.blob`` container, so corruption is caught on read) and one generation counter per
namespace, bumped by every committed write. Writers run inside ``transaction(ns)``: exclusive
per store, all-or-nothing (a writer killed before commit leaves nothing behind), and they see
the latest committed state. Readers take a consistent ``snapshot``.

The backends: :mod:`.sqlite` (one file, WAL, the embedded default) and :mod:`.redis`
(a store shared by many machines); :mod:`.registry` picks one from a URL's scheme.
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


class StoreUnavailableError(StoreError):
    """The store's backend failed or could not be reached (a lost Redis): retry later."""


class NoStoreError(StoreError):
    """No store at that location yet (creating one needs the model: its fingerprint)."""


class ModelNeededError(StoreError):
    """The operation needs the store's model and this Store was opened without one (a
    server that has not loaded it yet waits for it and retries)."""


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

    def transaction(self, ns: str, since: int = -1) -> AbstractContextManager[Txn]: ...
    def snapshot(
        self, ns: str, kinds: tuple[str, ...]
    ) -> tuple[int, dict[str, dict[str, bytes]]]: ...
    def generation(self, ns: str) -> int: ...
    def read(self, ns: str, kind: str, key: str) -> bytes | None: ...
    def namespaces(self) -> list[str]: ...
    def close(self) -> None: ...


BUSY_ENV = "SEQKV_STORE_BUSY_TIMEOUT"
T = TypeVar("T")


def busy_timeout() -> float:
    """How long a writer keeps retrying a busy store (s): $SEQKV_STORE_BUSY_TIMEOUT or 30."""
    try:
        return float(os.environ.get(BUSY_ENV, "30"))
    except ValueError as e:
        raise StoreError(f"${BUSY_ENV} must be a number of seconds") from e


LOG_MAX_DEFAULT = 10_000


def log_max_setting(env: str) -> int:
    """How many change-log entries a namespace keeps, from the environment variable ``env``
    (each backend names its own): 10,000 if unset, 0 for no limit."""
    try:
        n = int(os.environ.get(env, str(LOG_MAX_DEFAULT)))
    except ValueError as e:
        raise StoreError(f"${env} must be a whole number of entries") from e
    if n < 0:
        raise StoreError(f"${env} must be 0 (no limit) or more")
    return n


# A waiting writer polls the lock every 0.25-2 ms (with jitter): writers hold it for about a
# millisecond (no model work), so a long backoff would only let whoever just committed take it
# again and again (one writer starving the others) and push put latency's tail to the backoff.
LOCK_POLL = (0.00025, 0.002)


def retry_busy(attempt: Callable[[], T], is_busy: Callable[[BaseException], bool],
               bound: float, what: str, poll: tuple[float, float] = LOCK_POLL) -> T:
    """Run ``attempt`` until it does not fail as busy: backoff with jitter (``poll``: first
    and longest delay, doubling) for at most ``bound`` seconds, then StoreBusyError."""
    deadline = time.monotonic() + bound
    delay = poll[0]
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
            delay = min(2 * delay, poll[1])
