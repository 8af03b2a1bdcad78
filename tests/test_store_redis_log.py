"""The Redis backend's change log stays bounded: it keeps its newest entries (whole
generations), and a reader or writer older than what it still holds reads the namespace
whole instead of missing a change."""

import os
import random
import uuid

import pytest

from seqkv.store import Store
from seqkv.store import redis as redis_mod
from seqkv.store.redis import RedisBackend, _key

from .test_store_backends import CHUNK, REDIS_URL, _redis_up

LOG_MAX = 24


@pytest.fixture
def url():
    if not _redis_up():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Redis answers at {REDIS_URL} (scripts/services.sh)")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}#test-{uuid.uuid4().hex}"


@pytest.fixture
def whole_reads(monkeypatch):
    """Whole-namespace reads by Redis connection: snapshots, and reads of every record of a
    kind inside a write transaction (a writer that cannot catch up through the log)."""
    counts: dict[int, int] = {}
    snapshot, read_kind = RedisBackend.snapshot, redis_mod._RedisTxn.read_kind

    def counting_snapshot(self, ns, kinds):
        counts[id(self.r)] = counts.get(id(self.r), 0) + 1
        return snapshot(self, ns, kinds)

    def counting_read_kind(self, kind):
        counts[id(self.r)] = counts.get(id(self.r), 0) + 1
        return read_kind(self, kind)

    monkeypatch.setattr(RedisBackend, "snapshot", counting_snapshot)
    monkeypatch.setattr(redis_mod._RedisTxn, "read_kind", counting_read_kind)
    return lambda store: counts.get(id(store.backend.r), 0)


def _store(url: str, llama, **kwargs) -> Store:
    return Store(RedisBackend(url, log_max=LOG_MAX), llama, **kwargs)


def test_the_log_stays_bounded_and_readers_behind_miss_nothing(url, llama, whole_reads):
    rng = random.Random(5)
    w = _store(url, llama, chunk=CHUNK)
    w.put("s0", [5, 6, 7, 8])
    behind, writer_behind, near = (_store(url, llama) for _ in range(3))
    for s in (behind, writer_behind, near):
        assert s.get_ids("s0") == [5, 6, 7, 8]
    loaded = {id(s): whole_reads(s) for s in (behind, writer_behind)}
    r, changes = w.backend.r, _key(w.backend.prefix, w.ns, "changes")
    floor = _key(w.backend.prefix, w.ns, "logfloor")
    expect, longest = {"s0": [5, 6, 7, 8]}, 0
    base = [rng.randrange(3, 320) for _ in range(60)]
    for i in range(120):  # puts, replacements and deletes: new edges, splits, freed edges
        name = f"s{rng.randrange(10)}"
        if name in expect and rng.random() < 0.25:
            w.delete(name)
            del expect[name]
        else:
            expect[name] = base[: rng.randrange(5, 60)] + [rng.randrange(3, 320)
                                                           for _ in range(rng.randrange(1, 20))]
            w.put(name, expect[name], replace=True)
        if i == 60:
            w.compact()  # raw edges swapped for coded ones
        longest = max(longest, r.zcard(changes))
        assert r.zcard(changes) <= LOG_MAX
        before = whole_reads(near)
        assert near.sessions() == sorted(expect)
        if i != 60:  # one put behind: through the log (the compaction's one generation
            assert whole_reads(near) == before  # coded more edges than the log keeps)
    assert int(r.get(floor)) > 0 and longest == LOG_MAX  # it did fill up and was trimmed
    # the reader left behind reads the namespace whole, and then holds exactly what is stored
    assert behind.sessions() == sorted(expect)
    assert {k: behind.get_ids(k) for k in expect} == expect
    assert whole_reads(behind) > loaded[id(behind)]
    # so does a writer left behind, inside its transaction; its put then reaches everyone
    writer_behind.put("late", base[:30] + [9, 9, 9])
    expect["late"] = base[:30] + [9, 9, 9]
    assert whole_reads(writer_behind) > loaded[id(writer_behind)]
    for s in (w, near, behind, writer_behind, _store(url, llama)):
        assert s.sessions() == sorted(expect)
        assert {k: s.get_ids(k) for k in expect} == expect
    assert w.stats() == Store(url, llama).stats()


def test_log_max_zero_keeps_every_entry_and_a_bad_setting_is_refused(url, llama,
                                                                     monkeypatch):
    s = Store(RedisBackend(url, log_max=0), llama, chunk=CHUNK)
    for i in range(12):
        s.put(f"s{i}", [5, 6, 7, i + 10, i + 11, i + 12])
    assert s.backend.r.zcard(_key(s.backend.prefix, s.ns, "changes")) > LOG_MAX
    assert s.backend.r.get(_key(s.backend.prefix, s.ns, "logfloor")) is None
    monkeypatch.setenv("SEQKV_REDIS_LOG_MAX", "lots")
    with pytest.raises(redis_mod.StoreError, match="SEQKV_REDIS_LOG_MAX"):
        RedisBackend(url)
