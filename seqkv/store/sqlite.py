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

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .backend import StoreError, busy_timeout, pause_before_commit, retry_busy

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS records (
    ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, kind, key)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS generations (ns TEXT PRIMARY KEY, gen INTEGER NOT NULL)",
]
_TABLES = {"records", "generations"}


class _SqliteTxn:
    def __init__(self, con: sqlite3.Connection, ns: str) -> None:
        self.con, self.ns = con, ns
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

    def put(self, kind: str, key: str, value: bytes) -> None:
        self.con.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                         (self.ns, kind, key, value))

    def delete(self, kind: str, key: str) -> None:
        self.con.execute("DELETE FROM records WHERE ns = ? AND kind = ? AND key = ?",
                         (self.ns, kind, key))


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


class SqliteBackend:
    def __init__(self, path: str, create: bool = True, busy: float | None = None) -> None:
        p = check_sqlite_file(path, create)
        self.url = str(p)
        self.busy = busy_timeout() if busy is None else busy
        try:
            target = str(p) if create else _uri(p, "rw")
            self.con = sqlite3.connect(target, timeout=0.05, isolation_level=None,
                                       check_same_thread=False, uri=not create)
            retry_busy(lambda: self._init(create), _busy, self.busy, "opening the store")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"not a seqkv store (SQLite: {e}): {path}") from e

    def _tables(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT name FROM sqlite_master")}

    def _init(self, create: bool) -> None:
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=FULL")
        if _TABLES <= self._tables():
            return
        if not create:
            raise StoreError(f"not a seqkv store (no seqkv tables): {self.url}")
        # one transaction: processes creating the same new store at once never see half a
        # schema, and another application's database (tables, none of ours) is not touched
        self.con.execute("BEGIN IMMEDIATE")
        try:
            tables = self._tables()
            if tables and not _TABLES <= tables:
                raise StoreError(f"not a seqkv store (no seqkv tables): {self.url}")
            for statement in _SCHEMA:
                self.con.execute(statement)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    @contextmanager
    def transaction(self, ns: str) -> Iterator[_SqliteTxn]:
        retry_busy(lambda: self.con.execute("BEGIN IMMEDIATE"), _busy, self.busy,
                   "the SQLite write lock")
        try:
            txn = _SqliteTxn(self.con, ns)
            yield txn
            self.con.execute("INSERT OR REPLACE INTO generations VALUES (?, ?)",
                             (ns, txn.generation + 1))
            pause_before_commit()
            self.con.execute("COMMIT")
        except BaseException:
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
            raise

    def snapshot(self, ns: str, kinds: tuple[str, ...]) -> tuple[int, dict[str, dict[str, bytes]]]:
        def read() -> tuple[int, dict[str, dict[str, bytes]]]:
            self.con.execute("BEGIN")
            try:
                txn = _SqliteTxn(self.con, ns)
                return txn.generation, {k: txn.read_kind(k) for k in kinds}
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
