"""The embedded default backend: one SQLite file in WAL mode.

Every write is one ``BEGIN IMMEDIATE`` transaction (one writer at a time across processes),
committed with ``synchronous=FULL``: a process killed before ``COMMIT`` leaves no trace, and
concurrent writers serialize instead of losing updates. A writer that finds the store locked
retries with backoff for up to ``busy`` seconds, then raises StoreBusyError ("store busy,
retry"). Writers hold the lock only to read and write records (no model work), for
milliseconds. Readers see a consistent snapshot without blocking writers (WAL).

The change log (table ``changes``: each record changed, with the generation that last
changed it) lets a reader catch up by reading only what changed since the generation it holds.
It keeps its newest ``SEQKV_SQLITE_LOG_MAX`` entries (10,000; 0: no limit), as the Redis
backend does: the commit that goes past that drops the oldest generations' entries (a
generation is kept whole or not at all) and raises the namespace's floor to the newest
generation dropped, in the commit's own transaction; a reader or writer older than the floor
reads the namespace whole instead (it cannot tell what it missed), so one that fell behind
never misses a change.

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

from .backend import StoreBusyError, StoreError, busy_timeout, log_max_setting, retry_busy

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS records (
    ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, kind, key)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS generations (ns TEXT PRIMARY KEY, gen INTEGER NOT NULL)",
]
# the change log: the generation at which each record last changed (written or deleted), so
# a reader catches up by reading what changed since the generation it holds; and per
# namespace, the log's floor (the newest generation trimmed away) and how many entries it
# holds (kept by each commit, so that trimming never counts the whole log; NULL: count it)
_LOG_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS changes (
    ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, gen INTEGER NOT NULL,
    PRIMARY KEY (ns, kind, key)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS changes_gen ON changes (ns, gen)",
    """CREATE TABLE IF NOT EXISTS changes_floor (
    ns TEXT PRIMARY KEY, floor INTEGER NOT NULL, entries INTEGER)""",
]
_TABLES = {"records", "generations"}


SYNC_ENV = "SEQKV_SQLITE_SYNC"
LOG_MAX_ENV = "SEQKV_SQLITE_LOG_MAX"


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
        self.added = 0  # change-log entries this transaction created (not moved forward)

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
        where the record was deleted (None: no change log, or it was trimmed past ``since``:
        read the namespace whole)."""
        if not self.logged or since < self._floor()[0]:
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

    def _floor(self) -> tuple[int, int | None]:
        """The change log's floor and entry count (None: not kept yet, count them)."""
        try:
            row = self.con.execute("SELECT floor, entries FROM changes_floor WHERE ns = ?",
                                   (self.ns,)).fetchone()
        except sqlite3.OperationalError as e:
            # an earlier seqkv's store opened read-only: never trimmed, since a trimming
            # writer creates the table before its first commit
            if "no such table" not in str(e):
                raise
            return 0, None
        return (int(row[0]), row[1]) if row else (0, None)

    def _log(self, kind: str, key: str) -> None:
        if self.logged:
            gen = self.generation + 1
            if not self.con.execute("UPDATE changes SET gen = ? WHERE ns = ? AND kind = ? "
                                    "AND key = ?", (gen, self.ns, kind, key)).rowcount:
                self.con.execute("INSERT INTO changes VALUES (?, ?, ?, ?)",
                                 (self.ns, kind, key, gen))
                self.added += 1

    def _count(self) -> int:
        return int(self.con.execute("SELECT count(*) FROM changes WHERE ns = ?",
                                    (self.ns,)).fetchone()[0])

    def trim(self, cap: int) -> None:
        """Keep the change log's newest ``cap`` entries (0: all): drop the oldest generations
        whole and raise the floor to the newest dropped. Runs inside the commit's transaction,
        so the log, its floor and the records change together or not at all."""
        if not self.logged:
            return
        floor, entries = self._floor()
        # kept count plus what this transaction added; counted where not kept yet (a new
        # namespace, or a store of an earlier seqkv)
        n = self._count() if entries is None else int(entries) + self.added
        if cap and n > cap:
            # the generation of the (n - cap)-th oldest entry: it and all older ones go
            row = self.con.execute("SELECT gen FROM changes WHERE ns = ? ORDER BY gen "
                                   "LIMIT 1 OFFSET ?", (self.ns, n - cap - 1)).fetchone()
            if row is None:  # the kept count was too high (rows deleted by hand): recount
                n = self._count()
            else:
                floor = int(row[0])
                n -= self.con.execute("DELETE FROM changes WHERE ns = ? AND gen <= ?",
                                      (self.ns, floor)).rowcount
        self.con.execute("INSERT OR REPLACE INTO changes_floor VALUES (?, ?, ?)",
                         (self.ns, floor, n))

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
    def __init__(self, path: str, create: bool = True, busy: float | None = None,
                 log_max: int | None = None) -> None:
        """``log_max``: the change-log entries a namespace keeps (default
        $SEQKV_SQLITE_LOG_MAX or 10,000; 0: all)."""
        if log_max is not None and log_max < 0:
            raise StoreError("log_max must be 0 (no limit) or more")
        p = check_sqlite_file(path, create)
        self.logged = True  # the change log is kept (False only for a read-only old store)
        self.url = str(p)
        self.busy = busy_timeout() if busy is None else busy
        self.log_max = log_max_setting(LOG_MAX_ENV) if log_max is None else log_max
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
            if not {"changes", "changes_floor"} <= tables:
                # a store of an earlier seqkv: add the change log, or its floor
                try:
                    self._create(_LOG_SCHEMA)
                except sqlite3.OperationalError as e:
                    if _busy(e):
                        raise
                    # a read-only file: without a log readers re-read it whole; a log with
                    # no floor table has never been trimmed (_SqliteTxn._floor)
                    self.logged = "changes" in tables
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
            txn.trim(self.log_max)  # in this transaction: a crash keeps the log whole
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
        this store keeps no change log, or it was trimmed past ``since``: read it whole)."""
        if not self.logged:
            return None

        def read() -> tuple[int, dict[str, dict[str, bytes | None]]] | None:
            self.con.execute("BEGIN")
            try:
                txn = _SqliteTxn(self.con, ns)
                changed = txn.changes(since, kinds)
                return None if changed is None else (txn.generation, changed)
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
