"""The embedded default backend: one SQLite file in WAL mode.

Every write is one ``BEGIN IMMEDIATE`` transaction (one writer at a time across processes,
others wait up to ``timeout`` s), committed with ``synchronous=FULL``: a process killed before
``COMMIT`` leaves no trace, and concurrent writers serialize instead of losing updates.
Readers see a consistent snapshot without blocking writers (WAL).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .backend import StoreError, pause_before_commit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, kind, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS generations (ns TEXT PRIMARY KEY, gen INTEGER NOT NULL);
"""


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


class SqliteBackend:
    def __init__(self, path: str, timeout: float = 120.0) -> None:
        p = Path(path)
        if p.is_dir():
            raise StoreError(f"is a directory, not a store: {path}")
        if not p.parent.is_dir():
            raise StoreError(f"no such directory: {p.parent}")
        self.url = str(p)
        try:
            self.con = sqlite3.connect(str(p), timeout=timeout, isolation_level=None)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=FULL")
            self.con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"not a seqkv store (SQLite: {e}): {path}") from e

    @contextmanager
    def transaction(self, ns: str) -> Iterator[_SqliteTxn]:
        self.con.execute("BEGIN IMMEDIATE")
        try:
            txn = _SqliteTxn(self.con, ns)
            yield txn
            self.con.execute("INSERT OR REPLACE INTO generations VALUES (?, ?)",
                             (ns, txn.generation + 1))
            pause_before_commit()
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def snapshot(self, ns: str, kinds: tuple[str, ...]) -> tuple[int, dict[str, dict[str, bytes]]]:
        self.con.execute("BEGIN")
        try:
            txn = _SqliteTxn(self.con, ns)
            return txn.generation, {k: txn.read_kind(k) for k in kinds}
        finally:
            self.con.execute("COMMIT")

    def generation(self, ns: str) -> int:
        row = self.con.execute("SELECT gen FROM generations WHERE ns = ?", (ns,)).fetchone()
        return int(row[0]) if row else 0

    def read(self, ns: str, kind: str, key: str) -> bytes | None:
        return _SqliteTxn(self.con, ns).read(kind, key)

    def namespaces(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT DISTINCT ns FROM records ORDER BY ns")]

    def close(self) -> None:
        self.con.close()
