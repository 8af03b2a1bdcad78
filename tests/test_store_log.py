"""The change log stays bounded on both backends (SQLite, Redis): it keeps its newest entries
(whole generations), a reader or writer older than what it still holds reads the namespace
whole instead of missing a change, and trimming is part of the commit (a writer killed in the
middle of one leaves the log, its floor and the records as they were)."""

import random
import sqlite3

import pytest

from seqkv.store import Store, StoreError
from seqkv.store import redis as redis_mod
from seqkv.store import sqlite as sqlite_mod
from seqkv.store.redis import RedisBackend, _key
from seqkv.store.sqlite import SqliteBackend

from .test_store_backends import CHUNK, db, kill_9_before_commit  # noqa: F401 - the db fixture

LOG_MAX = 24
LOG_MAX_ENV = {"sqlite": "SEQKV_SQLITE_LOG_MAX", "redis": "SEQKV_REDIS_LOG_MAX"}


def _kind(url: str) -> str:
    return "redis" if url.startswith("redis://") else "sqlite"


def _backend(url: str, log_max: int | None = LOG_MAX) -> SqliteBackend | RedisBackend:
    return (RedisBackend if _kind(url) == "redis" else SqliteBackend)(url, log_max=log_max)


def _store(url: str, llama, log_max: int | None = LOG_MAX, **kwargs) -> Store:
    return Store(_backend(url, log_max), llama, **kwargs)


def _conn(store: Store) -> object:
    b = store.backend
    return b.r if isinstance(b, RedisBackend) else b.con


def log_size(store: Store) -> int:
    """How many entries the namespace's change log holds."""
    b = store.backend
    if isinstance(b, RedisBackend):
        return int(b.r.zcard(_key(b.prefix, store.ns, "changes")))
    return b.con.execute("SELECT count(*) FROM changes WHERE ns = ?", (store.ns,)).fetchone()[0]


def log_floor(store: Store) -> int:
    """The newest generation trimmed from the namespace's log (0: none)."""
    b = store.backend
    if isinstance(b, RedisBackend):
        return int(b.r.get(_key(b.prefix, store.ns, "logfloor")) or 0)
    row = b.con.execute("SELECT floor FROM changes_floor WHERE ns = ?", (store.ns,)).fetchone()
    return row[0] if row else 0


def check_kept_count(store: Store) -> None:
    """SQLite keeps the log's entry count instead of counting it at each commit: it is exact."""
    if isinstance(store.backend, SqliteBackend):
        kept = store.backend.con.execute("SELECT entries FROM changes_floor WHERE ns = ?",
                                         (store.ns,)).fetchone()[0]
        assert kept == log_size(store)


@pytest.fixture
def whole_reads(monkeypatch):
    """Whole-namespace reads by connection: snapshots, and reads of every record of a kind
    inside a write transaction (a writer that cannot catch up through the log). (SQLite's
    snapshot reads through its transaction's read_kind.)"""
    counts: dict[int, int] = {}
    snapshot = RedisBackend.snapshot
    redis_read_kind = redis_mod._RedisTxn.read_kind
    sqlite_read_kind = sqlite_mod._SqliteTxn.read_kind

    def counting_snapshot(self, ns, kinds):
        counts[id(self.r)] = counts.get(id(self.r), 0) + 1
        return snapshot(self, ns, kinds)

    def counting_redis_read_kind(self, kind):
        counts[id(self.r)] = counts.get(id(self.r), 0) + 1
        return redis_read_kind(self, kind)

    def counting_sqlite_read_kind(self, kind):
        counts[id(self.con)] = counts.get(id(self.con), 0) + 1
        return sqlite_read_kind(self, kind)

    monkeypatch.setattr(RedisBackend, "snapshot", counting_snapshot)
    monkeypatch.setattr(redis_mod._RedisTxn, "read_kind", counting_redis_read_kind)
    monkeypatch.setattr(sqlite_mod._SqliteTxn, "read_kind", counting_sqlite_read_kind)
    return lambda store: counts.get(id(_conn(store)), 0)


def _random_session(rng: random.Random, base: list[int]) -> list[int]:
    return base[: rng.randrange(5, 60)] + [rng.randrange(3, 320)
                                           for _ in range(rng.randrange(1, 20))]


def fill_log(store: Store, expect: dict[str, list[int]], base: list[int],
             rng: random.Random) -> None:
    """Put new sessions until the log has been trimmed and is nearly full: the next put trims."""
    while log_floor(store) == 0 or log_size(store) < LOG_MAX - 4:
        name = f"s{len(expect)}"
        expect[name] = _random_session(rng, base)
        store.put(name, expect[name])


def test_the_log_stays_bounded_and_readers_behind_miss_nothing(db, llama, whole_reads):  # noqa: F811
    rng = random.Random(5)
    w = _store(db, llama, chunk=CHUNK)
    w.put("s0", [5, 6, 7, 8])
    behind, writer_behind, near = (_store(db, llama) for _ in range(3))
    for s in (behind, writer_behind, near):
        assert s.get_ids("s0") == [5, 6, 7, 8]
    loaded = {id(s): whole_reads(s) for s in (behind, writer_behind)}
    expect, longest = {"s0": [5, 6, 7, 8]}, 0
    base = [rng.randrange(3, 320) for _ in range(60)]
    for i in range(120):  # puts, replacements and deletes: new edges, splits, freed edges
        name = f"s{rng.randrange(10)}"
        if name in expect and rng.random() < 0.25:
            w.delete(name)
            del expect[name]
        else:
            expect[name] = _random_session(rng, base)
            w.put(name, expect[name], replace=True)
        if i == 60:
            w.compact()  # raw edges swapped for coded ones
        longest = max(longest, log_size(w))
        assert log_size(w) <= LOG_MAX
        check_kept_count(w)
        before = whole_reads(near)
        assert near.sessions() == sorted(expect)
        if i != 60:  # one put behind: through the log (the compaction's one generation
            assert whole_reads(near) == before  # coded more edges than the log keeps)
    assert log_floor(w) > 0 and longest == LOG_MAX  # it did fill up and was trimmed
    # the reader left behind reads the namespace whole, and then holds exactly what is stored
    assert behind.sessions() == sorted(expect)
    assert {k: behind.get_ids(k) for k in expect} == expect
    assert whole_reads(behind) > loaded[id(behind)]
    # so does a writer left behind, inside its transaction; its put then reaches everyone
    writer_behind.put("late", base[:30] + [9, 9, 9])
    expect["late"] = base[:30] + [9, 9, 9]
    assert whole_reads(writer_behind) > loaded[id(writer_behind)]
    for s in (w, near, behind, writer_behind, _store(db, llama)):
        assert s.sessions() == sorted(expect)
        assert {k: s.get_ids(k) for k in expect} == expect
    assert w.stats() == Store(db, llama).stats()


def test_log_max_zero_keeps_every_entry_and_a_bad_setting_is_refused(db, llama, monkeypatch):  # noqa: F811
    s = _store(db, llama, log_max=0, chunk=CHUNK)
    for i in range(12):
        s.put(f"s{i}", [5, 6, 7, i + 10, i + 11, i + 12])
    assert log_size(s) > LOG_MAX and log_floor(s) == 0
    check_kept_count(s)
    env = LOG_MAX_ENV[_kind(db)]
    for bad in ("lots", "-1"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(StoreError, match=env):
            _backend(db, log_max=None)
    monkeypatch.setenv(env, "5")  # the setting is what a store opened by URL keeps
    assert Store(db, llama).backend.log_max == 5


def test_kill_9_mid_commit_leaves_the_log_and_its_floor_whole(db, llama, tmp_path):  # noqa: F811
    """A writer killed after its commit trimmed the log (SQLite: inside the transaction;
    Redis: before the script) leaves log, floor and records as they were."""
    rng = random.Random(7)
    base = [rng.randrange(3, 320) for _ in range(60)]
    w = _store(db, llama, chunk=CHUNK)
    w.put("s0", base[:20])
    behind = _store(db, llama)
    assert behind.sessions() == ["s0"]
    expect = {"s0": base[:20]}
    fill_log(w, expect, base, rng)
    size, floor, gen = log_size(w), log_floor(w), w.backend.generation(w.ns)
    kill_9_before_commit(db, [("victim", base[:3] + list(range(100, 150)))],
                         tmp_path / "paused", {LOG_MAX_ENV[_kind(db)]: str(LOG_MAX)})
    fresh = _store(db, llama)
    assert (log_size(fresh), log_floor(fresh), fresh.backend.generation(fresh.ns)) == (
        size, floor, gen)
    check_kept_count(fresh)
    for s in (fresh, w, behind):
        assert s.sessions() == sorted(expect)
        assert {k: s.get_ids(k) for k in expect} == expect
    w.put("after", base[:3] + list(range(100, 150)))  # writable again, and trims again
    assert log_size(w) <= LOG_MAX and log_floor(w) > floor
    check_kept_count(w)
    assert behind.get_ids("after") == base[:3] + list(range(100, 150))


def test_sqlite_trim_rolls_back_with_a_failed_commit(tmp_path, llama, monkeypatch):
    path, rng = str(tmp_path / "store.path"), random.Random(8)
    s = _store(path, llama, chunk=CHUNK)
    fill_log(s, {}, [rng.randrange(3, 320) for _ in range(60)], rng)
    state = (log_size(s), log_floor(s), s.backend.generation(s.ns), s.sessions())

    def fail(self):
        raise OSError("disk gone")

    monkeypatch.setattr(SqliteBackend, "_commit", fail)
    with pytest.raises(OSError):
        s.put("lost", list(range(200, 240)))
    monkeypatch.undo()
    fresh = _store(path, llama)
    assert (log_size(fresh), log_floor(fresh), fresh.backend.generation(fresh.ns),
            fresh.sessions()) == state
    check_kept_count(fresh)


def test_an_earlier_sqlite_store_gets_its_floor_and_is_trimmed(tmp_path, llama, monkeypatch):
    """A store written before the log was trimmed (no floor table): a read-only reader reads
    its log as it is; a writer adds the table and trims, and that reader, now behind the
    floor, reads the namespace whole."""
    path = str(tmp_path / "store.path")
    old = _store(path, llama, log_max=0, chunk=CHUNK)
    rng = random.Random(9)
    base = [rng.randrange(3, 320) for _ in range(60)]
    expect = {f"s{i}": _random_session(rng, base) for i in range(10)}
    for name, ids in list(expect.items())[:2]:
        old.put(name, ids)
    old.backend.con.execute("DROP TABLE changes_floor")  # as an earlier seqkv left it
    old.close()

    real_create = SqliteBackend._create

    def read_only(self, schema):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(SqliteBackend, "_create", read_only)
    reader = _store(path, llama)
    assert reader.backend.logged and reader.sessions() == ["s0", "s1"]
    assert reader.backend.changes(reader.ns, 1, ("session",)) is not None  # no floor: 0
    monkeypatch.setattr(SqliteBackend, "_create", real_create)
    w = _store(path, llama, chunk=CHUNK)  # adds the floor table
    w.put("s2", expect["s2"])
    assert reader.sessions() == ["s0", "s1", "s2"]  # through the log: nothing trimmed yet
    for name, ids in list(expect.items())[3:]:
        w.put(name, ids)
    assert log_size(w) <= LOG_MAX and log_floor(w) > 0
    check_kept_count(w)
    assert reader.sessions() == sorted(expect)
    assert {k: reader.get_ids(k) for k in expect} == expect
