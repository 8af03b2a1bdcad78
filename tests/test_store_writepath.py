"""The write path: put writes raw edges with no model work, reads of raw edges need no model,
and a writer that finds the store busy backs off, then says "store busy, retry"."""

import os
import sqlite3

import pytest

from seqkv.core.errors import SeqkvError
from seqkv.store import (
    ModelNeededError,
    Store,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
)
from seqkv.store import coding as coding_mod
from seqkv.store.redis import _key

from .test_store_backends import CHUNK, db, seqs  # noqa: F401 - the db fixture


@pytest.fixture
def no_model_steps(monkeypatch):
    """Any forward step of the store's coder fails the test."""

    def boom(self, token):
        raise AssertionError("the model ran during a put")

    monkeypatch.setattr(coding_mod.Cursor, "_step", boom)


def test_put_writes_raw_edges_without_the_model(db, llama, no_model_steps):  # noqa: F811
    base = list(range(10, 19))  # 9 tokens
    s = Store(db, llama, chunk=CHUNK)
    r1 = s.put("a", base)
    assert (r1.tokens, r1.shared_tokens, r1.new_tokens, r1.split_edges) == (9, 0, 9, 0)
    r2 = s.put("b", base[:5] + [200, 201, 202, 203])  # leaves a's edge after 5 tokens
    assert (r2.tokens, r2.shared_tokens, r2.new_tokens, r2.split_edges) == (9, 5, 4, 1)
    assert r2.record_bytes > 0
    r3 = s.put("c", base + [7])  # extends a's path
    assert (r3.shared_tokens, r3.new_tokens, r3.split_edges) == (9, 1, 0)
    st = s.stats()
    assert st["bits_total"] == 0 and st["raw_edges"] == st["edges"] == 4
    assert st["raw_tokens"] == st["tokens_unique"] == 9 + 4 + 1
    with Store(db, None) as bare:  # no model at all: raw edges read back as they are
        assert bare.get_ids("a") == base and bare.get_ids("c") == base + [7]
        assert bare.get_ids("b") == base[:5] + [200, 201, 202, 203]
        bare.delete("c")
        assert bare.sessions() == ["a", "b"]
        # ids are written raw without the model too: the store's meta records its
        # vocabulary, so out-of-range ids are still refused; text needs the tokenizer
        assert bare.put("d", [5, 6]).new_tokens == 2
        with pytest.raises(SeqkvError, match="out of range for a vocabulary of 320"):
            bare.put("e", [5, 320])
        with pytest.raises(ModelNeededError, match="needs the store's model"):
            bare.put("e", "some text")
    with Store(db, llama) as s:
        assert s.get_ids("d") == [5, 6]


def test_replace_and_duplicate_sessions_on_raw_edges(db, llama, no_model_steps):  # noqa: F811
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7, 8])
    with pytest.raises(StoreError, match="exists"):
        s.put("a", [5, 6])
    r = s.put("a", [5, 6, 9], replace=True)
    assert r.shared_tokens == 0  # the old path was freed first: nothing left to share
    assert Store(db, None).get_ids("a") == [5, 6, 9]
    assert s.stats()["tokens_unique"] == 3


def _hold_lock(db_url: str, ns: str = "default"):
    """Hold the store's write lock the way another writer would; returns a release function."""
    if db_url.startswith("redis://"):
        import redis

        url, _, prefix = db_url.partition("#")
        r = redis.Redis.from_url(url)
        key = _key(f"seqkv:{prefix}", ns, "lock")
        r.set(key, "someone-else", px=60_000)
        return lambda: r.delete(key)
    con = sqlite3.connect(db_url, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    return lambda: (con.execute("ROLLBACK"), con.close())


def test_busy_store_backs_off_then_says_retry(db, llama, monkeypatch):  # noqa: F811
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7])
    monkeypatch.setenv("SEQKV_STORE_BUSY_TIMEOUT", "0.4")
    writer = Store(db, llama)
    release = _hold_lock(db)
    try:
        with pytest.raises(StoreBusyError, match="store busy, retry"):
            writer.put("b", [5, 6, 8])
    finally:
        release()
    writer.put("b", [5, 6, 8])  # free again: the same writer succeeds
    assert Store(db, None).get_ids("b") == [5, 6, 8]


def test_put_with_its_cache_keeps_a_checkpoint(tmp_path, llama):
    import torch

    from seqkv.core.cache import prefill_cache

    ids = list(range(3, 40))
    s = Store(str(tmp_path / "s.db"), llama, chunk=CHUNK, checkpoint_budget=10**9)
    s.put("a", ids, cache=prefill_cache(llama.model, ids).cache)
    assert s.stats()["checkpoints"] == 1
    fresh = Store(str(tmp_path / "s.db"), llama)
    restored = fresh.get_cache("a")
    assert fresh.last_restore["checkpoint_depth"] == len(ids)
    full = prefill_cache(llama.model, ids)  # (bit for bit only at some cuts: see checkpoints)
    assert torch.allclose(restored.next_logits, full.next_logits, atol=1e-5)
    assert all(torch.allclose(x.keys, y.keys, atol=1e-5) for x, y in
               zip(restored.cache.layers, full.cache.layers, strict=True))


def test_a_lost_redis_is_one_store_error(db, llama, monkeypatch):  # noqa: F811
    if not db.startswith("redis://"):
        pytest.skip("Redis only")
    import redis

    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7])

    def gone(*a, **k):
        raise redis.ConnectionError("Connection refused")

    for name in ("get", "hget", "set", "pipeline"):
        monkeypatch.setattr(s.backend.r, name, gone)
    for call in (lambda: s.put("b", [5, 6]), s.stats, lambda: s.get_ids("a")):
        with pytest.raises(StoreUnavailableError, match="Redis at .*ConnectionError"):
            call()  # a StoreError the server answers 503 (retry), not 400


def test_commits_survive_another_process_opening_the_file(tmp_path, llama):
    """Several stores on one SQLite file in one process (as a server has), and another process
    reading it in between: every commit stays (no descriptor of the file is closed behind
    SQLite's back, which would drop this process's locks and let the reader delete the WAL)."""
    import subprocess
    import sys

    path = str(tmp_path / "s.db")
    w = Store(path, llama, chunk=CHUNK)
    Store(path, llama)  # a second store opened (and its path checked) while w's is open
    read = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(sorted(k for (k,) in "
            "c.execute(\"SELECT key FROM records WHERE kind = 'session'\"))); c.close()")

    def sessions_seen_outside():
        return subprocess.run([sys.executable, "-c", read, path], capture_output=True, text=True,
                              check=True).stdout.strip()

    for i, name in enumerate(["x", "y", "z"]):
        w.put(name, [5, 6 + i])
        assert sessions_seen_outside() == str(["x", "y", "z"][: i + 1])


def _create_and_write(path, q):
    from seqkv.store.sqlite import SqliteBackend

    try:
        b = SqliteBackend(path)
        with b.transaction("ns") as t:
            t.put("k", str(os.getpid()), b"x")
        q.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(repr(e))


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    """The schema is created in one transaction: no process sees half of it (and refuses the
    store as 'not a seqkv store'), as six racing creators did before."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(5):
        path, q = str(tmp_path / f"s{trial}.db"), ctx.Queue()
        procs = [ctx.Process(target=_create_and_write, args=(path, q)) for _ in range(6)]
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert results == ["ok"] * 6


class _CountingBackend:
    """A backend that counts whole-namespace reads (everything else passes through)."""

    def __init__(self, backend) -> None:
        self.backend, self.url, self.snapshots = backend, backend.url, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def snapshot(self, ns, kinds):
        self.snapshots += 1
        return self.backend.snapshot(ns, kinds)


def test_a_reader_catches_up_through_the_change_log(db, llama):  # noqa: F811
    from seqkv.store import open_backend

    data = seqs(7, n=6)
    w = Store(db, llama, chunk=CHUNK)
    w.put("s0", data["s0"])
    counting = _CountingBackend(open_backend(db))
    r = Store(counting, llama)
    assert r.get_ids("s0") == data["s0"]
    loaded = counting.snapshots
    for k, v in data.items():  # puts (new edges, splits) seen one generation at a time
        if k != "s0":
            w.put(k, v)
            assert r.get_ids(k) == v
    w.delete("s1")
    w.put("s2", data["s3"], replace=True)
    w.compact()  # raw -> coded swaps
    r.put("mine", data["s4"][:5] + [7, 7, 7])  # the reader writes too: both follow each other
    expect = {**data, "s2": data["s3"], "mine": data["s4"][:5] + [7, 7, 7]}
    del expect["s1"]
    assert r.sessions() == sorted(expect) == w.sessions()
    for k, v in expect.items():
        assert r.get_ids(k) == v and w.get_ids(k) == v
    assert counting.snapshots == loaded  # never re-read whole
    assert r.stats() == w.stats() == Store(db, llama).stats()


def test_a_store_without_a_change_log_gets_one(tmp_path, llama):
    path = str(tmp_path / "old.db")
    Store(path, llama, chunk=CHUNK).put("a", [5, 6, 7, 8])
    con = sqlite3.connect(path)
    con.execute("DROP TABLE changes")  # as a store of an earlier seqkv
    con.commit()
    con.close()
    s = Store(path, llama)
    s.put("b", [5, 6, 9])
    assert s.get_ids("a") == [5, 6, 7, 8] and Store(path, llama).get_ids("b") == [5, 6, 9]
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM changes").fetchone()[0] > 0
    con.close()


def test_put_many_is_one_commit_and_refuses_items_alone(db, llama):  # noqa: F811
    s = Store(db, llama, chunk=CHUNK)
    s.put("old", [5, 6, 7])
    gen = s.backend.generation(s.ns)
    out = s.put_many([("a", [5, 6, 8], False), ("old", [9, 9], False), ("b", [], False),
                      ("old", [5, 6, 7, 9], True), ("c", [5, 6, 8, 1], False)])
    assert s.backend.generation(s.ns) == gen + 1  # one transaction for all
    assert [type(r).__name__ for r in out] == ["PutResult", "SessionExistsError", "SeqkvError",
                                               "PutResult", "PutResult"]
    assert out[3].replaced and not out[0].replaced
    fresh = Store(db, llama)
    assert [fresh.get_ids(k) for k in ("a", "old", "c")] == [[5, 6, 8], [5, 6, 7, 9],
                                                              [5, 6, 8, 1]]


@pytest.fixture
def decode_rounds(monkeypatch):
    """The edge lengths of each lockstep decode round the store runs, sorted."""
    import seqkv.store.store as store_mod

    rounds = []
    real = store_mod.decode_edges

    def recording(lm, chunk, jobs, procedure, **options):
        rounds.append(sorted(n for _, _, n in jobs))
        return real(lm, chunk, jobs, procedure, **options)

    monkeypatch.setattr(store_mod, "decode_edges", recording)
    return rounds


def _compacted(url: str, lm, data: dict) -> None:
    s = Store(url, lm, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    s.compact()


def test_get_many_decodes_concurrent_sessions_together(db, llama, decode_rounds):  # noqa: F811
    data = seqs(8, n=6)
    _compacted(db, llama, data)
    fresh = Store(db, llama)
    names = sorted(data) + ["nope"]
    out = fresh.get_many(names)
    assert out[:-1] == [data[k] for k in sorted(data)]
    assert type(out[-1]).__name__ == "NoSessionError"
    edges = fresh.stats()["edges"]
    depth = max(len(fresh.trie.path(n)) for n in fresh.trie.sessions.values())
    calls = [len(r) for r in decode_rounds]
    # one round per trie level here: every edge others wait on is as long as the leaves
    assert sum(calls) == edges and len(calls) == depth < edges


def test_restore_rounds_take_shared_prefixes_first(db, llama, decode_rounds):  # noqa: F811
    """A lockstep round lasts as long as its longest edge: the short shared prefix that four
    sessions wait on is decoded alone first, and the long unrelated session joins the next
    round instead of making the first one long (17 steps in all instead of 26)."""
    prefix = [11, 12, 13]
    data = {f"s{i}": prefix + [20 + 13 * i + j for j in range(12)] for i in range(4)}
    data["solo"] = [200 + j for j in range(14)]
    _compacted(db, llama, data)
    fresh = Store(db, llama)
    assert fresh.get_many(sorted(data)) == [data[k] for k in sorted(data)]
    assert decode_rounds == [[3], [12, 12, 12, 12, 14]]
    assert sum(max(r) for r in decode_rounds) == 17


def test_writers_queue_in_the_kernel_and_a_long_wait_says_busy(tmp_path, llama, monkeypatch):
    import fcntl
    import threading

    path = str(tmp_path / "q.db")
    Store(path, llama, chunk=CHUNK).put("a", [5, 6, 7])
    monkeypatch.setenv("SEQKV_STORE_BUSY_TIMEOUT", "0.3")
    writer = Store(path, llama)
    fd = os.open(path + "-seqkv-lock", os.O_RDWR)  # another writer holds the queue
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(StoreBusyError, match="store busy, retry"):
            writer.put("b", [5, 6, 8])
        timer = threading.Timer(0.1, fcntl.flock, (fd, fcntl.LOCK_UN))  # released in time
        timer.start()
        writer.put("c", [5, 6, 9])  # waits in the kernel, then goes ahead
        timer.join()
    finally:
        os.close(fd)
    writer.put("b", [5, 6, 8])  # the abandoned wait left nothing held
    assert Store(path, None).sessions() == ["a", "b", "c"]


def test_redis_lock_goes_first_come_first_served_and_a_dead_waiter_is_skipped(db, llama):  # noqa: F811
    """Redis: a writer that finds the lock held queues; only the queue's head may take the
    free lock (a newcomer cannot jump ahead of a waiter still asking), and a waiter that
    stopped asking (killed) is dropped from the head after 250 ms."""
    if not db.startswith("redis://"):
        pytest.skip("Redis only")
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7])
    r, ns = s.backend.r, s.ns
    queue, asked = _key(s.backend.prefix, ns, "queue"), _key(s.backend.prefix, ns, "asked")
    sec, usec = r.time()
    now = sec * 1000 + usec // 1000
    r.rpush(queue, "earlier-waiter")
    r.hset(asked, "earlier-waiter", now + 60_000)  # still asking, as far as the lock knows
    s.backend.lock_wait = 0.3
    with pytest.raises(StoreBusyError):  # the lock is free, but it is not our turn
        s.put("b", [5, 6, 8])
    r.hset(asked, "earlier-waiter", now - 1_000)  # it stopped asking: killed
    s.backend.lock_wait = 10
    s.put("b", [5, 6, 8])
    assert s.get_ids("b") == [5, 6, 8] and r.lrange(queue, 0, -1) == []


def test_a_blocked_batch_is_retried_from_the_stored_trie(db, llama, monkeypatch):  # noqa: F811
    """A group commit whose second item finds the trie changed under it (_Blocked) retries
    the whole batch from what is stored: the first item, changed in memory on the first try,
    is neither refused as existing nor left in a trie no reader can load."""
    import seqkv.store.store as store_mod

    s = Store(db, llama)
    s.put("base", [1, 2, 3, 4, 5, 6, 7, 8])
    put_in, tries = store_mod.Store._put_in, []

    def blocked_once(self, txn, session, *args, **kwargs):
        if session == "B" and not tries:
            tries.append(session)
            raise store_mod._Blocked()
        return put_in(self, txn, session, *args, **kwargs)

    monkeypatch.setattr(store_mod.Store, "_put_in", blocked_once)
    results = s.put_many([("A", [1, 2, 3, 9, 9], False), ("B", [5, 5, 5], False)])
    assert tries and not any(isinstance(r, Exception) for r in results)
    monkeypatch.setattr(store_mod.Store, "_put_in", put_in)
    s.put("C", [1, 2, 3, 9, 9, 4])
    fresh = Store(db, llama)
    assert sorted(fresh.sessions()) == ["A", "B", "C", "base"]
    assert fresh.get_many(["A", "B", "C", "base"]) == [
        [1, 2, 3, 9, 9], [5, 5, 5], [1, 2, 3, 9, 9, 4], [1, 2, 3, 4, 5, 6, 7, 8]]


def test_a_failed_redis_commit_call_releases_the_lock(db, llama, monkeypatch):  # noqa: F811
    """The commit script's call fails (here before it runs): the writer releases its lock at
    once, not after the lock's 30 s expiry, and the next put goes through."""
    if not db.startswith("redis://"):
        pytest.skip("Redis only")
    import redis

    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7])

    def fails(keys, args):
        raise redis.ResponseError("OOM command not allowed")

    monkeypatch.setattr(s.backend, "_commit", fails)
    with pytest.raises(StoreError):
        s.put("b", [5, 6, 8])
    assert not s.backend.r.exists(_key(s.backend.prefix, s.ns, "lock"))
    monkeypatch.undo()
    s.put("c", [5, 6, 9])
    assert Store(db, llama).get_ids("c") == [5, 6, 9]
