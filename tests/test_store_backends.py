"""The store on both backends (SQLite file, Redis): round trips, namespaces, d_T, checkpoints,
eviction, kill -9 mid-write, concurrent writers, corrupt records, model mismatch."""

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from seqkv.core.cache import KVCache, prefill_cache
from seqkv.core.errors import ModelMismatchError
from seqkv.store import Store, StoreCorruptError, StoreError

from .conftest import tiny_llama

REDIS_URL = os.environ.get("SEQKV_TEST_REDIS", "redis://127.0.0.1:6379/15")
CHUNK = 40  # tiny_llama's window is 128: resets at 40, 80, ...


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "redis"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    if not _redis_up():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Redis answers at {REDIS_URL} (scripts/services.sh)")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}#test-{uuid.uuid4().hex}"  # a fresh key prefix per test


def seqs(seed=0, n=6):
    rng = random.Random(seed)
    base = [rng.randrange(3, 320) for _ in range(70)]
    return {f"s{i}": base[: rng.randrange(10, 70)] + [rng.randrange(3, 320)
                                                      for _ in range(rng.randrange(1, 25))]
            for i in range(n)}


def test_put_get_round_trip_dedup_and_reopen(db, llama):
    data = seqs()
    with Store(db, llama, chunk=CHUNK) as s:
        for k, v in data.items():
            s.put(k, v)
        st = s.stats()
    assert st["sessions"] == len(data)
    assert st["tokens_total"] == sum(map(len, data.values()))
    prefixes = {tuple(v[: i + 1]) for v in data.values() for i in range(len(v))}
    assert st["tokens_unique"] == len(prefixes) < st["tokens_total"]
    with Store(db, llama) as fresh:  # a new process-like reader decodes every edge
        assert fresh.chunk == CHUNK
        for k, v in data.items():
            assert fresh.get_ids(k) == v
        assert fresh.stats()["bits_total"] == st["bits_total"]
        fresh.delete("s0")
        with pytest.raises(StoreError):
            fresh.get_ids("s0")
        assert fresh.get_ids("s1") == data["s1"]
        with pytest.raises(StoreError):
            fresh.put("s1", [5, 6])


def test_namespaces_are_isolated(db, llama):
    ids = seqs()["s1"]
    a = Store(db, llama, "tenant-a", chunk=CHUNK)
    b = Store(db, llama, "tenant-b", chunk=CHUNK)
    a.put("x", ids)
    r = b.put("x", ids)
    assert r.shared_tokens == 0  # nothing deduplicated across namespaces
    assert b.stats()["bits_total"] == a.stats()["bits_total"]
    assert b.nearest(ids)[0]["session"] == "x" and a.sessions() == ["x"]
    b.delete("x")
    assert a.get_ids("x") == ids and b.sessions() == []


def test_d_T_metric_values(db, llama):
    data = seqs(1)
    s = Store(db, llama, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    query = data["s2"][:30] + [7, 7, 7]
    rows = {r["session"]: r for r in s.nearest(query, k=100)}
    from seqkv.store.coding import Cursor
    from seqkv.store.trie import info_bits

    q_bits = info_bits(Cursor(llama, CHUNK).encode(query))
    for name, ids in data.items():
        lcp = next((i for i, (x, y) in enumerate(zip(ids, query, strict=False)) if x != y),
                   min(len(ids), len(query)))
        assert rows[name]["shared_tokens"] == lcp
        assert rows[name]["d_T_bits"] == pytest.approx(float(q_bits[:lcp].sum()), abs=1e-2)
    ranked = [r["d_T_bits"] for r in s.nearest(query, k=100)]
    assert ranked == sorted(ranked, reverse=True)


def _layers_equal(a, b):
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
               for x, y in zip(a.layers, b.layers, strict=True))


def test_checkpoint_restore_equals_prefill(db, llama):
    data = seqs(2)
    s = Store(db, llama, chunk=CHUNK, checkpoint_budget=10**9)
    for k, v in data.items():
        s.put(k, v)
    name = max(data, key=lambda k: len(data[k]))
    node = s.trie.sessions[name]
    s.checkpoint(node.parent.id if node.parent.depth >= 16 else name)
    fresh = Store(db, llama)
    restored = fresh.get_cache(name)
    assert fresh.last_restore["checkpoint_depth"] > 0
    full = prefill_cache(llama.model, data[name])
    assert _layers_equal(restored.cache, full.cache)
    assert torch.equal(restored.next_logits, full.next_logits)
    assert restored.input_ids[0].tolist() == data[name]


def test_quantized_checkpoint(db, llama):
    ids = seqs(3)["s0"] + list(range(3, 40))
    s = Store(db, llama, chunk=CHUNK, checkpoint_budget=10**9,
              checkpoint_quant=("turboquant-mse", 3))
    s.put("q", ids)
    raw = Store(db, llama, "raw", chunk=CHUNK, checkpoint_budget=10**9)
    raw.put("q", ids)
    assert s.checkpoint("q") < raw.checkpoint("q") / 3
    restored = s.get_cache("q")
    full = prefill_cache(llama.model, ids)
    err = max((x.keys - y.keys).abs().max().item() for x, y in
              zip(restored.cache.layers, full.cache.layers, strict=True))
    assert 0 < err < 1.0


def test_eviction_under_budget(db, llama):
    data = seqs(4, n=5)
    s = Store(db, llama, chunk=CHUNK, checkpoint_budget=1)
    for k, v in data.items():
        s.put(k, v)
    one = s.checkpoint_size(32)
    for policy in ("lru", "prior"):
        s2 = Store(db, llama, chunk=CHUNK, checkpoint_budget=2 * one + 64 * 8,
                   checkpoint_policy=policy)
        for name in ["s0", "s1", "s1", "s2", "s3", "s3", "s3"]:
            s2.get_ids(name)
            s2.rebalance(name)
            assert s2.stats()["checkpoint_bytes"] <= s2.budget + 4096  # headers beyond estimate
        assert 1 <= s2.stats()["checkpoints"]
        if policy == "lru":  # the most recently restored session's node is kept
            assert s2.trie.sessions["s3"].id in s2.ckpts
        for k, v in data.items():
            assert s2.get_ids(k) == v


def test_corrupt_record_detected(db, llama, tmp_path):
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", seqs()["s0"])
    node = s.trie.sessions["a"]
    raw = bytearray(s.backend.read(s.ns, "edge", node.id))
    raw[len(raw) // 2] ^= 0x01
    with s.backend.transaction(s.ns) as txn:
        txn.put("edge", node.id, bytes(raw))
    with pytest.raises(StoreCorruptError, match="corrupt"):
        Store(db, llama).get_ids("a")


def _engine_cache(ids, seed=0) -> KVCache:
    """A cache 'computed elsewhere': another engine's bf16 numerics."""
    other = tiny_llama()
    other.model.to(torch.bfloat16)
    return KVCache.from_dynamic(prefill_cache(other.model, ids).cache, ids)


def test_exact_tier_round_trip_dedup_delete(db, llama):
    data = seqs()
    kv_a, kv_b = _engine_cache(data["s0"]), _engine_cache(data["s1"])
    with Store(db, llama, chunk=CHUNK) as s:
        s.put("text", data["s2"])
        r = s.put_exact("a", kv_a)
        s.put_exact("b", kv_b, dtype="bf16", attn="sdpa")
        assert r.tokens == len(data["s0"])
        st = s.stats()
        assert st["exact_sessions"] == 2 and st["exact_bytes"] > 0
        assert s.get_ids("a") == data["s0"]  # its tokens are an ordinary session too
        with pytest.raises(StoreError, match="not stored exactly"):
            s.get_exact("text")
    with Store(db, llama) as s2:  # reopened: the very tensors that were put
        assert s2.get_exact("a").equal_bits(kv_a)
        assert s2.get_exact("b").equal_bits(kv_b)
        s2.delete("a")
        assert s2.backend.read(s2.ns, "exact", "a") is None
        assert s2.stats()["exact_sessions"] == 1
        s2.put_exact("b", kv_a, replace=True)
        assert s2.get_exact("b").equal_bits(kv_a)


def test_exact_tier_corrupt_record_detected(db, llama):
    kv = _engine_cache(seqs()["s0"])
    s = Store(db, llama, chunk=CHUNK)
    s.put_exact("a", kv)
    raw = bytearray(s.backend.read(s.ns, "exact", "a"))
    raw[len(raw) // 2] ^= 0x01
    with s.backend.transaction(s.ns) as txn:
        txn.put("exact", "a", bytes(raw))
    with pytest.raises(StoreCorruptError, match="corrupt"):
        Store(db, llama).get_exact("a")


def test_foreign_model_refused(db, llama):
    Store(db, llama, chunk=CHUNK).put("a", [5, 6, 7])
    with pytest.raises(ModelMismatchError):
        Store(db, tiny_llama(seed=1))


PAUSE_ENV = "SEQKV_TEST_PAUSE_BEFORE_COMMIT"
# Spawned writers and compactors start with this: with $SEQKV_TEST_PAUSE_BEFORE_COMMIT=FILE a
# backend's commit creates FILE and sleeps instead of committing, so a test can kill -9 the
# process in the middle of a write (the hook lives here, not in the backends' commit paths).
PAUSE_HOOK = f"""
import os, time
from seqkv.store.redis import RedisBackend
from seqkv.store.sqlite import SqliteBackend
def _paused(real):
    def commit(self, *args):
        marker = os.environ.get({PAUSE_ENV!r})
        if marker:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
        return real(self, *args)
    return commit
for _cls in (SqliteBackend, RedisBackend):
    _cls._commit = _paused(_cls._commit)
"""

_WRITER = PAUSE_HOOK + """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from seqkv.store import Store
s = Store({db!r}, tiny_llama(), chunk={chunk})
for name, ids in {work!r}:
    s.put(name, ids)
"""


def spawn_script(template: str, env: dict | None = None, **fields) -> subprocess.Popen:
    """A Python child running ``template`` (PAUSE_HOOK-based; ``{tests}`` is this folder)
    formatted with ``fields``."""
    code = template.format(tests=str(Path(__file__).parent), **fields)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(p: subprocess.Popen, path: Path, seconds: float) -> None:
    """Until the child creates ``path``; it must not exit first, nor take over ``seconds``."""
    deadline = time.time() + seconds
    while not path.exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()[-2000:]
        time.sleep(0.02)


def _spawn(db, work, env=None):
    return spawn_script(_WRITER, env, db=db, chunk=CHUNK, work=work)


def kill_9_before_commit(db, work, marker: Path, env: dict | None = None) -> None:
    """Run a writer of ``work`` that pauses just before its commit, and kill -9 it there."""
    p = _spawn(db, work, {PAUSE_ENV: str(marker), "SEQKV_REDIS_LOCK_TTL": "2", **(env or {})})
    wait_for(p, marker, 60)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def test_kill_9_mid_write_leaves_no_partial_session(db, llama, tmp_path):
    data = seqs(5)
    s = Store(db, llama, chunk=CHUNK)
    s.put("before", data["s0"])
    bits = s.stats()["bits_total"]
    victim = data["s1"][:5] + list(range(100, 160))  # splits an edge and adds new ones
    kill_9_before_commit(db, [("victim", victim)], tmp_path / "paused")
    fresh = Store(db, llama)
    assert fresh.sessions() == ["before"]
    assert fresh.stats()["bits_total"] == bits and fresh.get_ids("before") == data["s0"]
    fresh.put("after", victim)  # the store is writable again (lock released or expired)
    assert fresh.get_ids("after") == victim


def test_concurrent_writers_lose_nothing(db, llama):
    data = seqs(6, n=6)
    items = sorted(data.items())
    procs = [_spawn(db, items[i::3]) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    s = Store(db, llama)
    assert s.sessions() == sorted(data)
    for k, v in data.items():
        assert s.get_ids(k) == v
    prefixes = {tuple(v[: i + 1]) for v in data.values() for i in range(len(v))}
    assert s.stats()["tokens_unique"] == len(prefixes)
