"""The embedded default backend: one SQLite file in WAL mode.

Every write is one ``BEGIN IMMEDIATE`` transaction (one writer at a time across processes),
committed with ``synchronous=FULL``: a process killed before ``COMMIT`` leaves no trace, and
concurrent writers serialize instead of losing updates. A writer that finds the store locked
retries with backoff for up to ``busy`` seconds, then raises StoreBusyError ("store busy,
retry"). Writers hold the lock only to read and write records (no model work), for
milliseconds. Readers see a consistent snapshot without blocking writers (WAL).

A file that is not a SQLite database is refused without being touched; with ``create=False``
(reading commands) a missing file is refused, never created.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .backend import StoreBusyError, StoreError, busy_timeout, retry_busy

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS records (
    ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, kind, key)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS generations (ns TEXT PRIMARY KEY, gen INTEGER NOT NULL)",
]
# the change log: the generation at which each record last changed (written or deleted), so
# a reader catches up by reading what changed since the generation it holds
_LOG_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS changes (
    ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, gen INTEGER NOT NULL,
    PRIMARY KEY (ns, kind, key)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS changes_gen ON changes (ns, gen)",
]
_TABLES = {"records", "generations"}


SYNC_ENV = "SEQKV_SQLITE_SYNC"


def sync_mode() -> str:
    """FULL (default): a commit is on disk (fsync) before put returns, so it survives a power
    loss. NORMAL ($SEQKV_SQLITE_SYNC=normal): the WAL is fsynced at checkpoints only, a commit
    survives the process being killed but the last ones may be lost with the machine."""
    mode = os.environ.get(SYNC_ENV, "full").upper()
    if mode not in ("FULL", "NORMAL"):
        raise StoreError(f"${SYNC_ENV} must be full or normal, not {mode.lower()!r}")
    return mode


class _SqliteTxn:
    def __init__(self, con: sqlite3.Connection, ns: str, logged: bool = True) -> None:
        self.con, self.ns, self.logged = con, ns, logged
        row = con.execute("SELECT gen FROM generations WHERE ns = ?", (ns,)).fetchone()
        self.generation = int(row[0]) if row else 0

    def read_kind(self, kind: str) -> dict[str, bytes]:
        rows = self.con.execute("SELECT key, value FROM records WHERE ns = ? AND kind = ?",
                                (self.ns, kind))
        return {k: bytes(v) for k, v in rows}

    def read(self, kind: str, key: str) -> bytes | None:
        row = self.con.execute("SELECT value FROM records WHERE ns = ? AND kind = ? AND key = ?",
                               (self.ns, kind, key)).fetchone()
        return bytes(row[0]) if row else None

    def changes(self, since: int, kinds: tuple[str, ...]
                ) -> dict[str, dict[str, bytes | None]] | None:
        """Records of ``kinds`` changed after generation ``since``: key -> value, or None
        where the record was deleted (None: no change log, read the namespace whole)."""
        if not self.logged:
            return None
        out: dict[str, dict[str, bytes | None]] = {k: {} for k in kinds}
        rows = self.con.execute(
            "SELECT c.kind, c.key, r.value FROM changes c LEFT JOIN records r "
            "ON r.ns = c.ns AND r.kind = c.kind AND r.key = c.key WHERE c.ns = ? AND c.gen > ?",
            (self.ns, since))
        for kind, key, value in rows:
            if kind in out:
                out[kind][key] = None if value is None else bytes(value)
        return out

    def _log(self, kind: str, key: str) -> None:
        if self.logged:
            self.con.execute("INSERT OR REPLACE INTO changes VALUES (?, ?, ?, ?)",
                             (self.ns, kind, key, self.generation + 1))

    def put(self, kind: str, key: str, value: bytes) -> None:
        self.con.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                         (self.ns, kind, key, value))
        self._log(kind, key)

    def delete(self, kind: str, key: str) -> None:
        self.con.execute("DELETE FROM records WHERE ns = ? AND kind = ? AND key = ?",
                         (self.ns, kind, key))
        self._log(kind, key)


def _busy(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and (
        "locked" in str(e) or "busy" in str(e))


def _uri(p: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(p.resolve().as_posix())}?mode={mode}"


def check_sqlite_file(path: str, create: bool) -> Path:
    """Refuse, before anything is opened or loaded, a path that cannot be a store.

    The file is probed through SQLite (a read-only connection), never with open(): closing any
    other descriptor of a database file drops every POSIX lock this process holds on it, so
    another process could then delete the WAL under our open connections and lose commits."""
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"is a directory, not a store: {path}")
    if not p.exists():
        if not create:
            raise StoreError(f"no seqkv store at {path}")
        if not p.parent.is_dir():
            raise StoreError(f"no such directory: {p.parent}")
        return p
    if not os.access(p, os.R_OK):
        raise StoreError(f"cannot read {path}: permission denied")
    try:
        probe = sqlite3.connect(_uri(p, "ro"), uri=True, timeout=0.05)
        try:
            probe.execute("PRAGMA schema_version").fetchone()
        finally:
            probe.close()
    except sqlite3.DatabaseError as e:
        if not _busy(e):  # a locked database is a database
            raise StoreError(f"not a seqkv store (not a SQLite file): {path}") from e
    return p


class _WriterQueue:
    """Writers of one store file wait for each other in the kernel (``flock`` on a sidecar
    file, ``STORE-seqkv-lock``), not by polling SQLite's lock: a waiter costs no CPU (the
    holder is not starved of it on a small machine) and wakes as soon as the holder is done,
    so writers take turns instead of the one that just committed winning again. SQLite's own
    lock is still taken after it (other programs, and seqkv versions without the queue, are
    serialized as before). The sidecar is never the database file itself: closing a second
    descriptor of that would drop this process's POSIX locks on it."""

    def __init__(self, db_path: Path) -> None:
        self.path = str(db_path) + "-seqkv-lock"
        self.fd: int | None = None

    def acquire(self, bound: float) -> bool:
        """Take the queue's lock within ``bound`` seconds (StoreBusyError otherwise); False
        where no sidecar can be created (a read-only directory): SQLite's lock alone then."""
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        # wait in the kernel, in a helper thread so that the wait stays bounded
        fd, state, guard, done = self.fd, {"got": False, "gone": False}, threading.Lock(), \
            threading.Event()

        def take() -> None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with guard:
                state["got"] = not state["gone"]
            if not state["got"]:  # abandoned: this descriptor is the helper's to release
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            done.set()

        threading.Thread(target=take, name="seqkv-writer-queue", daemon=True).start()
        done.wait(bound)
        with guard:
            if not state["got"]:
                state["gone"] = True
                self.fd = None  # the next attempt opens a descriptor of its own
                raise StoreBusyError(f"store busy, retry: other writers held the store for "
                                     f"{bound:g} s")
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SqliteBackend:
    def __init__(self, path: str, create: bool = True, busy: float | None = None) -> None:
        p = check_sqlite_file(path, create)
        self.logged = True  # the change log is kept (False only for a read-only old store)
        self.url = str(p)
        self.busy = busy_timeout() if busy is None else busy
        self.queue = _WriterQueue(p)
        try:
            target = str(p) if create else _uri(p, "rw")
            # no SQLite busy handler (its sleeps grow to 100 ms): retry_busy polls instead
            self.con = sqlite3.connect(target, timeout=0, isolation_level=None,
                                       check_same_thread=False, uri=not create)
            retry_busy(lambda: self._init(create), _busy, self.busy, "opening the store")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"not a seqkv store (SQLite: {e}): {path}") from e

    def _tables(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT name FROM sqlite_master")}

    def _init(self, create: bool) -> None:
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={sync_mode()}")
        tables = self._tables()
        if _TABLES <= tables:
            if "changes" not in tables:  # a store of an earlier seqkv: add the change log
                try:
                    self._create(_LOG_SCHEMA)
                except sqlite3.OperationalError as e:
                    if _busy(e):
                        raise
                    self.logged = False  # a read-only file: readers re-read it whole
            return
        if not create:
            raise StoreError(f"not a seqkv store (no seqkv tables): {self.url}")
        self._create(_SCHEMA + _LOG_SCHEMA)

    def _create(self, schema: list[str]) -> None:
        # one transaction: processes creating the same new store at once never see half a
        # schema, and another application's database (tables, none of ours) is not touched
        self.con.execute("BEGIN IMMEDIATE")
        try:
            tables = self._tables()
            if tables and not _TABLES <= tables:
                raise StoreError(f"not a seqkv store (no seqkv tables): {self.url}")
            for statement in schema:
                self.con.execute(statement)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    @contextmanager
    def transaction(self, ns: str, since: int = -1) -> Iterator[_SqliteTxn]:
        """(``since``, the generation the writer holds, is for backends that read what
        changed with the lock; here ``txn.changes`` is one local query.)"""
        queued = self.queue.acquire(self.busy)
        try:
            with self._transaction(ns) as txn:
                yield txn
        finally:
            if queued:
                self.queue.release()

    @contextmanager
    def _transaction(self, ns: str) -> Iterator[_SqliteTxn]:
        retry_busy(lambda: self.con.execute("BEGIN IMMEDIATE"), _busy, self.busy,
                   "the SQLite write lock")
        try:
            txn = _SqliteTxn(self.con, ns, self.logged)
            yield txn
            self.con.execute("INSERT OR REPLACE INTO generations VALUES (?, ?)",
                             (ns, txn.generation + 1))
            self._commit()
        except BaseException:
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
            raise

    def _commit(self) -> None:
        self.con.execute("COMMIT")

    def snapshot(self, ns: str, kinds: tuple[str, ...]) -> tuple[int, dict[str, dict[str, bytes]]]:
        def read() -> tuple[int, dict[str, dict[str, bytes]]]:
            self.con.execute("BEGIN")
            try:
                txn = _SqliteTxn(self.con, ns)
                return txn.generation, {k: txn.read_kind(k) for k in kinds}
            finally:
                self.con.execute("COMMIT")

        return retry_busy(read, _busy, self.busy, "a consistent read")

    def changes(self, ns: str, since: int, kinds: tuple[str, ...]
                ) -> tuple[int, dict[str, dict[str, bytes | None]]] | None:
        """One consistent read: the generation, and what changed after ``since`` (None when
        this store keeps no change log)."""
        if not self.logged:
            return None

        def read() -> tuple[int, dict[str, dict[str, bytes | None]]]:
            self.con.execute("BEGIN")
            try:
                txn = _SqliteTxn(self.con, ns)
                return txn.generation, txn.changes(since, kinds)  # type: ignore[return-value]
            finally:
                self.con.execute("COMMIT")

        return retry_busy(read, _busy, self.busy, "a consistent read")

    def generation(self, ns: str) -> int:
        row = self.con.execute("SELECT gen FROM generations WHERE ns = ?", (ns,)).fetchone()
        return int(row[0]) if row else 0

    def read(self, ns: str, kind: str, key: str) -> bytes | None:
        return _SqliteTxn(self.con, ns).read(kind, key)

    def namespaces(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT DISTINCT ns FROM records ORDER BY ns")]

    def close(self) -> None:
        self.con.close()
        self.queue.close()
